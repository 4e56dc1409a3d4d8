"""The job function, `run_job(job_id)`: the same code under RQ and in the embedded runner.

Life of an attempt:

1. *Claim*: `queued -> running`, `attempt += 1` in one guarded UPDATE. A row that is not
   `queued` (canceled, already taken by another worker, finished) is left alone.
2. A heartbeat thread refreshes `heartbeat_at`; when its guarded UPDATE matches nothing, the
   job was canceled or re-queued behind our back, and the attempt aborts.
3. The solver runs with two hooks: the per-stage `progress` callback of `surfing.solvers`
   and a forward hook on the generator, so progress (stage t of T, current objective) reaches
   the database at most every `progress_interval_s` even inside one long stage, and a cancel
   or timeout interrupts within one generator evaluation.
4. *Finish*: results are written only if the row is still `running` with *this* attempt, in
   the same transaction as the status change, so a late or retried attempt never clobbers a
   newer one and a canceled job stays canceled.

An attempt may carry companions (`worker.coalesce`): queued jobs for the same model, matrix and
options claimed right after the job itself and solved in the same pass over the trajectory.
Every step above is then done per job (each has its own attempt, guard and result); losing
one job (canceled, re-queued) drops only that job, and the pass stops once every job is lost.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy import bindparam, select, tuple_, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from app import arrays
from app.db import session_factory, utcnow
from app.models import Job, JobResult, JobStatus
from app.settings import Settings, get_settings
from models_store import StoreError
from surfing.architectures import StateMismatch, UnknownArchitecture, get_factory
from surfing.latents import sample_latents
from surfing.measure import gaussian_matrix
from surfing.solvers import (
    SolveResult,
    StageRule,
    StageTrace,
    direct,
    direct_restarts,
    hybrid,
    split_result,
    surf,
)
from surfing.trajectory import final_generator, generators
from worker.cache import WarmStore
from worker.coalesce import find_companions

log = logging.getLogger(__name__)

RUNNING = JobStatus.running.value


class JobAborted(Exception):
    """The attempt must stop without writing: canceled, or superseded by a newer attempt."""


class JobTimedOut(Exception):
    """The attempt ran past settings.job_timeout_s."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def pick_device(settings: Settings) -> torch.device:
    """CUDA when present (device='auto'), else what the settings name."""
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


_stores: dict[tuple[str, int, str], WarmStore] = {}
_stores_lock = threading.Lock()


def warm_store(settings: Settings, device: torch.device) -> WarmStore:
    """One warm cache per (store root, budget, device) per process."""
    key = (str(settings.models_dir), settings.warm_cache_mb, str(device))
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = WarmStore(
                settings.models_dir, settings.warm_cache_mb * 1024 * 1024, device
            )
        return store


# ---- database transitions ------------------------------------------------------------------


def _guard(job_id: str, attempt: int) -> tuple[Any, ...]:
    return (Job.id == job_id, Job.attempt == attempt, Job.status == RUNNING)


