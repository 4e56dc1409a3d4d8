"""Progress, cancellation and timeout checks from inside the solver.

Two hooks reach the database: the per-stage `progress` callback of `surfing.solvers` and a
forward hook on the generator, so progress (stage t of T, current objective) is written at
most every `progress_interval_s` even inside one long stage, and a cancel or timeout
interrupts within one generator evaluation. A progress write that hits a database error is
skipped (the next one carries newer numbers): a short outage never costs the attempt.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.db import utcnow
from app.lifecycle import Heartbeat, JobAborted, Member, live, touch
from surfing.solvers import StageTrace

log = logging.getLogger(__name__)


class JobTimedOut(Exception):
    """The attempt ran past settings.job_timeout_s."""


@dataclass
class Tracker:
    """Progress, cancellation and timeout checks, called from inside the solver.

    `sizes[i]` targets of the pass belong to `members[i]`; progress objectives are per job."""

    sessions: sessionmaker[Session]
    members: list[Member]
    sizes: list[int]
    stages: int
    interval: float
    deadline: float
    timeout_s: int
    heartbeat: Heartbeat
    b: torch.Tensor
    A: torch.Tensor | None
    completed: int = 0
    objective: torch.Tensor | None = None  # (B,) per target, latest known
    last_write: float = field(default_factory=lambda: 0.0)
    skipped_writes: int = 0  # progress writes lost to database errors

    def check(self) -> None:
        if self.heartbeat.lost.is_set() or not live(self.members):
            raise JobAborted("job was canceled or re-queued")
        if time.monotonic() > self.deadline:
            raise JobTimedOut(f"timed out after {self.timeout_s} s (SURFING_JOB_TIMEOUT_S)")

    def on_stage(self, info: StageTrace) -> None:
        """surfing's per-stage callback."""
        self.check()
        self.completed = info.stage + 1
        if info.total is not None and info.total > self.stages:  # a rescue pass adds stages
            self.stages = info.total
        self.objective = info.objective.detach().double().cpu()
        self.maybe_write()

    def on_forward(self, _module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        """Forward hook on the generator: keeps progress fresh inside long stages."""
        self.check()
        if time.monotonic() - self.last_write < self.interval:
            return
        if isinstance(output, torch.Tensor) and not is_transformed(output):
            # Inside torch.func transforms (vmap/jvp, as Levenberg-Marquardt uses) values
            # cannot be read out; the next plain forward pass reports the objective instead.
            # Only full-batch passes are read: after masking, rows no longer map to jobs.
            with torch.no_grad():
                out = output.detach().flatten(1)
                if self.A is not None:
                    out = out @ self.A.T
                b = self.b
                if out.shape[0] != b.shape[0] and out.shape[0] % b.shape[0] == 0:
                    b = b.repeat(out.shape[0] // b.shape[0], 1)  # restarts run as one batch
                if out.shape == b.shape:
                    f = 0.5 * (out - b).pow(2).sum(dim=1).double().cpu()
                    self.objective = f.view(-1, self.b.shape[0]).mean(0)
        self.maybe_write()

    def _objectives(self) -> list[float | None]:
        if self.objective is None:
            return [None] * len(self.members)
        values = []
        for part in self.objective.split(self.sizes):
            v = float(part.mean())
            values.append(v if math.isfinite(v) else None)
        return values

    def maybe_write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_write < self.interval:
            return
        self.last_write = now
        stamp = utcnow()
        stage = min(self.completed + 1, self.stages)
        rows = {
            m.job_id: {
                "stage": stage,
                "stages": self.stages,
                "objective": objective,
                "progress_at": stamp,
                "heartbeat_at": stamp,
            }
            for m, objective in zip(self.members, self._objectives(), strict=True)
        }
        try:
            touch(self.sessions, self.members, rows)
        except SQLAlchemyError as e:  # the database is away: keep solving, write next time
            self.skipped_writes += 1
            log.warning("progress of job %s not written: %s", self.members[0].job_id, e)
            return
        if not live(self.members):
            raise JobAborted("job was canceled or re-queued")


def is_transformed(t: torch.Tensor) -> bool:
    """True for tensors wrapped by torch.func (vmap, jvp, grad)."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


class Hooked:
    """Stage stream that puts the tracker's forward hook on each stage's generator (once: a
    stream may hand the same module out again)."""

    def __init__(self, stages: Any, tracker: Tracker) -> None:
        self.stages, self.tracker = stages, tracker

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self) -> Any:
        hooked: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # ids get reused
        for index, step, G in self.stages:
            if G not in hooked:
                G.register_forward_hook(self.tracker.on_forward)
                hooked.add(G)
            yield index, step, G
