"""Figure 1: the surfaces x -> -1/2 ||G_t(x) - y||^2 of a k = 2 network as it trains.

For two targets, heat maps at theta_0 (random: one smooth bump), a middle checkpoint and
theta_T (trained: wavy, several local maxima), with the surfing path x_0, x_1, ... drawn on
top up to that checkpoint and Adam's end point on the last panel. The picture is the paper's
whole argument: the early surfaces are easy, and the optimum moves slowly enough to follow.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from surfing.experiments.common import (
    COMMON_KEYS,
    add_common,
    command,
    link,
    open_store,
    pyplot,
    save_figure,
    schedule,
)
from surfing.experiments.report import markdown_table, write_csv, write_section
from surfing.solvers import direct, surf, uniform_latents
from surfing.trajectory import final_generator, generators

HELP = "Fig 1: heat maps of -1/2||G_t(x)-y||^2 over [-1,1]^2 with the surfing path (k = 2)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a k = 2 trajectory id")
    p.add_argument("--targets", type=int, default=2)
    p.add_argument("--grid", type=int, default=81, help="grid points per axis")
    p.add_argument("--extent", type=float, default=1.0, help="x in [-extent, extent]^2")
    add_common(p, trials=None)


def surface(G: torch.nn.Module, y: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """-1/2 ||G(x) - y||^2 on every grid point, (targets, points), in chunks."""
    out = []
    with torch.no_grad():
        for chunk in grid.split(2048):
            g = G(chunk).flatten(1)
            out.append(-0.5 * torch.cdist(y, g).pow(2))
    return torch.cat(out, dim=1)


def run(args: argparse.Namespace) -> list[dict]:
    store = open_store(args)
    manifest = store.manifest(args.model)
    if manifest.latent_dim != 2:
        raise ValueError(
            f"fig1 needs a k = 2 trajectory; {args.model} has k = {manifest.latent_dim}"
        )
    device = torch.device(args.device)
    G_T = final_generator(store, args.model, device)
    x_star = uniform_latents(args.targets, 2, args.seed, device)
    x_init = uniform_latents(args.targets, 2, args.seed + 1, device)
    with torch.no_grad():
        y = G_T(x_star).flatten(1)
    adam = direct(G_T, y, x_init, steps=args.direct_steps, lr=args.lr)

    # One stage at a time: each stage's surface is taken from the network it was surfed on.
    stream = generators(store, args.model, args.stride, device)
    n = len(stream)
    show = {0: "theta_0", n // 2: "middle", n - 1: "theta_T"}
    e = args.extent
    axis = torch.linspace(-e, e, args.grid)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], dim=1).to(device)
    surfaces: dict[int, tuple[int, torch.Tensor]] = {}
    path, x, rows = [], x_init, []
    bar = tqdm(stream, total=n, desc=f"{args.model} surf", disable=args.no_progress)
    for t, (index, step, G) in enumerate(bar):
        last = t == n - 1
        steps = args.final_steps if last else args.steps
        one = [(index, step, G)]
        x = surf(one, y, x, steps=steps, lr=args.lr, final_steps=steps, **schedule(args)).x
        path.append(x.cpu())
        if t in show:
            surfaces[t] = (step, surface(G, y, grid).cpu())
        with torch.no_grad():
            f = 0.5 * (G(x).flatten(1) - y).pow(2).sum(dim=1)
        rows += [
            {
                "target": j,
                "stage": t,
                "step": step,
                "x1": float(x[j, 0]),
                "x2": float(x[j, 1]),
                "objective": float(f[j]),
            }
            for j in range(args.targets)
        ]
    write_csv(args.out / "fig1_paths.csv", rows)

    png = args.out / "fig1_surfaces.png"
    plot(surfaces, show, torch.stack(path), x_star.cpu(), adam.x.cpu(), e, png)
    summary = [
        {
            "target": j,
            "x*": f"({x_star[j, 0]:.3f}, {x_star[j, 1]:.3f})",
            "surf x_T": f"({path[-1][j, 0]:.3f}, {path[-1][j, 1]:.3f})",
            "surf dist": float((path[-1][j] - x_star[j].cpu()).norm()),
            "adam x_T": f"({adam.x[j, 0]:.3f}, {adam.x[j, 1]:.3f})",
            "adam dist": float((adam.x[j] - x_star[j]).norm()),
        }
        for j in range(args.targets)
    ]
    keys = ["model", "targets", "grid", "extent", *COMMON_KEYS]
    body = (
        "## Figure 1: the evolving surface (k = 2)\n\n"
        f"`{command('fig1', args, keys)}` on {args.device}; {n} checkpoints, y = G_T(x*). "
        "Colour = -1/2 ||G_t(x) - y||^2 (brighter is better), red line = surfing path up to "
        "that checkpoint, white cross = x*, black x = Adam on G_T from the same start.\n\n"
        "Paper (4-layer VAE on Fashion-MNIST): the surface at random initialisation has a "
        "single broad peak near the origin, and becomes multi-modal (wavy) as training "
        "proceeds; the peak moves gradually.\n\n"
        + markdown_table(summary)
        + f"\n\n![surfaces]({link(png, args.results_md)})\n"
    )
    write_section("fig1", body, args.results_md)
    return summary


def plot(
    surfaces: dict[int, tuple[int, torch.Tensor]],
    show: dict[int, str],
    path: torch.Tensor,
    x_star: torch.Tensor,
    adam: torch.Tensor,
    extent: float,
    out: Path,
) -> None:
    """Rows = targets, columns = the shown checkpoints."""
    plt = pyplot()
    cols = sorted(surfaces)
    n_targets = x_star.shape[0]
    fig, axes = plt.subplots(
        n_targets, len(cols), figsize=(3.2 * len(cols), 3.0 * n_targets), squeeze=False
    )
    g = int(round(surfaces[cols[0]][1].shape[1] ** 0.5))
    for j in range(n_targets):
        for c, t in enumerate(cols):
            ax = axes[j][c]
            step, values = surfaces[t]
            ax.imshow(
                values[j].view(g, g).numpy(),
                origin="lower",
                cmap="viridis",
                extent=(-extent, extent, -extent, extent),
            )
            ax.plot(path[: t + 1, j, 0], path[: t + 1, j, 1], color="red", lw=1.2)
            ax.plot(path[t, j, 0], path[t, j, 1], "o", color="red", ms=4)
            ax.plot(x_star[j, 0], x_star[j, 1], "+", color="white", ms=10, mew=2)
            if t == cols[-1]:
                ax.plot(adam[j, 0], adam[j, 1], "x", color="black", ms=8, mew=2)
            ax.set_xlim(-extent, extent)
            ax.set_ylim(-extent, extent)
            ax.set_title(f"target {j}, {show[t]} (step {step})", fontsize=9)
    save_figure(fig, out)
