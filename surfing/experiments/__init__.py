"""Paper experiments, each a `surfing experiment <name>` sub-command.

An experiment module exposes `HELP`, `add_arguments(parser)` and `run(args)`; register it in
EXPERIMENTS below. Each writes CSV + PNG into its output folder and a section of
docs/results.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Experiment:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], object]


def _from(module: ModuleType) -> Experiment:
    return Experiment(module.HELP, module.add_arguments, module.run)


def _registry() -> dict[str, Experiment]:
    from surfing.experiments import (
        alg32,
        baselines,
        beyond,
        fig1,
        fig2,
        fig3,
        fig4,
        strongest,
        table1,
        theorem31,
    )

    return {
        "table1": _from(table1),
        "fig1": _from(fig1),
        "fig2": _from(fig2),
        "fig3": _from(fig3),
        "fig4": _from(fig4),
        "baselines": _from(baselines),
        "alg32": _from(alg32),
        "theorem31": _from(theorem31),
        "beyond": _from(beyond),
        "strongest": _from(strongest),
    }


EXPERIMENTS: dict[str, Experiment] = _registry()
