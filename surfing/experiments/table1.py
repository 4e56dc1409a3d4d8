"""Table 1: how often surfing vs. direct Adam recovers x* exactly (||x_T - x*|| < 0.01).

For each trajectory: x*, x_init ~ U[-1,1]^k, y = G_T(x*). Surfing, Adam on G_T from the same
x_init, and Adam with R random restarts (R chosen so it spends at least as many generator
evaluations as surfing) all run on the same trials.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch

from models_store import ModelStore, default_store_root
from surfing.experiments.common import link, pyplot, save_figure, solve_batched
from surfing.experiments.report import markdown_table, write_csv, write_section
from surfing.solvers import SolveResult, direct, direct_restarts, surf, uniform_latents
from surfing.trajectory import final_generator, generators

HELP = "Table 1: exact recovery rate, surf vs. Adam vs. Adam with restarts"
SUCCESS = 0.01

# Paper, Table 1: percent of 300 trials with ||x_T - x*|| < 0.01, as (Adam, surfing).
PAPER = {
    ("vae", 5): (99.3, 99.3),
    ("vae", 10): (100.0, 100.0),
    ("vae", 20): (100.0, 100.0),
    ("dcgan", 5): (50.3, 91.3),
    ("dcgan", 10): (69.3, 96.7),
    ("dcgan", 20): (67.7, 99.3),
    ("wgan", 5): (48.3, 86.7),
    ("wgan", 10): (75.0, 99.3),
    ("wgan", 20): (91.0, 100.0),
    ("wgan-gp", 5): (46.7, 92.0),
    ("wgan-gp", 10): (63.7, 97.7),
    ("wgan-gp", 20): (69.7, 99.0),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", required=True, help="trajectory ids")
    p.add_argument("--trials", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20, help="Adam steps per surfing stage")
    p.add_argument("--final-steps", type=int, default=1000)
    p.add_argument("--direct-steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--fast", action="store_true",
                   help="also run surfing with the default (adaptive) schedule")
    p.add_argument("--stride", type=int, default=1)
    p.add_argument(
        "--restarts",
        type=int,
        default=0,
        help="Adam restarts (0 = match surfing's generator evaluations)",
    )
    p.add_argument("--batch", type=int, default=300, help="trials solved per batch")
    p.add_argument("--merge", action="store_true",
                   help="keep other models' rows already in OUT/table1.csv (one model per run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--results-md", type=Path, default=Path("docs/results.md"))


def _timed(fn, n: int, batch: int, desc: str) -> tuple[SolveResult, float]:
    """solve_batched over the trials, with its wall time."""
    t0 = time.perf_counter()
    res = solve_batched(fn, n, batch, desc)
    return res, time.perf_counter() - t0


def run_model(
    store: ModelStore, model_id: str, args: argparse.Namespace
) -> tuple[list[dict], dict, dict[str, torch.Tensor]]:
    """All three solvers on the same trials of one trajectory.

    Returns per-trial rows, the summary row and each solver's distances to x*."""
    manifest = store.manifest(model_id)
    k, device = manifest.latent_dim, torch.device(args.device)
    G = final_generator(store, model_id, device)
    x_star = uniform_latents(args.trials, k, args.seed, device)
    x_init = uniform_latents(args.trials, k, args.seed + 1, device)
    with torch.no_grad():
        b = G(x_star).flatten(1)
    stages = generators(store, model_id, args.stride, device)
    surf_evals = (len(stages) - 1) * args.steps + args.final_steps
    restarts = args.restarts or max(1, math.ceil(surf_evals / args.direct_steps))

    runs = {
        "surf": lambda lo, hi: surf(
            stages,
            b[lo:hi],
            x_init[lo:hi],
            steps=args.steps,
            lr=args.lr,
            final_steps=args.final_steps,
            schedule="paper",
        ),
        "adam": lambda lo, hi: direct(
            G, b[lo:hi], x_init[lo:hi], steps=args.direct_steps, lr=args.lr
        ),
        f"adam x{restarts}": lambda lo, hi: direct_restarts(
            G,
            b[lo:hi],
            restarts,
            seed=args.seed + 2 + lo,
            x_init=x_init[lo:hi],
            steps=args.direct_steps,
            lr=args.lr,
        ),
    }
    if args.fast:
        runs["surf-fast"] = lambda lo, hi: surf(
            stages, b[lo:hi], x_init[lo:hi], steps=args.steps, lr=args.lr, schedule="auto"
        )
    dist, summary = (
        {},
        {
            "model": model_id,
            "method": manifest.training.get("method", "?"),
            "k": k,
            "checkpoints": len(stages),
        },
    )
    paper = PAPER.get((summary["method"], k), (float("nan"), float("nan")))
    for name, fn in runs.items():
        res, seconds = _timed(fn, args.trials, args.batch, f"{model_id} {name}")
        d = (res.x - x_star).norm(dim=1).cpu()
        dist[name] = d
        summary[f"{name} %"] = 100.0 * float((d < SUCCESS).float().mean())
        summary[f"{name} median dist"] = float(d.median())
        summary[f"{name} s"] = round(seconds, 1)
        summary[f"{name} evals"] = res.evals
        print(
            f"  {model_id} {name:10s} success {summary[f'{name} %']:5.1f}%  "
            f"median ||x-x*|| {float(d.median()):.4f}  {seconds:.1f}s",
            flush=True,
        )
    summary["paper adam %"], summary["paper surf %"] = paper
    trials = [
        {"model": model_id, "trial": i, **{f"dist {n}": float(d[i]) for n, d in dist.items()}}
        for i in range(args.trials)
    ]
    return trials, summary, dist


