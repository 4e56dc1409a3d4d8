"""Which rule for the first stages: success of surfing variants on several trajectories.

For each model and operator (A = I, Gaussian A with m rows), every variant solves the same
trials (x* from --seed, x_init from --seed + 1, A from --seed + 2, as bench/surf_bench.py),
and the table gives success (||x_T - x*|| < 0.01) with a 95 % Wilson interval, evaluations
per target, the 95th percentile over targets of the largest ||x|| along the path (a
Gauss–Newton step on the random initialisation shows up here), and, against the first
variant, the trials only one of the two solved. Not a timed test: run it by hand, e.g.

    python bench/early_stages.py --models dcgan-k10 vae-k10 --trials 200 \
        --variants paper lm-stride:head_stages=0 lm-stride:head_stages=1

Variants are surf_bench's: a schedule, optionally with StageRule overrides after a colon.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from surf_bench import SUCCESS, parse_variant

from models_store import ModelStore, default_store_root
from surfing.experiments.report import wilson_interval
from surfing.measure import gaussian_matrix
from surfing.solvers import StageRule, surf, uniform_latents
from surfing.trajectory import final_generator, generators


def solve(
    store: ModelStore,
    model_id: str,
    variant: str,
    b: torch.Tensor,
    x_init: torch.Tensor,
    A: torch.Tensor | None,
    args: argparse.Namespace,
) -> tuple[torch.Tensor, float, torch.Tensor, float]:
    """(x_T, evals per target, largest ||x|| along each target's path, seconds), in batches."""
    schedule, rule, *_ = parse_variant(variant, StageRule())
    xs, evals, peaks = [], 0.0, []
    t0 = time.perf_counter()
    for lo in range(0, b.shape[0], args.batch):
        hi = min(lo + args.batch, b.shape[0])
        res = surf(
            generators(store, model_id),
            b[lo:hi],
            x_init[lo:hi],
            A,
            steps=args.steps,
            final_steps=args.final_steps,
            schedule=schedule,
            rule=rule,
        )
        xs.append(res.x)
        evals += res.evals * (hi - lo)
        peaks.append(torch.stack([t.x_norm for t in res.trace]).amax(dim=0))
    return torch.cat(xs), evals / b.shape[0], torch.cat(peaks), time.perf_counter() - t0


def run(store: ModelStore, model_id: str, m: int, args: argparse.Namespace) -> list[dict]:
    manifest = store.manifest(model_id)
    k = manifest.latent_dim
    G = final_generator(store, model_id)
    x_star = uniform_latents(args.trials, k, args.seed)
    x_init = uniform_latents(args.trials, k, args.seed + 1)
    A = gaussian_matrix(args.seed + 2, m, manifest.n_pixels) if m else None
    with torch.no_grad():
        y = G(x_star).flatten(1)
    b = y if A is None else y @ A.T
    op = "A = I" if A is None else f"m = {m}"
    rows, first = [], None
    for variant in args.variants:
        x, evals, peak, secs = solve(store, model_id, variant, b, x_init, A, args)
        ok = (x - x_star).norm(dim=1) < SUCCESS
        first = ok if first is None else first
        lo, hi = wilson_interval(int(ok.sum()), len(ok))
        row = {
            "model": model_id,
            "operator": op,
            "variant": variant,
            "trials": len(ok),
            "success %": 100 * float(ok.float().mean()),
            "95% CI": f"{100 * lo:.1f}-{100 * hi:.1f}",
            "evals/target": round(evals),
            "p95 max norm x": float(peak.quantile(0.95)),
            "only this": int((ok & ~first).sum()),
            "only first": int((first & ~ok).sum()),
            "seconds": round(secs, 1),
        }
        rows.append(row)
        print(" | ".join(str(v) for v in row.values()), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--models-dir")
    p.add_argument("--m", type=int, nargs="+", default=[0, 50], help="0 = identity")
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=["paper", "auto"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--final-steps", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--csv", type=Path, help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    store = ModelStore(args.models_dir or default_store_root())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    rows = [r for model in args.models for m in args.m for r in run(store, model, m, args)]
    print("\n| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for r in rows:
        cells = [f"{v:.1f}" if isinstance(v, float) else str(v) for v in r.values()]
        print("| " + " | ".join(cells) + " |")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
