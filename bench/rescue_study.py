"""What a second pass on `lm`'s misses buys: residual separation and four ways to rescue.

For each trial set (seed S, N trials: x* from S, x_init from S + 1, A from S + 2, as
bench/surf_bench.py) the first pass is `lm` without the rescue, over all targets. Two tables:

1. How the relative residual ||A G_T(x) - b||^2 / ||b||^2 splits `lm`'s successes
   (||x_T - x*|| < 0.01) from its misses: the largest residual of a success, the smallest of
   a miss, and how many targets sit on the wrong side of surf's rescue threshold
   (StageRule.rescue_rtol, 1e-4). If the two never overlap, a miss can be seen without x*.
2. Four second passes on the targets `lm` missed: the paper schedule and `adaptive` with 20
   Adam steps per stage + LM from the same start, `lm` from a fresh start (restart_latents,
   the start surf's own rescue uses), and `lm` with 3 trials per stage from the same start;
   how many misses each solved, its wall time as a share of the first pass over all
   targets, and its evaluations per missed target. No pass here has the rescue itself.

Not a timed test: run it by hand, e.g.

    python bench/rescue_study.py --model dcgan-k10 --m 50 --sets 0:100 10:200 20:200 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch
from surf_bench import SUCCESS

from models_store import ModelStore, default_store_root
from surfing.measure import gaussian_matrix
from surfing.solvers import SolveResult, StageRule, restart_latents, surf, uniform_latents
from surfing.trajectory import final_generator, generators

NO_RESCUE = StageRule(rescue_rtol=None)
THRESHOLD = float(StageRule().rescue_rtol or 0.0)  # the rescue's default threshold, 1e-4

# name -> (schedule, rule, whether the pass starts afresh instead of from the same x_init)
VARIANTS: dict[str, tuple[str, StageRule, bool]] = {
    "paper schedule, same start": ("paper", NO_RESCUE, False),
    "`adaptive` with 20 Adam steps per stage + LM, same start": (
        "adaptive",
        StageRule(min_steps=20, rescue_rtol=None),
        False,
    ),
    "`lm` from a fresh start": ("lm", NO_RESCUE, True),
    "`lm` with 3 trials per stage, same start": (
        "lm",
        StageRule(lm_stage_trials=3, rescue_rtol=None),
        False,
    ),
}


@dataclass
class Trials:
    """One trial set: targets, starts, operator and the final network to measure residuals."""

    seed: int
    x_star: torch.Tensor
    x_init: torch.Tensor
    b: torch.Tensor
    A: torch.Tensor | None
    G: torch.nn.Module

    def label(self) -> str:
        s = self.seed
        return f"seeds {s}/{s + 1}/{s + 2}, {self.x_star.shape[0]}"

    def residual(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """||A G_T(x) - b||^2 / ||b||^2 for the targets idx, computed afresh on G_T."""
        with torch.no_grad():
            y = self.G(x).flatten(1)
        fx = y if self.A is None else y @ self.A.T
        b = self.b[idx]
        return (fx - b).pow(2).sum(dim=1) / b.pow(2).sum(dim=1)

    def solved(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return (x - self.x_star[idx]).norm(dim=1) < SUCCESS


@dataclass
class SetResult:
    trials: Trials
    first_seconds: float
    ok: torch.Tensor
    rel: torch.Tensor
    passes: dict[str, tuple[int, float, int]] = field(default_factory=dict)  # solved, s, evals


def make_trials(store: ModelStore, model_id: str, m: int, seed: int, n: int) -> Trials:
    manifest = store.manifest(model_id)
    G = final_generator(store, model_id)
    x_star = uniform_latents(n, manifest.latent_dim, seed)
    x_init = uniform_latents(n, manifest.latent_dim, seed + 1)
    A = gaussian_matrix(seed + 2, m, manifest.n_pixels) if m else None
    with torch.no_grad():
        y = G(x_star).flatten(1)
    return Trials(seed, x_star, x_init, y if A is None else y @ A.T, A, G)


def timed(call: Callable[..., SolveResult], *args: object) -> tuple[SolveResult, float]:
    t0 = time.perf_counter()
    res = call(*args)
    return res, time.perf_counter() - t0


def study(store: ModelStore, args: argparse.Namespace, seed: int, n: int) -> SetResult:
    """The first `lm` pass over all targets, then each second pass on its misses."""
    tr = make_trials(store, args.model, args.m, seed, n)
    everyone = torch.arange(n)

    def run(x0: torch.Tensor, idx: torch.Tensor, schedule: str, rule: StageRule) -> SolveResult:
        stream = generators(store, args.model)
        return surf(stream, tr.b[idx], x0, tr.A, schedule=schedule, rule=rule)

    first, secs = timed(run, tr.x_init, everyone, "lm", NO_RESCUE)
    out = SetResult(tr, secs, tr.solved(first.x, everyone), tr.residual(first.x, everyone))
    print(f"  {tr.label()}: lm {int(out.ok.sum())}/{n} in {secs:.1f} s", flush=True)
    missed = (~out.ok).nonzero().squeeze(1)
    for name, (schedule, rule, fresh) in VARIANTS.items():
        if missed.numel() == 0:
            out.passes[name] = (0, 0.0, 0)
            continue
        start = restart_latents(tr.x_init[missed], 1) if fresh else tr.x_init[missed]
        res, dt = timed(run, start, missed, schedule, rule)
        out.passes[name] = (int(tr.solved(res.x, missed).sum()), dt, res.evals)
        print(f"    {name}: {out.passes[name][0]}/{missed.numel()} in {dt:.1f} s", flush=True)
    return out


def separation_table(results: list[SetResult], m: int) -> str:
    op = "A = I" if not m else f"m = {m}"
    lines = [
        f"| trials ({op}) | `lm` solved | largest relative residual of a success | `lm` missed "
        f"| smallest relative residual of a miss | on the wrong side of {THRESHOLD:.0e} |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        hit, miss = r.rel[r.ok], r.rel[~r.ok]
        worst_hit = f"{float(hit.max()):.1e}" if hit.numel() else "–"
        best_miss = f"{float(miss.min()):.1e}" if miss.numel() else "–"
        wrong = int((hit > THRESHOLD).sum()) + int((miss <= THRESHOLD).sum())
        lines.append(
            f"| {r.trials.label()} | {hit.numel()} | {worst_hit} | {miss.numel()} | "
            f"{best_miss} | {wrong} |"
        )
    return "\n".join(lines)


def rescue_table(results: list[SetResult]) -> str:
    lines = [
        "| set | misses | " + " | ".join(VARIANTS) + " |",
        "|" + "---|" * (2 + len(VARIANTS)),
    ]
    for r in results:
        cells = [
            f"{solved} ({secs / r.first_seconds:.2f}×, {evals} evals)"
            for solved, secs, evals in r.passes.values()
        ]
        misses = int((~r.ok).sum())
        lines.append(f"| {r.trials.label()} | {misses} | " + " | ".join(cells) + " |")
    first = ", ".join(f"{r.trials.label()}: {r.first_seconds:.1f} s" for r in results)
    lines.append(f"\nfirst `lm` pass over all targets: {first}")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {load}"
    )


def parse_set(spec: str) -> tuple[int, int]:
    seed, _, n = spec.partition(":")
    return int(seed), int(n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--models-dir")
    p.add_argument("--m", type=int, default=50, help="rows of the Gaussian A; 0 = identity")
    p.add_argument("--sets", nargs="+", default=["0:100"], help="seed:trials, e.g. 10:200")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    store = ModelStore(args.models_dir or default_store_root())
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"$ python {shlex.join(sys.argv)}\n{now}\n{machine()}", flush=True)
    warm = make_trials(store, args.model, args.m, 0, 2)  # untimed: page cache, first calls
    surf(generators(store, args.model), warm.b, warm.x_init, warm.A, schedule="lm", rule=NO_RESCUE)
    results = [study(store, args, *parse_set(s)) for s in args.sets]
    print(f"\n{separation_table(results, args.m)}\n\n{rescue_table(results)}")
    done = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\nfinished {done}; {machine()}", flush=True)


if __name__ == "__main__":
    main()
