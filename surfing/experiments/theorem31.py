"""Theorem 3.1, checked empirically: at random initialisation every critical point of
f_0(x) = 1/2 ||A G_0(x) - A y||^2 lies in the ball ||x|| <= C' eps (1 + ||y||), for any y.

The theorem is what makes surfing's first stage safe: whatever the target, descent on the
random network lands near the origin, i.e. at (or very near) the global minimum. We draw
random expansive nets G(x) = V relu(W_2 relu(W_1 x + b_1) + b_2) with N(0, 1/n_i) weights and
biases at growing expansion ratios r = n_i / n_{i-1}, targets y of norms from 0.3 to 30 drawn
independently of the net, and run descent from far-away starts (||x_0|| up to ~(1 + ||y||)
sqrt(k)). The end points' ||x_T|| / (1 + ||y||) should be small and shrink as r grows, like
eps ~ sqrt(n_{i-1} log n_i / n_i) (the width condition of the theorem, solved for eps).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from tqdm import tqdm

from surfing.experiments.common import command, link, pyplot, save_figure
from surfing.experiments.report import markdown_table, write_csv, write_section
from surfing.measure import gaussian_matrix
from surfing.nets import ExpansiveReLUNet

HELP = "Thm 3.1: where gradient descent stops on random expansive nets, vs. width"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=2)
    p.add_argument(
        "--ratios",
        nargs="+",
        type=int,
        default=[2, 4, 8, 16],
        help="expansion ratio r: hidden widths r*k, r^2*k; output n = r^2*k",
    )
    p.add_argument("--nets", type=int, default=5, help="random networks per ratio")
    p.add_argument("--y-norms", nargs="+", type=float, default=[0.3, 1.0, 3.0, 10.0, 30.0])
    p.add_argument("--starts", type=int, default=20, help="descents per (net, y)")
    p.add_argument("--m-frac", type=float, default=0.5, help="Gaussian A has m = m_frac * n rows")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=0.05, help="Adam lr, times (1 + ||y||)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--results-md", type=Path, default=Path("docs/results.md"))
    p.add_argument("--no-progress", action="store_true")


def eps_proxy(dims: list[int]) -> float:
    """The eps the width condition n_i >= C eps^-2 log(1/eps) n_{i-1} log n_i allows, up to
    constants and the log(1/eps) factor: max_i sqrt(n_{i-1} log n_i / n_i)."""
    return max(math.sqrt(a * math.log(b) / b) for a, b in zip(dims[:-1], dims[1:], strict=True))


def descend(
    G: ExpansiveReLUNet,
    A: torch.Tensor | None,
    y: torch.Tensor,
    x0: torch.Tensor,
    steps: int,
    lr: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam with a per-row learning rate lr (B, 1), cosine-annealed to 0 so the iterates
    settle on a critical point instead of orbiting it. Returns (x_T, ||grad f(x_T)||)."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=1.0)  # unit rate: each row's step is rescaled below
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    def f(x: torch.Tensor) -> torch.Tensor:
        out = G(x)
        if A is not None:
            out, target = out @ A.T, y @ A.T
        else:
            target = y
        return 0.5 * (out - target).pow(2).sum(1)

    for _ in range(steps):
        opt.zero_grad()
        f(x).sum().backward()
        # Adam's step size is set by its rate, not by the gradient's scale, so a target of
        # norm 30 needs a 30x larger rate than one of norm 1: rescale each row's step.
        with torch.no_grad():
            before = x.detach().clone()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.copy_(before + (x - before) * lr)
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x).sum(), x)
    return x.detach(), g.norm(dim=1)


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    jobs = [(r, i) for r in args.ratios for i in range(args.nets)]
    for r, i in tqdm(jobs, desc="theorem31 nets", disable=args.no_progress):
        k = args.k
        dims = [k, r * k, r * r * k]
        n = dims[-1]
        seed = args.seed * 1_000_003 + 1000 * r + i
        torch.manual_seed(seed)
        G = ExpansiveReLUNet(k, dims[1:], n).eval()
        for q in G.parameters():
            q.requires_grad_(False)
        g = torch.Generator().manual_seed(seed + 1)
        norms = torch.tensor(args.y_norms).repeat_interleave(args.starts)
        u = torch.randn(len(norms), n, generator=g)
        y = u / u.norm(dim=1, keepdim=True) * norms[:, None]
        scale = (1 + norms)[:, None]
        x0 = (torch.rand(len(norms), k, generator=g) * 2 - 1) * scale
        m = max(1, math.ceil(args.m_frac * n))
        for A in (None, gaussian_matrix(seed, m, n)):
            x, grad = descend(G, A, y, x0, args.steps, args.lr * scale)
            for j in range(len(norms)):
                rows.append(
                    {
                        "ratio": r,
                        "n": n,
                        "eps proxy": eps_proxy(dims),
                        "net": i,
                        "operator": "identity" if A is None else "gaussian",
                        "m": n if A is None else m,
                        "||y||": float(norms[j]),
                        "||x0||": float(x0[j].norm()),
                        "||x_T||": float(x[j].norm()),
                        "ratio ||x_T||/(1+||y||)": float(x[j].norm() / (1 + norms[j])),
                        "grad norm": float(grad[j]),
                    }
                )
    write_csv(args.out / "theorem31_runs.csv", rows)
    summary = summarise(rows)
    write_csv(args.out / "theorem31.csv", summary)
    png = args.out / "theorem31.png"
    plot(rows, summary, png)
    keys = ["k", "ratios", "nets", "y_norms", "starts", "m_frac", "steps", "lr", "seed"]
    body = (
        "## Theorem 3.1: critical points of f_0 at random initialisation\n\n"
        f"`{command('theorem31', args, keys)}` on cpu. Per ratio r: {args.nets} random nets "
        f"k -> r k -> r^2 k -> n = r^2 k, targets y uniform on spheres of radius "
        f"{args.y_norms}, {args.starts} Adam descents each ({args.steps} steps, cosine-"
        "annealed) from x_0 ~ (1 + ||y||) U[-1,1]^k. `max`/`p95`/`median` are of "
        "||x_T|| / (1 + ||y||); `eps proxy` = max_i sqrt(n_{i-1} log n_i / n_i); "
        "`grad p95` = 95th percentile of ||grad f(x_T)|| / (1 + ||y||) (end points are "
        "near-critical when small).\n\n"
        "Paper: with high probability every x outside ||x|| <= C' eps (1 + ||y||) has a "
        "descent direction, for A = I and for Gaussian A; eps shrinks as the layers widen. "
        "Prediction checked here: the ratio is bounded by a constant times eps, i.e. falls "
        "as r grows.\n\n"
        + markdown_table(summary)
        + f"\n\n![end points vs. width]({link(png, args.results_md)})\n"
    )
    write_section("theorem31", body, args.results_md)
    return summary


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for op in ("identity", "gaussian"):
        for r in sorted({row["ratio"] for row in rows}):
            mine = [row for row in rows if row["operator"] == op and row["ratio"] == r]
            v = torch.tensor([row["ratio ||x_T||/(1+||y||)"] for row in mine])
            gn = torch.tensor([row["grad norm"] / (1 + row["||y||"]) for row in mine])
            out.append(
                {
                    "operator": op,
                    "r": r,
                    "n": mine[0]["n"],
                    "m": mine[0]["m"],
                    "eps proxy": mine[0]["eps proxy"],
                    "runs": len(mine),
                    "median": float(v.median()),
                    "p95": float(v.quantile(0.95)),
                    "max": float(v.max()),
                    "max / eps": float(v.max()) / mine[0]["eps proxy"],
                    "grad p95": float(gn.quantile(0.95)),
                }
            )
    return out


def plot(rows: list[dict], summary: list[dict], path: Path) -> None:
    """||x_T|| / (1 + ||y||) against the output width, every run a dot, max as a line."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.3), sharey=True)
    for ax, op, title in zip(axes, ("identity", "gaussian"), ("A = I", "Gaussian A"), strict=True):
        mine = [r for r in rows if r["operator"] == op]
        jitter = torch.linspace(0.93, 1.07, 7)
        ax.scatter(
            [r["n"] * float(jitter[i % 7]) for i, r in enumerate(mine)],
            [max(r["ratio ||x_T||/(1+||y||)"], 1e-6) for r in mine],
            s=3,
            alpha=0.3,
            color="tab:blue",
            label="end points",
        )
        s = [r for r in summary if r["operator"] == op]
        ax.plot([r["n"] for r in s], [r["max"] for r in s], "o-", color="tab:red", label="max")
        ax.plot([r["n"] for r in s], [r["eps proxy"] for r in s], "k--", label="eps proxy")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("output width n = r^2 k")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("||x_T|| / (1 + ||y||)")
    save_figure(fig, path)