def claim(sessions: sessionmaker[Session], job_id: str, worker: str) -> int | None:
    """queued -> running; returns the new attempt number, or None if not claimable."""
    now = utcnow()
    with sessions() as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.queued.value)
            .values(
                status=RUNNING,
                attempt=Job.attempt + 1,
                started_at=now,
                heartbeat_at=now,
                worker=worker,
                stage=None,
                objective=None,
                progress_at=None,
                finished_at=None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            s.rollback()
            return None
        attempt = s.scalar(select(Job.attempt).where(Job.id == job_id))
        s.commit()
        return int(attempt) if attempt is not None else None


def fail(
    sessions: sessionmaker[Session],
    job_id: str,
    attempt: int | None,
    error: str,
    queue_ref: str | None = None,
) -> bool:
    """running -> failed for this attempt (or, with attempt None, for this enqueue)."""
    now = utcnow()
    where: list[Any] = [Job.id == job_id, Job.status == RUNNING]
    if attempt is not None:
        where.append(Job.attempt == attempt)
    if queue_ref is not None:
        where.append(Job.queue_ref == queue_ref)
    with sessions() as s:
        started = s.scalar(select(Job.started_at).where(Job.id == job_id))
        res = s.execute(
            update(Job)
            .where(*where)
            .values(
                status=JobStatus.failed.value,
                error=error[:4000],
                finished_at=now,
                run_seconds=(now - started).total_seconds() if started else None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        s.commit()
        return bool(res.rowcount)  # type: ignore[attr-defined]


@dataclass
class Member:
    """One job of a pass: its id, the attempt this worker holds, and whether it slipped away
    (canceled or re-queued behind our back: nothing more is written for it)."""

    job_id: str
    attempt: int
    lost: bool = False


def _live(members: list[Member]) -> list[Member]:
    return [m for m in members if not m.lost]


def touch(
    sessions: sessionmaker[Session], members: list[Member], rows: dict[str, dict[str, Any]]
) -> None:
    """Guarded per-job UPDATEs (`rows[job_id]` for each live member) in one transaction;
    members whose row no longer belongs to their attempt are marked lost."""
    live = _live(members)
    if not live:
        return
    stmt = (
        update(Job)
        .where(Job.id == bindparam("jid"), Job.attempt == bindparam("att"), Job.status == RUNNING)
        .execution_options(synchronize_session=False)
    )
    params = [{"jid": m.job_id, "att": m.attempt, **rows[m.job_id]} for m in live]
    with sessions() as s:
        s.connection().execute(stmt, params)
        ours = set(
            s.scalars(
                select(Job.id).where(
                    tuple_(Job.id, Job.attempt).in_([(m.job_id, m.attempt) for m in live]),
                    Job.status == RUNNING,
                )
            )
        )
        s.commit()
    for m in live:
        if m.job_id not in ours:
            m.lost = True


class Heartbeat(threading.Thread):
    """Refreshes heartbeat_at of every job in the pass; sets `lost` once none is ours any more."""

    def __init__(
        self, sessions: sessionmaker[Session], members: list[Member], interval: float
    ) -> None:
        super().__init__(name=f"heartbeat-{members[0].job_id[:8]}", daemon=True)
        self.sessions, self.members, self.interval = sessions, members, interval
        self.lost = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                now = utcnow()
                touch(
                    self.sessions,
                    self.members,
                    {m.job_id: {"heartbeat_at": now} for m in self.members},
                )
            except SQLAlchemyError as e:  # a db blip must not kill the job; retry next beat
                log.warning("heartbeat for job %s failed: %s", self.members[0].job_id, e)
            if not _live(self.members):
                self.lost.set()
                return

    def stop(self) -> None:
        self._stop_event.set()


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

    def check(self) -> None:
        if self.heartbeat.lost.is_set() or not _live(self.members):
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
        if isinstance(output, torch.Tensor) and not _is_transformed(output):
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
        touch(self.sessions, self.members, rows)
        if not _live(self.members):
            raise JobAborted("job was canceled or re-queued")


def _is_transformed(t: torch.Tensor) -> bool:
    """True for tensors wrapped by torch.func (vmap, jvp, grad)."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


class _Hooked:
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


def _opts(params: dict[str, Any], *names: str) -> dict[str, Any]:
    """Solver keyword arguments the client set; unset ones keep the solver's defaults."""
    return {n: params[n] for n in names if params.get(n) is not None}


# ---- the job function ----------------------------------------------------------------------


def run_job(job_id: str, settings: Settings | None = None) -> dict[str, Any]:
    """Run one attempt of job `job_id` (RQ calls this with the id only), together with the
    queued jobs that can share its pass over the trajectory."""
    settings = settings or get_settings()
    sessions = session_factory(settings.sqlalchemy_url)
    me = worker_name()
    attempt = claim(sessions, job_id, me)
    if attempt is None:
        log.info("job %s is not queued any more (canceled or taken); skipping", job_id)
        return {"job_id": job_id, "skipped": True}
    members = [Member(job_id, attempt)]
    beat: Heartbeat | None = None
    try:
        if settings.coalesce_max_targets > 0:
            for other in find_companions(sessions, job_id, settings.coalesce_max_targets):
                other_attempt = claim(sessions, other, me)
                if other_attempt is not None:
                    members.append(Member(other, other_attempt))
        log.info(
            "job %s: attempt %d on %s%s",
            job_id,
            attempt,
            me,
            f" with {len(members) - 1} coalesced job(s)" if len(members) > 1 else "",
        )
        beat = Heartbeat(sessions, members, settings.heartbeat_interval_s)
        beat.start()
        return _execute(sessions, members, settings, beat)
    except JobAborted as e:
        log.info("job %s attempt %d stopped: %s", job_id, attempt, e)
        return {"job_id": job_id, "aborted": str(e)}
    except JobTimedOut as e:
        _fail_all(sessions, members, str(e))
        return {"job_id": job_id, "failed": str(e)}
    except StoreError as e:
        _fail_all(sessions, members, f"model store: {e}")
        return {"job_id": job_id, "failed": str(e)}
    except (UnknownArchitecture, StateMismatch) as e:
        # Permanent: another attempt on this worker fails the same way. The message names the
        # architecture (and what this process has) or the first checkpoint key that misfits.
        _fail_all(sessions, members, str(e))
        return {"job_id": job_id, "failed": str(e)}
    except Exception as e:
        # Includes RQ's JobTimeoutException; re-raised so RQ records it as well.
        name = type(e).__name__
        reason = (
            f"timed out after {settings.job_timeout_s} s (SURFING_JOB_TIMEOUT_S)"
            if name == "JobTimeoutException"
            else f"{name}: {e}"
        )
        _fail_all(sessions, members, reason)
        raise
    finally:
        if beat is not None:
            beat.stop()


def _fail_all(sessions: sessionmaker[Session], members: list[Member], reason: str) -> None:
    for m in _live(members):
        fail(sessions, m.job_id, m.attempt, reason)


@dataclass
class Pass:
    """The inputs of every job in one pass, concatenated in member order."""

    kind: str
    model_id: str
    n_pixels: int
    method: str
    params: dict[str, Any]  # the first job's; the others differ only in PER_JOB_PARAMS
    stages_total: int
    b: torch.Tensor  # (B, n) images or (B, m) measurements
    x0: torch.Tensor  # (B, k)
    prior: str  # the manifest's latent prior: starts, restarts and rescue draws
    A: torch.Tensor | None
    sizes: list[int]  # targets per member
    targets: list[torch.Tensor | None]  # per member: the true images, when known
    started_at: list[Any]  # per member
    given_x0: bool  # the first job's x_init was given (only matters for restarts)


def _load_pass(
    sessions: sessionmaker[Session], members: list[Member], store: WarmStore, device: torch.device
) -> Pass:
    jobs = []
    with sessions() as s:
        for m in members:
            job = s.scalars(
                select(Job).where(Job.id == m.job_id).options(selectinload(Job.inputs))
            ).one()
            s.expunge(job)
            jobs.append(job)
    first = jobs[0]
    manifest = store.manifest(first.model_id)
    get_factory(manifest.arch.get("kind"))  # UnknownArchitecture before any work is done
    n, k = manifest.n_pixels, manifest.latent_dim
    A: torch.Tensor | None = None
    if first.kind == "cs":
        inp = first.inputs
        if inp.matrix is not None:
            A = torch.from_numpy(arrays.from_npy(inp.matrix))
        else:
            A = gaussian_matrix(int(inp.matrix_seed), int(inp.m), n)
        A = A.to(device)
    bs, x0s, targets = [], [], []
    for job in jobs:
        inp = job.inputs
        target = (
            torch.from_numpy(arrays.from_npy(inp.target)).to(device)
            if inp.target is not None
            else None
        )
        if job.kind == "invert":
            assert target is not None
            b = target.flatten(1)
        else:
            b = torch.from_numpy(arrays.from_npy(inp.measurements)).to(device)
        x0 = (  # each job's own seed, so a coalesced pass starts every job where it would alone
            torch.from_numpy(arrays.from_npy(inp.x_init)).to(device)
            if inp.x_init is not None
            else sample_latents(
                b.shape[0], k, int(job.params.get("seed", 0)), manifest.latent_prior, device
            )
        )
        bs.append(b)
        x0s.append(x0)
        targets.append(target)
    return Pass(
        kind=first.kind,
        model_id=first.model_id,
        n_pixels=n,
        method=first.method,
        params=dict(first.params),
        stages_total=int(first.stages or first.params.get("stages") or 1),
        b=torch.cat(bs),
        x0=torch.cat(x0s),
        prior=manifest.latent_prior,
        A=A,
        sizes=[b.shape[0] for b in bs],
        targets=targets,
        started_at=[job.started_at for job in jobs],
        given_x0=first.inputs.x_init is not None,
    )


def _solve(
    job: Pass, store: WarmStore, device: torch.device, tracker: Tracker, graphs: bool = False
) -> SolveResult:
    """Run the job's method on the whole pass. `graphs` applies to "surf" only: direct Adam
    counts progress with a forward hook, which a replayed graph would not call."""
    params, model_id, b, x0, A = job.params, job.model_id, job.b, job.x0, job.A
    seed = int(params.get("seed", 0))
    stride = int(params.get("stride", 1))
    lr_tol = _opts(params, "lr", "tol")
    restarts = int(params.get("restarts") or 4)
    if job.method in ("surf", "hybrid"):
        stages = _Hooked(generators(store, model_id, stride=stride, device=device), tracker)
        if job.method == "surf":
            rule = StageRule(rescue_rtol=None) if params.get("rescue") is False else None
            return surf(
                stages,
                b,
                x0,
                A,
                progress=tracker.on_stage,
                graphs=graphs,
                rule=rule,
                prior=job.prior,
                **_opts(params, "steps", "final_steps", "schedule"),
                **lr_tol,
            )
        # seed + 1 for the restarts: with the same seed the first restart would repeat x0.
        return hybrid(
            stages,
            b,
            x0,
            restarts,
            seed + 1,
            A,
            progress=tracker.on_stage,
            prior=job.prior,
            **_opts(params, "steps", "final_steps", "direct_steps"),
            **lr_tol,
        )
    G = final_generator(store, model_id, device=device)
    G.register_forward_hook(tracker.on_forward)
    steps = _opts(params, "direct_steps")
    if "direct_steps" in steps:
        steps = {"steps": steps["direct_steps"]}
    if job.method == "adam":
        return direct(G, b, x0, A, **steps, **lr_tol)
    return direct_restarts(
        G,
        b,
        restarts,
        seed,
        A,
        x0 if job.given_x0 else None,
        prior=job.prior,
        latent_dim=x0.shape[1],
        **steps,
        **lr_tol,
    )


def _execute(
    sessions: sessionmaker[Session],
    members: list[Member],
    settings: Settings,
    beat: Heartbeat,
) -> dict[str, Any]:
    started = time.monotonic()
    device = pick_device(settings)
    store = warm_store(settings, device)
    job = _load_pass(sessions, members, store, device)

    tracker = Tracker(
        sessions=sessions,
        members=members,
        sizes=job.sizes,
        stages=job.stages_total,
        interval=settings.progress_interval_s,
        deadline=started + settings.job_timeout_s,
        timeout_s=settings.job_timeout_s,
        heartbeat=beat,
        b=job.b,
        A=job.A,
    )
    tracker.maybe_write(force=True)
    t0 = time.perf_counter()
    res = _solve(job, store, device, tracker, settings.cuda_graphs)
    solve_s = time.perf_counter() - t0
    tracker.check()

    G_T = final_generator(store, job.model_id, device=device)
    with torch.no_grad():
        recon = G_T(res.x.to(device))
        residual = (
            (recon.flatten(1) @ job.A.T - job.b).pow(2).sum(dim=1) / job.A.shape[0]
            if job.A is not None
            else None
        )
    parts = split_result(res, job.sizes) if len(members) > 1 else [res]
    written, lo = [], 0
    for i, (member, part) in enumerate(zip(members, parts, strict=True)):
        hi = lo + job.sizes[i]
        target = job.targets[i]
        with torch.no_grad():
            mine = recon[lo:hi]
            pixel_error = (
                ((mine.flatten(1) - target.flatten(1)).pow(2).sum(dim=1) / job.n_pixels)
                .cpu()
                .tolist()
                if target is not None
                else None
            )
        result = JobResult(
            job_id=member.job_id,
            attempt=member.attempt,
            latent=part.x.detach().cpu().double().tolist(),
            objective=[_finite(v) for v in part.objective.detach().cpu().double().tolist()],
            pixel_error=None if pixel_error is None else [_finite(v) for v in pixel_error],
            measurement_residual=None
            if residual is None
            else [_finite(v) for v in residual[lo:hi].cpu().double().tolist()],
            trace=[{**t.to_dict(), "stage": t.stage + 1} for t in part.trace],
            evals=int(part.evals),
            device=str(device),
            solve_seconds=solve_s,
            pass_jobs=len(members),
            pass_targets=int(job.b.shape[0]),
            reconstruction=arrays.to_npy(mine.detach().cpu().numpy().astype("float32")),
        )
        lo = hi
        if member.lost:
            continue
        try:
            _finish(
                sessions,
                member.job_id,
                member.attempt,
                max(job.stages_total, len(part.trace)),  # with this job's rescue stages
                job.started_at[i],
                result,
            )
            written.append(member.job_id)
        except JobAborted as e:  # this one was canceled at the last moment; the rest stand
            member.lost = True
            log.info("job %s attempt %d not written: %s", member.job_id, member.attempt, e)
    if not written:
        raise JobAborted(
            "every job of the pass was canceled or re-queued before its result was written"
        )
    log.info(
        "job %s attempt %d succeeded in %.2f s (%d job(s), %d targets in the pass)",
        members[0].job_id,
        members[0].attempt,
        solve_s,
        len(members),
        job.b.shape[0],
    )
    return {
        "job_id": members[0].job_id,
        "attempt": members[0].attempt,
        "objective": parts[0].objective.detach().cpu().double().tolist(),
        "coalesced": [m.job_id for m in members[1:]],
        "written": written,
    }


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _finish(
    sessions: sessionmaker[Session],
    job_id: str,
    attempt: int,
    stages_total: int,
    started_at: Any,
    result: JobResult,
) -> None:
    """Status and result in one transaction, only for the current attempt (idempotent)."""
    now = utcnow()
    mean = [v for v in result.objective if v is not None]
    with sessions() as s:
        res = s.execute(
            update(Job)
            .where(*_guard(job_id, attempt))
            .values(
                status=JobStatus.succeeded.value,
                finished_at=now,
                heartbeat_at=now,
                progress_at=now,
                stage=stages_total,
                stages=stages_total,
                objective=sum(mean) / len(mean) if mean else None,
                run_seconds=(now - started_at).total_seconds() if started_at else None,
                error=None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        if not res.rowcount:  # type: ignore[attr-defined]
            s.rollback()
            raise JobAborted("job was canceled or re-queued before its result was written")
        existing = s.get(JobResult, job_id)
        if existing is not None:
            if existing.attempt > attempt:  # cannot happen with the guard; belt and braces
                s.rollback()
                raise JobAborted("a newer attempt already wrote the result")
            s.delete(existing)
            s.flush()
        s.add(result)
        s.commit()


def on_rq_failure(job: Any, connection: Any, exc_type: Any, value: Any, tb: Any) -> None:
    """RQ failure callback: a backstop for failures outside run_job's own handling.

    RQ also calls it for *abandoned* jobs (their worker vanished), possibly long after our
    reaper re-queued the job under a new RQ id. So it only touches the row while the row
    still points at this RQ job, and abandoned jobs go through the reaper (retry if attempts
    remain) instead of being failed outright.
    """
    try:
        job_id = job.args[0]
    except (AttributeError, IndexError, TypeError):
        return
    settings = get_settings()
    sessions = session_factory(settings.sqlalchemy_url)
    name = getattr(exc_type, "__name__", str(exc_type))
    if name == "AbandonedJobError":
        from app.queue import RQJobQueue
        from app.services.reaper import reap_stale_jobs

        reap_stale_jobs(sessions, RQJobQueue(settings), settings, job_id=job_id)
        return
    reason = f"{name}: {value}"
    if name == "JobTimeoutException":
        reason = f"timed out after {job.timeout} s (SURFING_JOB_TIMEOUT_S)"
    fail(sessions, job_id, None, reason, queue_ref=job.id)


def prepare_runtime(settings: Settings) -> torch.device:
    """Worker start-up: thread count, TF32 and device (logged once, so deployments can check)."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    torch.backends.cudnn.allow_tf32 = settings.tf32
    device = pick_device(settings)
    log.info(
        "surfing worker: device %s%s, torch %s, %d threads, TF32 convolutions %s, CUDA graphs %s",
        device,
        f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "",
        torch.__version__,
        torch.get_num_threads(),
        settings.tf32,
        settings.cuda_graphs,
    )
    return device
