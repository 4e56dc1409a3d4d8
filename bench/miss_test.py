"""Does the portfolio's miss test see every target its first phase got wrong? (CPU, by hand.)

Runs the default's first phase alone -- `lm_restarts` on G_T with the portfolio's rounds and
salt -- on exact-recovery targets (x* from --seed, x_init from --seed + 1, A as
surfing.experiments.sensing draws it) and prints the relative residual ||A G(x) - b||^2 /
||b||^2 of the successes (||x - x*|| < 0.01) and of the misses. A miss below the test's
threshold (StageRule.rescue_rtol = 1e-4) is never surfed. E.g.

    python bench/miss_test.py --model dcgan-k10 --m 50 --trials 200
"""

from __future__ import annotations

import argparse

import torch
from recovery import recovery

from surfing.portfolio import FIRST_PHASE_SALT, PORTFOLIO_ROUNDS
from surfing.restarts import lm_restarts
from surfing.solvers import StageRule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--models-dir")
    p.add_argument("--m", type=int, default=50, help="0 = A = I")
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--thresholds",
        type=float,
        nargs="*",
        default=[1e-4, 1e-5, 1e-6],
        help="miss-test thresholds to compare",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    job = recovery(args.model, args.models_dir, args.m, args.trials, args.seed)
    G, x_star, x_init, A, b, prior = job.G, job.x_star, job.x_init, job.A, job.b, job.prior
    res = lm_restarts(G, b, x_init, A, PORTFOLIO_ROUNDS, seed=FIRST_PHASE_SALT, prior=prior)
    rel = 2 * res.objective / b.pow(2).sum(dim=1)
    dist = (res.x - x_star).norm(dim=1)
    hit = dist < 0.01
    threshold = StageRule().rescue_rtol
    assert threshold is not None
    print(f"{args.model}, m = {args.m or 'I'}, {args.trials} trials, lm_restarts with "
          f"{PORTFOLIO_ROUNDS} rounds: {int(hit.sum())} successes")  # fmt: skip
    if hit.any():
        print(f"largest relative residual of a success: {float(rel[hit].max()):.2e}")
    order = rel[~hit].argsort()
    pairs = zip(rel[~hit][order], dist[~hit][order], strict=True)
    misses = [(float(r), float(d)) for r, d in pairs]
    hidden = [m for m in misses if m[0] <= threshold]
    print(f"misses: {len(misses)}; at or below the miss test's {threshold:g} (never surfed): "
          f"{len(hidden)}")  # fmt: skip
    # A threshold trades the misses it lets through (never surfed) against the successes it
    # sends to the expensive second phase for nothing.
    print("threshold | misses at or below it (never surfed) | successes above it (surfed anyway)")
    for t in args.thresholds:
        above = int((rel[hit] > t).sum())
        print(f"{t:9.0e} | {sum(m[0] <= t for m in misses):36d} | {above:34d}")
    for r, d in misses:
        print(f"  miss: relative residual {r:.1e}, ||x - x*|| {d:.3g}")


if __name__ == "__main__":
    main()
