"""Figure 4: rate-distortion on real held-out images.

y is a Fashion-MNIST *test* image (never seen in training), so no latent reproduces it
exactly: the question is how close G(x_T) gets, ||G(x_T) - y||^2 / n per pixel (as in Bora
et al. 2017), from m Gaussian measurements of y, for surfing vs. Adam on the final network.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from surfing.data import load_fashion_mnist
from surfing.experiments import sensing
from surfing.experiments.common import command, link, method_of, open_store, pyplot, save_figure
from surfing.experiments.report import markdown_table, write_csv, write_section
from surfing.solvers import uniform_latents
from surfing.trajectory import final_generator

HELP = "Fig 4: per-pixel error on held-out test images vs. m, surf vs. Adam (box plots)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sensing.add_arguments(p, trials=200)
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default $SURFING_DATA_DIR)")


def test_images(n: int, seed: int, data_dir: str | None) -> torch.Tensor:
    """n test images drawn without replacement by a seeded permutation."""
    images, _ = load_fashion_mnist("test", data_dir)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return images[pick]


def run_model(model_id: str, args: argparse.Namespace) -> list[dict]:
    store = open_store(args)
    method, k = method_of(store, model_id)
    y = test_images(args.trials, args.seed, args.data_dir).flatten(1).to(args.device)
    x_init = uniform_latents(args.trials, k, args.seed + 1, args.device)
    G = final_generator(store, model_id, args.device)
    rows = []
    for m, res in sensing.sweep(model_id, args, y, x_init):
        for name, r in res.items():
            with torch.no_grad():
                err = (G(r.x).flatten(1) - y).pow(2).mean(dim=1).cpu()
            rows += [
                {
                    "model": model_id,
                    "method": method,
                    "k": k,
                    "m": m,
                    "solver": name,
                    "trial": i,
                    "pixel error": float(e),
                }
                for i, e in enumerate(err)
            ]
        med = {
            s: statistics.median(
                r["pixel error"]
                for r in rows
                if r["m"] == m and r["solver"] == s and r["model"] == model_id
            )
            for s in res
        }
        print(
            f"  {model_id} m={m:4d}  median error surf {med['surf']:.4f} adam {med['adam']:.4f}",
            flush=True,
        )
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Median and quartiles of the per-pixel error per (model, m, solver)."""
    out = []
    keys = list(dict.fromkeys((r["model"], r["m"]) for r in rows))
    for model_id, m in keys:
        row: dict[str, object] = {"model": model_id, "m": m}
        for s in ("surf", "adam"):
            e = sorted(
                r["pixel error"]
                for r in rows
                if r["model"] == model_id and r["m"] == m and r["solver"] == s
            )
            q = statistics.quantiles(e, n=4) if len(e) > 1 else [e[0]] * 3
            row |= {f"{s} median": q[1], f"{s} q1": q[0], f"{s} q3": q[2]}
        wins = [
            a["pixel error"] < b["pixel error"]
            for a, b in zip(
                [
                    r
                    for r in rows
                    if r["model"] == model_id and r["m"] == m and r["solver"] == "surf"
                ],
                [
                    r
                    for r in rows
                    if r["model"] == model_id and r["m"] == m and r["solver"] == "adam"
                ],
                strict=True,
            )
        ]
        row["surf better %"] = 100.0 * sum(wins) / len(wins)
        out.append(row)
    return out


def plot(rows: list[dict], path: Path) -> None:
    """One panel per model: side-by-side box plots per m (Adam blue, surfing red)."""
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.3), squeeze=False)
    for ax, model_id in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model_id]
        ms = list(dict.fromkeys(r["m"] for r in mine))
        for j, (s, color) in enumerate((("adam", "tab:blue"), ("surf", "tab:red"))):
            data = [
                [r["pixel error"] for r in mine if r["m"] == m and r["solver"] == s] for m in ms
            ]
            pos = [i + (j - 0.5) * 0.35 for i in range(len(ms))]
            bp = ax.boxplot(data, positions=pos, widths=0.3, patch_artist=True, sym="")
            for box in bp["boxes"]:
                box.set_facecolor(color)
                box.set_alpha(0.6)
            ax.plot(
                [],
                [],
                color=color,
                lw=6,
                alpha=0.6,
                label="Regular Adam" if s == "adam" else "Surfing",
            )
        ax.set_xticks(range(len(ms)), [str(m) for m in ms], fontsize=7)
        ax.set_xlabel("number of measurements m")
        ax.set_ylabel("per-pixel reconstruction error")
        ax.set_title(f"{mine[0]['method'].upper()}, k={mine[0]['k']} ({model_id})", fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def run(args: argparse.Namespace) -> list[dict]:
    rows = [r for model_id in args.models for r in run_model(model_id, args)]
    write_csv(args.out / "fig4_trials.csv", rows)
    table = summarise(rows)
    write_csv(args.out / "fig4.csv", table)
    png = args.out / "fig4_rate_distortion.png"
    plot(rows, png)
    strides = ", ".join(f"{m}: {sensing.describe_stride(args, m)}" for m in args.models)
    keys = sensing.COMMAND_KEYS
    body = (
        "## Figure 4: rate-distortion on held-out test images\n\n"
        f"`{command('fig4', args, keys)}` on {args.device}; checkpoint stride {strides}. "
        "y = a Fashion-MNIST test image (seeded draw), error = ||G(x_T) - y||^2 / n.\n\n"
        "Paper (DCGAN and WGAN, k = 20, 200 trials per m): Fig 4 shows the distribution of "
        "this error against m for surfing (red) and Adam (blue); the text states no numbers "
        "and the OCR'd plot is unreadable, so we compare shapes: the error should fall with m "
        "and level off at the generator's representation error.\n\n"
        + markdown_table(table)
        + f"\n\n![rate-distortion]({link(png, args.results_md)})\n"
    )
    write_section("fig4", body, args.results_md)
    return table
