"""Plumbing shared by the experiments: common flags, batched solving with a progress bar,
trial draws, figure saving and the command line quoted in docs/results.md.

Kept apart from the experiments so each experiment module reads as its science only.
"""

from __future__ import annotations

import argparse
import inspect
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models_store import ModelStore, default_store_root
from surfing.solvers import SolveResult, StageTrace, surf
from surfing.trajectory import Generators

SUCCESS = 0.01  # the paper's exact-recovery threshold on ||x_T - x*||
M_GRID = [10, 20, 30, 40, 50, 70, 100, 200, 400]  # the paper's numbers of measurements


# The shared solver flags (from add_common) quoted in each section's command line, in order.
COMMON_KEYS = ("schedule", "steps", "final_steps", "direct_steps", "lr", "stride", "seed")


def add_common(p: argparse.ArgumentParser, trials: int | None, stride: int = 1) -> None:
    """Flags every trajectory experiment shares (defaults = the paper's settings);
    trials=None for an experiment with a fixed set of targets (no --trials/--batch)."""
    if trials is not None:
        p.add_argument("--trials", type=int, default=trials)
        p.add_argument("--batch", type=int, default=300, help="trials solved per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20, help="Adam steps per surfing stage")
    p.add_argument("--final-steps", type=int, default=1000, help="Adam steps on the last net")
    p.add_argument("--direct-steps", type=int, default=2000, help="Adam steps of the baseline")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--stride", type=int, default=stride, help="use every j-th checkpoint")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--results-md", type=Path, default=Path("docs/results.md"))
    p.add_argument("--models-dir")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_schedule(p)


def add_schedule(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--schedule",
        default="paper",
        help="surfing schedule passed to solvers.surf (default: the paper's fixed Adam steps)",
    )


def schedule(args: argparse.Namespace) -> dict[str, str]:
    """surf(schedule=...) when the solvers offer a choice of schedule, else nothing.

    surf may default to a faster adaptive schedule; reproducing the paper needs its fixed
    `steps` Adam steps per stage and `final_steps` on the last network."""
    if "schedule" in inspect.signature(surf).parameters:
        return {"schedule": args.schedule}
    if args.schedule != "paper":
        raise ValueError("this version of surfing.solvers.surf has only the paper's schedule")
    return {}


def open_store(args: argparse.Namespace) -> ModelStore:
    return ModelStore(getattr(args, "models_dir", None) or default_store_root())


def method_of(store: ModelStore, model_id: str) -> tuple[str, int]:
    """(training method, latent dim) of a trajectory: the key of the paper's tables."""
    m = store.manifest(model_id)
    return str(m.training.get("method", "?")), m.latent_dim


def solve_batched(
    fn: Callable[[int, int], SolveResult], n: int, batch: int, desc: str, quiet: bool = False
) -> SolveResult:
    """Run fn(lo, hi) over chunks of the n trials and stitch the results together.

    Every solver is independent per target, so chunking changes memory use, not answers."""
    parts = []
    for lo in tqdm(range(0, n, batch), desc=desc, disable=quiet or n <= batch, leave=False):
        parts.append(fn(lo, min(n, lo + batch)))
    x = torch.cat([p.x for p in parts])
    f = torch.cat([p.objective for p in parts])
    return SolveResult(x, f, parts[0].evals)


def surf_with_bar(
    stages: Generators,
    b: torch.Tensor,
    x_init: torch.Tensor,
    A: torch.Tensor | None,
    args: argparse.Namespace,
    desc: str,
) -> SolveResult:
    """Algorithm 3.1 with a progress bar over its stages (surfing is the slow part)."""
    bar = tqdm(total=len(stages), desc=desc, leave=False, disable=args.no_progress)

    def tick(info: StageTrace) -> None:
        if info.total is not None and info.total > bar.total:  # a rescue pass started
            bar.total = info.total
        bar.update(1)

    try:
        return surf(
            stages,
            b,
            x_init,
            A,
            steps=args.steps,
            lr=args.lr,
            final_steps=args.final_steps,
            progress=tick,
            **schedule(args),
        )
    finally:
        bar.close()


def pyplot() -> Any:
    """matplotlib's pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """PNG at 80 dpi: small enough (< 300 KB) to commit next to docs/results.md."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    pyplot().close(fig)


def link(path: Path, results_md: Path) -> str:
    """Path of an output file relative to the markdown page that embeds it."""
    return os.path.relpath(path, results_md.parent)


def command(name: str, args: argparse.Namespace, keys: Iterable[str]) -> str:
    """The `surfing experiment ...` line that reproduces a run, quoted in the results page."""
    parts = [f"surfing experiment {name}"]
    for key in keys:
        value = getattr(args, key)
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            parts.append(f"{flag} {' '.join(map(str, value))}")
        elif value is not None:
            parts.append(f"{flag} {value}")
    return " ".join(parts)
