"""Compressed-sensing runs shared by Figures 3 and 4: for each m, surf and Adam on
f(x) = 1/2 ||A G(x) - A y||^2 with a Gaussian A (surfing.measure.gaussian_matrix).

One A is drawn per (seed, m) and used for every trial of that m; it is independent of the
targets and of the starts, which is all the paper's setting needs. The paper takes the
surfing checkpoints every 100 training steps, so the stride over a stored trajectory is
derived from the interval it was recorded at (every=40 gives stride 2 or 3).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch

from surfing.experiments.common import M_GRID, add_common, open_store, solve_batched, surf_with_bar
from surfing.measure import gaussian_matrix
from surfing.solvers import SolveResult, direct
from surfing.trajectory import final_generator, generators

# The flags quoted in the command line of the Fig 3 and Fig 4 sections (same sweep settings).
COMMAND_KEYS = (
    "models", "m", "trials", "every_steps", "schedule", "steps", "final_steps", "direct_steps",
    "lr", "seed",
)


def add_arguments(p: argparse.ArgumentParser, trials: int) -> None:
    p.add_argument("--models", nargs="+", required=True, help="trajectory ids")
    p.add_argument("--m", nargs="+", type=int, default=M_GRID, help="numbers of measurements")
    p.add_argument(
        "--every-steps",
        type=int,
        default=100,
        help="training steps between surfing checkpoints (sets --stride when it is 0)",
    )
    add_common(p, trials=trials, stride=0)


def stride_for(store_every: int, every_steps: int) -> int:
    """Checkpoint stride that comes closest to one surfing stage per `every_steps` steps."""
    return max(1, round(every_steps / max(1, store_every)))


def measurement_matrix(seed: int, m: int, n: int, device: torch.device) -> torch.Tensor:
    """A for one m; the seed is offset so different m never share rows."""
    return gaussian_matrix(seed * 100_003 + m, m, n).to(device)


def sweep(
    model_id: str, args: argparse.Namespace, y: torch.Tensor, x_init: torch.Tensor
) -> Iterator[tuple[int, dict[str, SolveResult]]]:
    """For each m of args.m: (m, {"surf": ..., "adam": ...}) on targets y (N, n) from x_init.

    The same targets and starts serve every m, so the curves differ only by m.
    """
    store = open_store(args)
    manifest = store.manifest(model_id)
    device = torch.device(args.device)
    stride = args.stride or stride_for(int(manifest.training.get("every", 1)), args.every_steps)
    G = final_generator(store, model_id, device)
    stages = generators(store, model_id, stride, device)
    for m in args.m:
        A = measurement_matrix(args.seed, m, y.shape[1], device)
        b = y @ A.T
        q = args.no_progress

        def run_surf(lo: int, hi: int, A: torch.Tensor = A, b: torch.Tensor = b) -> SolveResult:
            return surf_with_bar(stages, b[lo:hi], x_init[lo:hi], A, args, "surf")

        def run_adam(lo: int, hi: int, A: torch.Tensor = A, b: torch.Tensor = b) -> SolveResult:
            return direct(G, b[lo:hi], x_init[lo:hi], A, steps=args.direct_steps, lr=args.lr)

        n = len(y)
        yield (
            m,
            {
                "surf": solve_batched(run_surf, n, args.batch, f"{model_id} m={m} surf", q),
                "adam": solve_batched(run_adam, n, args.batch, f"{model_id} m={m} adam", q),
            },
        )


def describe_stride(args: argparse.Namespace, model_id: str) -> int:
    """The stride sweep() used, for the report."""
    store = open_store(args)
    every = int(store.manifest(model_id).training.get("every", 1))
    return args.stride or stride_for(every, args.every_steps)
