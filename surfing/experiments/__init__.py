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
    from surfing.experiments import table1

    return {"table1": _from(table1)}


EXPERIMENTS: dict[str, Experiment] = _registry()
