"""Compute-matched baselines (beyond the paper): is surfing better than spending the same
generator evaluations on random restarts of Adam?

Per trajectory, on the same trials (x*, x_init ~ U[-1,1]^k, y = G_T(x*)):
- `surf`: Algorithm 3.1, S generator evaluations per target;
- `adam x1`: the paper's baseline, one Adam run of --direct-steps from x_init;
- `adam xR =`: R Adam runs of ceil(S / R) steps each (the first from x_init): S evaluations,
  the same as surfing, split R ways -- the reviewer's "restarts instead of stages";
- `restarts xH`: H Adam runs of --direct-steps from fresh random starts;
- `hybrid`: surfing.solvers.hybrid, i.e. surf + `restarts xH`, both polished to convergence
  by Levenberg–Marquardt (solvers.polish), lowest objective per target.

`hybrid` is formed here from the surf and `restarts xH` rows with solvers.hybrid's rule
(polish both, lowest objective per target), which halves the cost and keeps the parts
identical to the rows beside it; tests/test_experiments.py checks the rule against
solvers.hybrid. By construction its objective is never above either part's on any trial; the
report counts violations (there must be none).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import torch

from surfing.experiments.common import (
    COMMON_KEYS,
    SUCCESS,
    add_common,
    command,
    link,
    method_of,
    open_store,
    pyplot,
    save_figure,
    solve_batched,
    surf_with_bar,
)
from surfing.experiments.report import markdown_table, wilson_interval, write_csv, write_section
from surfing.solvers import SolveResult, direct, direct_restarts, polish, uniform_latents
from surfing.trajectory import final_generator, generators

HELP = "Compute-matched baselines: surf vs. Adam x1 vs. Adam xR (equal evals) vs. hybrid"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", required=True, help="trajectory ids")
    p.add_argument(
        "--restarts",
        nargs="+",
        type=int,
        default=[2, 4],
        help="R values for Adam xR at surfing's evaluation budget",
    )
    p.add_argument("--hybrid-restarts", type=int, default=1, help="H: restarts inside hybrid")
    add_common(p, trials=300)


def keep_best(a: SolveResult, b: SolveResult) -> SolveResult:
    """Per target, the lower objective (ties keep a) -- solvers.hybrid's rule."""
    better = b.objective < a.objective
    return SolveResult(
        torch.where(better[:, None], b.x, a.x),
        torch.where(better, b.objective, a.objective),
        a.evals + b.evals,
    )


def rows_of(r: SolveResult, lo: int, hi: int) -> SolveResult:
    """Targets lo..hi of a batched result (for solving a follow-up step in batches)."""
    return SolveResult(r.x[lo:hi], r.objective[lo:hi], r.evals)


def run_model(model_id: str, args: argparse.Namespace) -> list[dict]:
    store = open_store(args)
    method, k = method_of(store, model_id)
    device = torch.device(args.device)
    G = final_generator(store, model_id, device)
    x_star = uniform_latents(args.trials, k, args.seed, device)
    x_init = uniform_latents(args.trials, k, args.seed + 1, device)
    with torch.no_grad():
        b = G(x_star).flatten(1)
    stages = generators(store, model_id, args.stride, device)
    n, batch, q = args.trials, args.batch, args.no_progress

    def solve(name: str, fn: Callable[[int, int], SolveResult]) -> SolveResult:
        return solve_batched(fn, n, batch, f"{model_id} {name}", q)

    res: dict[str, SolveResult] = {
        "surf": solve(
            "surf",
            lambda lo, hi: surf_with_bar(stages, b[lo:hi], x_init[lo:hi], None, args, "surf"),
        ),
        "adam x1": solve(
            "adam",
            lambda lo, hi: direct(G, b[lo:hi], x_init[lo:hi], steps=args.direct_steps, lr=args.lr),
        ),
    }
    S = res["surf"].evals  # the budget the restart baselines are matched to
    for R in args.restarts:
        steps = math.ceil(S / R)
        res[f"adam x{R} ="] = solve(
            f"adam x{R}",
            lambda lo, hi, R=R, steps=steps: direct_restarts(
                G,
                b[lo:hi],
                R,
                seed=args.seed + 2 + lo,
                x_init=x_init[lo:hi],
                steps=steps,
                lr=args.lr,
            ),
        )
    H = args.hybrid_restarts
    restarts = solve(
        f"restarts x{H}",
        lambda lo, hi: direct_restarts(
            G, b[lo:hi], H, seed=args.seed + 3 + lo, steps=args.direct_steps, lr=args.lr
        ),
    )
    res[f"restarts x{H}"] = restarts
    res["hybrid"] = keep_best(
        solve("polish surf", lambda lo, hi: polish(G, rows_of(res["surf"], lo, hi), b[lo:hi])),
        solve("polish restarts", lambda lo, hi: polish(G, rows_of(restarts, lo, hi), b[lo:hi])),
    )

    parts_min = torch.minimum(res["surf"].objective, restarts.objective)
    violations = int((res["hybrid"].objective > parts_min + 1e-7).sum())
    rows = []
    for name, r in res.items():
        d = (r.x - x_star).norm(dim=1).cpu()
        wins = int((d < SUCCESS).sum())
        lo, hi = wilson_interval(wins, n)
        rows.append(
            {
                "model": model_id,
                "method": method,
                "k": k,
                "solver": name,
                "evals / target": r.evals,
                "success %": 100.0 * wins / n,
                "95% CI": f"{100 * lo:.0f}-{100 * hi:.0f}",
                "median dist": float(d.median()),
                "median objective": float(r.objective.median()),
                "hybrid worse than a part": violations if name == "hybrid" else "",
            }
        )
        print(f"  {model_id} {name:12s} {100.0 * wins / n:5.1f}%  evals {r.evals}", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Success rate against generator evaluations, one marker per solver, one panel a model."""
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.3), squeeze=False)
    for ax, model_id in zip(axes[0], models, strict=True):
        for r in (r for r in rows if r["model"] == model_id):
            ax.scatter(r["evals / target"], r["success %"], s=30)
            ax.annotate(
                r["solver"],
                (r["evals / target"], r["success %"]),
                fontsize=7,
                xytext=(4, 2),
                textcoords="offset points",
            )
        ax.set_xlabel("generator evaluations per target")
        ax.set_ylabel("success % (||x_T - x*|| < 0.01)")
        ax.set_ylim(-3, 103)
        ax.set_title(model_id, fontsize=9)
    save_figure(fig, path)


def run(args: argparse.Namespace) -> list[dict]:
    rows = [r for model_id in args.models for r in run_model(model_id, args)]
    write_csv(args.out / "baselines.csv", rows)
    png = args.out / "baselines.png"
    plot(rows, png)
    keys = ["models", "restarts", "hybrid_restarts", "trials", *COMMON_KEYS]
    body = (
        "## Compute-matched baselines (not in the paper)\n\n"
        f"`{command('baselines', args, keys)}` on {args.device}. `adam xR =` spends exactly "
        "surfing's generator evaluations split over R starts (the first is x_init); "
        "`restarts xH` is H full-length Adam runs from fresh U[-1,1]^k starts; `hybrid` = surf "
        "+ `restarts xH`, both polished to convergence by Levenberg–Marquardt "
        "(`solvers.polish`), lowest objective kept per target (`hybrid worse than a part` counts "
        "trials where its objective exceeds min(surf, restarts) -- must be 0).\n\n"
        + markdown_table(rows)
        + f"\n\n![success vs. evaluations]({link(png, args.results_md)})\n"
    )
    write_section("baselines", body, args.results_md)
    return rows
