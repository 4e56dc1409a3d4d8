"""Progress, cancellation and timeout checks from inside the solver.

Two hooks reach the database: the per-stage `progress` callback of `surfing.solvers` and a
forward hook on the generator, so progress is written at most every `progress_interval_s` even
inside one long stage, and a cancel or timeout interrupts within one generator evaluation. A
progress write that hits a database error is skipped (the next one carries newer numbers): a
short outage never costs the attempt.

Progress is a sequence of *passes*, each with its own stage counter that never goes back
(the API's `progress` object, app.services.jobs.progress_view):

    surf     the trajectory, stage t of T (T = checkpoints surfed)         step = checkpoint's
    rescue   surf's re-surf of targets not fitted, round r, again T stages step = checkpoint's
    restart  hybrid's / adam-restarts' R direct descents, run together as one batch:
             stage = Adam step s of `direct_steps`                          step = None
             lm-restarts' (and portfolio's) restart round r, 1 of 1         step = G_T's
    final    hybrid's polish of both candidates on the final network, 1 of 1
             lm-restarts' (and portfolio's) first LM solve on G_T, 1 of 1   step = G_T's
    adam     direct descent: stage = Adam step s of `direct_steps`

Method surf with schedule "portfolio" (the default) runs final -> restart 1..R on G_T, then,
only if some target is still not fitted, surf (T stages) -> rescue r over the trajectory.

A pass starts when the stage stream is iterated (surf after portfolio's restarts; again for a
rescue) or the forward passes move on (hybrid's restarts, then its polish), or when a stage
reports a new pass (lm-restarts' rounds, shown once finished); every start and every finished
pass is written at once, so even a short pass shows. `stage`/`stages` (the old columns) keep
counting the whole run against the job's fixed `stages`; they no longer grow when a rescue
starts.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app import arrays
from app.db import utcnow
from app.lifecycle import Heartbeat, JobAborted, Member, live, touch
from app.models import Job
from surfing.solvers import DEFAULT_SCHEDULE, StageTrace

log = logging.getLogger(__name__)

PREVIEW_INTERVAL_S = 1.0  # least gap between two previews of a job
PREVIEW_MAX_SIDE = 64  # larger outputs are shrunk (area average) to fit
DIRECT_STEPS = 2000  # surfing.solvers.direct / hybrid default, when the job did not set it
RESTARTS = 4  # worker.jobs default


class JobTimedOut(Exception):
    """The attempt ran past settings.job_timeout_s."""


@dataclass
class PassState:
    """The pass in progress: `stage` (1-based, in progress) of `stages`, fixed at its start."""

    name: str  # surf | rescue | restart | final | adam
    index: int  # passes before this one
    round: int | None
    stages: int
    stage: int = 1
    step: int | None = None  # training step of the checkpoint in progress (trajectory passes)
    completed: int = 0  # stages finished (trajectory passes)
    forwards: int = 0  # plain generator evaluations seen (direct passes: one per Adam step)
    steps: list[int] = field(default_factory=list)  # checkpoint steps the stream handed out


@dataclass
class Tracker:
    """Progress, cancellation and timeout checks, called from inside the solver.

    `sizes[i]` targets of the pass belong to `members[i]`; progress objectives are per job.
    `method` and `params` (the first job's; a pass shares them) are read from its row when not
    given."""

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
    method: str | None = None
    params: dict[str, Any] | None = None
    completed: int = 0  # stages finished, all passes
    objective: torch.Tensor | None = None  # (B,) per target, latest known
    last_write: float = field(default_factory=lambda: 0.0)
    skipped_writes: int = 0  # progress writes lost to database errors
    current: PassState | None = None
    stream_passes: int = 0  # times the stage stream was iterated (1 + rescue rounds)
    moved: torch.Tensor | None = None  # (B,) bool: the targets of the rescue in progress
    last_preview: float = field(default_factory=lambda: -math.inf)
    pending: dict[str, torch.Tensor] = field(default_factory=dict)  # job id -> (C, H, W)
    shown: dict[str, tuple[bytes, datetime]] = field(default_factory=dict)  # last written
    force_next: bool = False  # a pass started or ended: write at the next chance

    def check(self) -> None:
        if self.heartbeat.lost.is_set() or not live(self.members):
            raise JobAborted("job was canceled or re-queued")
        if time.monotonic() > self.deadline:
            raise JobTimedOut(f"timed out after {self.timeout_s} s (SURFING_JOB_TIMEOUT_S)")

    # ---- passes ------------------------------------------------------------------------------

    def _param(self, name: str, default: int) -> int:
        value = (self.params or {}).get(name)
        return int(value) if value else default

    def _start(self, name: str, round_: int | None, stages: int) -> PassState:
        index = 0 if self.current is None else self.current.index + 1
        self.current = PassState(name, index, round_, max(1, int(stages)))
        self.force_next = True
        return self.current

    def _portfolio(self) -> bool:
        """A surf job whose schedule is "portfolio": it starts on G_T, not on the stream."""
        schedule = (self.params or {}).get("schedule") or DEFAULT_SCHEDULE
        return self.method == "surf" and schedule == "portfolio"

    def _pass(self, hint: str = "surf") -> PassState:
        """The pass in progress; the method's first pass if none started yet (`hint` stands in
        for the method while the row could not be read)."""
        if self.current is not None:
            return self.current
        method = self.method or hint
        if method == "hybrid":
            return self._start("surf", None, self.stages - 1)  # its last "stage": restarts
        if method == "lm-restarts" or self._portfolio():
            return self._start("final", None, 1)  # then a "restart" pass per round
        if method in ("adam", "adam-restarts"):
            name = "restart" if method == "adam-restarts" else "adam"
            return self._start(name, None, self._param("direct_steps", DIRECT_STEPS))
        return self._start("surf", None, self.stages)

    def begin_stream(self, length: int | None) -> None:
        """The stage stream is iterated (Hooked): the first time surf, then each rescue round.
        Portfolio's first iteration comes after its passes on G_T ("final", "restart" r): the
        surf pass starts there."""
        self.stream_passes += 1
        if self.stream_passes == 1:
            p = self._pass("surf")
            if p.name in ("final", "restart"):  # portfolio: the unfitted targets surf now
                self.moved = None  # the restart's rows are not the surf's (set by its stages)
                self._start("surf", None, length or self.stages)
            elif p.name == "surf" and p.completed == 0 and length:
                p.stages = length
            return
        surfed = self.current.stages if self.current is not None else self.stages
        self._start("rescue", self.stream_passes - 1, length or surfed)  # written by `staged`

    def staged(self, step: int) -> None:
        """The stream handed out a checkpoint (one ahead of the solver: it reads ahead)."""
        p = self._pass("surf")
        p.steps.append(int(step))
        if p.step is None:
            p.step = int(step)
        if self.force_next:  # a pass just started: show it with its first checkpoint
            self.maybe_write()

    def on_stage(self, info: StageTrace) -> None:
        """surfing's per-stage callback."""
        self.check()
        self.completed += 1
        p = self._pass("surf")
        if (p.name, p.round) != (info.pass_name, info.pass_round) and (
            info.pass_name != "surf" or p.name in ("final", "restart")
        ):
            # a pass no stream iteration announced: a rescue of a stream without Hooked (T
            # stages again), an lm-restarts round, or portfolio's surf after its restarts
            stages = {"rescue": p.stages, "surf": self.stages}.get(info.pass_name, 1)
            p = self._start(info.pass_name, info.pass_round, stages)
        p.completed += 1
        p.stage = min(p.completed + 1, p.stages)
        p.step = p.steps[p.completed] if p.completed < len(p.steps) else int(info.step)
        if info.moved is not None:
            self.moved = info.moved.detach().cpu()
        self.objective = info.objective.detach().double().cpu()
        self.maybe_write(force=p.completed >= p.stages)

    def _count(self, rows: int) -> None:
        """A plain forward pass: an Adam step of a direct pass, or the sign that hybrid moved
        on to its restarts (after the last surf stage) or its polish (after the restarts)."""
        n = self.b.shape[0]
        p = self._pass("adam-restarts" if rows > n else "adam")
        if self.method == "hybrid":
            restarts = self._param("restarts", RESTARTS)
            if p.name == "surf" and p.completed >= p.stages:
                p = self._start("restart", None, self._param("direct_steps", DIRECT_STEPS))
            elif p.name == "restart" and (
                p.forwards > p.stages or (restarts > 1 and rows != n * restarts)
            ):
                p = self._start("final", None, 1)
        if p.name in ("adam", "restart"):
            p.forwards += 1
            p.stage = min(p.forwards, p.stages)
            if p.forwards == p.stages:
                self.force_next = True  # its last step: shown even when the writes are spaced

    def on_forward(self, _module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        """Forward hook on the generator: keeps progress fresh inside long stages."""
        self.check()
        # Inside torch.func transforms (vmap/jvp, as Levenberg-Marquardt uses) values cannot be
        # read out; the next plain forward pass reports the objective instead.
        plain = isinstance(output, torch.Tensor) and not is_transformed(output)
        if plain:
            self._count(output.shape[0])
        now = time.monotonic()
        if not self.force_next and now - self.last_write < self.interval:
            return
        if plain:
            with torch.no_grad():
                out = output.detach()
                self._objective_from(out)
                if now - self.last_preview >= PREVIEW_INTERVAL_S:
                    self._capture(out)
        self.maybe_write()

    def _objective_from(self, output: torch.Tensor) -> None:
        # Only full-batch passes are read: after masking, rows no longer map to jobs.
        out = output.flatten(1)
        if self.A is not None:
            out = out @ self.A.T
        b = self.b
        if out.shape[0] != b.shape[0] and out.shape[0] % b.shape[0] == 0:
            b = b.repeat(out.shape[0] // b.shape[0], 1)  # restarts run as one batch
        if out.shape == b.shape:
            f = 0.5 * (out - b).pow(2).sum(dim=1).double().cpu()
            self.objective = f.view(-1, self.b.shape[0]).mean(0)

    # ---- preview -----------------------------------------------------------------------------

    def _capture(self, output: torch.Tensor) -> None:
        """Keep each job's first target's G_t(x_t) from a forward pass whose rows map to
        targets: the full batch (restarts: its first copy), or a rescue's re-surfed targets."""
        rows, n = output.shape[0], self.b.shape[0]
        firsts, lo = [], 0
        for size in self.sizes:
            firsts.append(lo)
            lo += size
        where: dict[int, int] = {}
        if rows >= n and rows % n == 0:
            where = dict(enumerate(firsts))
        elif self.moved is not None and rows == int(self.moved.sum()):
            position = self.moved.long().cumsum(0) - 1
            where = {i: int(position[t]) for i, t in enumerate(firsts) if bool(self.moved[t])}
        for i, row in where.items():
            self.pending[self.members[i].job_id] = output[row].float().cpu()

    def _previews(self, stamp: datetime, now: float) -> dict[str, tuple[bytes | None, Any]]:
        """New previews for this write (every member's column, unchanged ones as they were),
        or {} when none is due."""
        if not self.pending or now - self.last_preview < PREVIEW_INTERVAL_S:
            return {}
        vr = (self.params or {}).get("value_range") or [0.0, 1.0]
        for job_id, image in self.pending.items():
            self.shown[job_id] = (preview_png(image, vr), stamp)
        self.pending.clear()
        self.last_preview = now
        return {m.job_id: self.shown.get(m.job_id, (None, None)) for m in self.members}

    # ---- writing -----------------------------------------------------------------------------

    def _load_info(self) -> None:
        if self.method is not None and self.params is not None:
            return
        with self.sessions() as s:
            method, params = s.execute(
                select(Job.method, Job.params).where(Job.id == self.members[0].job_id)
            ).one()
        self.method, self.params = str(method), dict(params or {})

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
        if not (force or self.force_next) and now - self.last_write < self.interval:
            return
        self.last_write = now
        try:
            self._load_info()
        except SQLAlchemyError as e:  # the database is away: keep solving, write next time
            self.skipped_writes += 1
            log.warning("progress of job %s not written: %s", self.members[0].job_id, e)
            return
        p = self._pass()
        stamp = utcnow()
        previews = self._previews(stamp, now)
        rows = {}
        for m, objective in zip(self.members, self._objectives(), strict=True):
            row = {
                "stage": min(self.completed + 1, self.stages),
                "stages": self.stages,
                "objective": objective,
                "progress_at": stamp,
                "heartbeat_at": stamp,
                "pass_name": p.name,
                "pass_index": p.index,
                "pass_round": p.round,
                "pass_stage": p.stage,
                "pass_stages": p.stages,
                "pass_step": p.step,
            }
            if previews:
                row["preview_png"], row["preview_at"] = previews[m.job_id]
            rows[m.job_id] = row
        try:
            touch(self.sessions, self.members, rows)
        except SQLAlchemyError as e:
            self.skipped_writes += 1
            log.warning("progress of job %s not written: %s", self.members[0].job_id, e)
            return
        self.force_next = False
        if not live(self.members):
            raise JobAborted("job was canceled or re-queued")


def preview_png(image: torch.Tensor, value_range: Any) -> bytes:
    """A small PNG of one output (C, H, W): shrunk to PREVIEW_MAX_SIDE, non-finite values
    shown as the low end of the range."""
    img = torch.nan_to_num(image.detach().float().cpu(), nan=float(value_range[0]))
    if img.dim() == 3 and max(img.shape[-2:]) > PREVIEW_MAX_SIDE:
        h, w = img.shape[-2:]
        scale = PREVIEW_MAX_SIDE / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        img = torch.nn.functional.interpolate(img[None], size=size, mode="area")[0]
    return arrays.to_png(img.numpy(), value_range)


def is_transformed(t: torch.Tensor) -> bool:
    """True for tensors wrapped by torch.func (vmap, jvp, grad)."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


class Hooked:
    """Stage stream that puts the tracker's forward hook on each stage's generator (once: a
    stream may hand the same module out again) and tells the tracker when a pass over the
    stream begins and which checkpoint comes next."""

    def __init__(self, stages: Any, tracker: Tracker) -> None:
        self.stages, self.tracker = stages, tracker

    def __len__(self) -> int:
        return len(self.stages)

    def final(self) -> Any:
        """The stream's last stage (schedule "portfolio" starts there), hooked like the rest."""
        index, step, G = self.stages.final()
        G.register_forward_hook(self.tracker.on_forward)
        self.tracker.staged(step)  # the passes on G_T show its step from their start
        return index, step, G

    def __iter__(self) -> Any:
        length = len(self.stages) if hasattr(self.stages, "__len__") else None
        self.tracker.begin_stream(length)
        hooked: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # ids get reused
        for index, step, G in self.stages:
            if G not in hooked:
                G.register_forward_hook(self.tracker.on_forward)
                hooked.add(G)
            self.tracker.staged(step)
            yield index, step, G
