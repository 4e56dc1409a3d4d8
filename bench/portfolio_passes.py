"""Where the default's time goes: wall seconds per pass of one portfolio solve (CPU).

Times the passes of `surf(schedule="portfolio")` on surf_bench's batch (x*, x_init from --seed
and --seed + 1, Gaussian A from --seed + 2) through its progress callbacks: the first LM on
G_T, each restart round, the surf of the targets still unfitted (all its stages together) and
its rescue. Once with each --stalls value of StageRule.lm_stall. E.g.

    python bench/portfolio_passes.py --model dcgan-k10 --m 0 --threads 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from models_store import ModelStore, default_store_root
from surfing.lm import levenberg_marquardt
from surfing.measure import gaussian_matrix
from surfing.results import SolveResult, StageTrace
from surfing.solvers import StageRule, surf, uniform_latents
from surfing.trajectory import Generators, final_generator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--models-dir")
    p.add_argument("--m", type=int, default=0, help="0 = A = I")
    p.add_argument("--targets", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stalls", type=float, nargs="+", default=[0.0, StageRule.lm_stall])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = args.models_dir or default_store_root()
    store = ModelStore(root)
    manifest = store.manifest(args.model)
    k = manifest.latent_dim
    G = final_generator(store, args.model)
    x_star = uniform_latents(args.targets, k, args.seed)
    x_init = uniform_latents(args.targets, k, args.seed + 1)
    A = gaussian_matrix(args.seed + 2, args.m, manifest.n_pixels) if args.m else None
    with torch.no_grad():
        y = G(x_star).flatten(1)
    b = y if A is None else y @ A.T
    levenberg_marquardt(G, x_init, b, A, max_iters=2)  # warm the process, as surf_bench does
    print(f"{args.model}, m = {args.m or 'I'}, {args.targets} targets, {args.threads} threads")
    for stall in args.stalls:
        stages = Generators(ModelStore(root), args.model)  # a fresh store, as a new process
        total, seconds, res = timed(lambda progress, stages=stages, stall=stall: surf(
            stages, b, x_init, A, schedule="portfolio", progress=progress,
            rule=StageRule(lm_stall=stall)))  # fmt: skip
        ok = float(((res.x - x_star).norm(dim=1) < 0.01).float().mean())
        parts = ", ".join(f"{n} {s:.2f} s ({100 * s / total:.0f} %)" for n, s in seconds.items())
        print(f"lm_stall {stall:g}: {total:.2f} s, success {100 * ok:.0f} %, "
              f"{res.evals} evals per target: {parts}")  # fmt: skip


def timed(solve: Callable[[Callable[[StageTrace], None]], SolveResult]):
    """(total seconds, seconds per pass name, result) of solve(progress)."""
    seconds: dict[str, float] = {}
    t0 = last = time.perf_counter()

    def progress(info: StageTrace) -> None:
        nonlocal last
        now = time.perf_counter()
        name = info.pass_name + ("" if info.pass_round is None else f" {info.pass_round}")
        seconds[name] = seconds.get(name, 0.0) + now - last
        last = now

    res = solve(progress)
    return time.perf_counter() - t0, seconds, res

if __name__ == "__main__":
    main()
