"""What the stall stop of Levenberg–Marquardt costs in fits and saves in evaluations (CPU).

One LM solve on G_T from x_init (no restarts: each target's path is its own), as lm_restarts
runs it, without the stall stop and with each `--stalls` fraction, on exact-recovery targets
(x* from --seed, x_init from --seed + 1, A as surfing.experiments.sensing draws it). For each
fraction: targets fitted (miss test at --rtol) without and with it, the targets it stopped
that fit without it (lost to this solve; the portfolio restarts them), and the evaluations. E.g.

    python bench/lm_stall.py --model dcgan-k10 --m 0 --trials 300
"""

from __future__ import annotations

import argparse

import torch
from recovery import recovery

from surfing.lm import levenberg_marquardt
from surfing.solvers import StageRule, fit_line, not_fitted


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--models-dir")
    p.add_argument("--m", type=int, default=0, help="0 = A = I")
    p.add_argument("--trials", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rtol", type=float, default=1e-4, help="the miss test's threshold")
    p.add_argument("--stalls", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    job = recovery(args.model, args.models_dir, args.m, args.trials, args.seed)
    G, x_init, A, b, k = job.G, job.x_init, job.A, job.b, job.latent_dim
    rule = StageRule()
    line = fit_line(b, args.rtol)

    def solve(stall: float):  # as lm_restarts runs it
        return levenberg_marquardt(
            G, x_init, b, A, max_iters=rule.lm_iters, xtol=rule.lm_xtol,
            radius=rule.radius(k), stall=stall, stall_above=line,
        )  # fmt: skip

    base = solve(0.0)
    fits = ~not_fitted(base.objective, b, args.rtol)
    print(f"{args.model}, m = {args.m or 'I'}, {args.trials} trials, one LM solve from x_init: "
          f"{int(fits.sum())} fitted (miss test {args.rtol:g}), "
          f"{float(base.evals.mean()):.1f} evaluations per target")  # fmt: skip
    print("stall | fitted | fitted without, not with | with, not without | evals / target | saved")
    for stall in args.stalls:
        res = solve(stall)
        got = ~not_fitted(res.objective, b, args.rtol)
        evals = float(res.evals.mean())
        saved = 1 - evals / float(base.evals.mean())
        print(f"{stall:5g} | {int(got.sum()):6d} | {int((fits & ~got).sum()):25d} | "
              f"{int((got & ~fits).sum()):17d} | {evals:14.1f} | {100 * saved:4.0f} %")  # fmt: skip


if __name__ == "__main__":
    main()