def plot_histograms(dists: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    """The paper's Fig 2/5: distribution of ||x_T - x*|| for surf vs. Adam, one panel a model."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(dists), figsize=(4 * len(dists), 3), squeeze=False)
    for ax, (model_id, d) in zip(axes[0], dists.items(), strict=False):
        hi = max(float(v.max()) for v in d.values()) or 1.0
        bins = torch.linspace(0, hi, 30).tolist()
        for name, color in (("adam", "tab:blue"), ("surf", "tab:red")):
            ax.hist(
                d[name].tolist(),
                bins=bins,
                alpha=0.6,
                color=color,
                label="Regular Adam" if name == "adam" else "Surfing",
            )
        ax.set_title(model_id)
        ax.set_xlabel("distance to the truth")
        ax.set_ylabel("trials")
        ax.legend()
    save_figure(fig, path)


def run(args: argparse.Namespace) -> list[dict]:
    store = ModelStore(args.models_dir or default_store_root())
    trials, summaries, dists = [], [], {}
    for model_id in args.models:
        t, s, d = run_model(store, model_id, args)
        trials += t
        summaries.append(s)
        dists[model_id] = d
    tag = "" if not args.merge else "_" + "_".join(args.models)
    write_csv(args.out / f"table1_trials{tag}.csv", trials)
    plot_histograms(dists, args.out / f"table1_distances{tag}.png")
    if args.merge and (args.out / "table1.csv").exists():
        with (args.out / "table1.csv").open() as f:
            kept = [r for r in csv.DictReader(f) if r["model"] not in args.models]
        summaries = kept + summaries
    write_csv(args.out / "table1.csv", summaries)
    figure = link(args.out / f"table1_distances{tag}.png", args.results_md)
    body = (
        "## Table 1: exact recovery (||x_T - x*|| < 0.01)\n\n"
        f"`surfing experiment table1 --models {' '.join(args.models)} --trials {args.trials} "
        f"--steps {args.steps} --final-steps {args.final_steps} --direct-steps {args.direct_steps} "
        f"--lr {args.lr} --stride {args.stride} --seed {args.seed}` on {args.device}. "
        "`surf` = the paper's schedule (fixed Adam steps per checkpoint); `surf-fast` = the "
        "schedule `auto` (lm-stride + rescue; the default until issue 16, docs/performance.md); "
        "`adam xR` = Adam from R starts (the first is x_init), R matched to surfing's "
        "generator evaluations; lowest objective kept."
        "\n\n"
        + markdown_table(summaries)
        + f"\n\n![distance to truth]({figure})\n"
    )
    write_section("table1", body, args.results_md)
    return summaries
