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
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from app import arrays
from app.db import session_factory, utcnow
from app.models import Job, JobResult, JobStatus
from app.settings import Settings, get_settings
from models_store import StoreError
from surfing.measure import gaussian_matrix
from surfing.solvers import (
    SolveResult,
    StageTrace,
    direct,
    direct_restarts,
    hybrid,
    surf,
    uniform_latents,
)
from surfing.trajectory import final_generator, generators
from worker.cache import WarmStore

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


class Heartbeat(threading.Thread):
    """Refreshes heartbeat_at; sets `lost` when the row no longer belongs to this attempt."""

    def __init__(
        self, sessions: sessionmaker[Session], job_id: str, attempt: int, interval: float
    ) -> None:
        super().__init__(name=f"heartbeat-{job_id[:8]}", daemon=True)
        self.sessions, self.job_id, self.attempt, self.interval = (
            sessions,
            job_id,
            attempt,
            interval,
        )
        self.lost = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                with self.sessions() as s:
                    now = utcnow()
                    res = s.execute(
                        update(Job)
                        .where(*_guard(self.job_id, self.attempt))
                        .values(heartbeat_at=now)
                        .execution_options(synchronize_session=False)
                    )
                    s.commit()
                if not res.rowcount:  # type: ignore[attr-defined]
                    self.lost.set()
                    return
            except SQLAlchemyError as e:  # a db blip must not kill the job; retry next beat
                log.warning("heartbeat for job %s failed: %s", self.job_id, e)

    def stop(self) -> None:
        self._stop_event.set()


@dataclass
class Tracker:
    """Progress, cancellation and timeout checks, called from inside the solver."""

    sessions: sessionmaker[Session]
    job_id: str
    attempt: int
    stages: int
    interval: float
    deadline: float
    timeout_s: int
    heartbeat: Heartbeat
    b: torch.Tensor
    A: torch.Tensor | None
    completed: int = 0
    objective: float | None = None
    last_write: float = field(default_factory=lambda: 0.0)

    def check(self) -> None:
        if self.heartbeat.lost.is_set():
            raise JobAborted("job was canceled or re-queued")
        if time.monotonic() > self.deadline:
            raise JobTimedOut(f"timed out after {self.timeout_s} s (SURFING_JOB_TIMEOUT_S)")

    def on_stage(self, info: StageTrace) -> None:
        """surfing's per-stage callback."""
        self.check()
        self.completed = info.stage + 1
        self.objective = info.objective_mean
        self.maybe_write()

    def on_forward(self, _module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        """Forward hook on the generator: keeps progress fresh inside long stages."""
        self.check()
        if time.monotonic() - self.last_write < self.interval:
            return
        if isinstance(output, torch.Tensor) and not _is_transformed(output):
            # Inside torch.func transforms (vmap/jvp, as Levenberg-Marquardt uses) values
            # cannot be read out; the next plain forward pass reports the objective instead.
            with torch.no_grad():
                out = output.detach().flatten(1)
                if self.A is not None:
                    out = out @ self.A.T
                b = self.b
                if out.shape[0] != b.shape[0] and out.shape[0] % b.shape[0] == 0:
                    b = b.repeat(out.shape[0] // b.shape[0], 1)  # restarts run as one batch
                if out.shape == b.shape:
                    self.objective = float(0.5 * (out - b).pow(2).sum(dim=1).mean())
        self.maybe_write()

    def maybe_write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_write < self.interval:
            return
        self.last_write = now
        stamp = utcnow()
        objective = (
            self.objective if self.objective is None or math.isfinite(self.objective) else None
        )
        with self.sessions() as s:
            res = s.execute(
                update(Job)
                .where(*_guard(self.job_id, self.attempt))
                .values(
                    stage=min(self.completed + 1, self.stages),
                    stages=self.stages,
                    objective=objective,
                    progress_at=stamp,
                    heartbeat_at=stamp,
                )
                .execution_options(synchronize_session=False)
            )
            s.commit()
        if not res.rowcount:  # type: ignore[attr-defined]
            raise JobAborted("job was canceled or re-queued")


def _is_transformed(t: torch.Tensor) -> bool:
    """True for tensors wrapped by torch.func (vmap, jvp, grad)."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


class _Hooked:
    """Stage stream that puts the tracker's forward hook on the (single, reused) generator."""

    def __init__(self, stages: Any, tracker: Tracker) -> None:
        self.stages, self.tracker = stages, tracker

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self) -> Any:
        hooked: set[int] = set()
        for index, step, G in self.stages:
            if id(G) not in hooked:
                G.register_forward_hook(self.tracker.on_forward)
                hooked.add(id(G))
            yield index, step, G


def _opts(params: dict[str, Any], *names: str) -> dict[str, Any]:
    """Solver keyword arguments the client set; unset ones keep the solver's defaults."""
    return {n: params[n] for n in names if params.get(n) is not None}


# ---- the job function ----------------------------------------------------------------------


def run_job(job_id: str, settings: Settings | None = None) -> dict[str, Any]:
    """Run one attempt of job `job_id` (RQ calls this with the id only)."""
    settings = settings or get_settings()
    sessions = session_factory(settings.sqlalchemy_url)
    me = worker_name()
    attempt = claim(sessions, job_id, me)
    if attempt is None:
        log.info("job %s is not queued any more (canceled or taken); skipping", job_id)
        return {"job_id": job_id, "skipped": True}
    log.info("job %s: attempt %d on %s", job_id, attempt, me)
    beat = Heartbeat(sessions, job_id, attempt, settings.heartbeat_interval_s)
    beat.start()
    try:
        return _execute(sessions, job_id, attempt, settings, beat)
    except JobAborted as e:
        log.info("job %s attempt %d stopped: %s", job_id, attempt, e)
        return {"job_id": job_id, "aborted": str(e)}
    except JobTimedOut as e:
        fail(sessions, job_id, attempt, str(e))
        return {"job_id": job_id, "failed": str(e)}
    except StoreError as e:
        fail(sessions, job_id, attempt, f"model store: {e}")
        return {"job_id": job_id, "failed": str(e)}
    except Exception as e:
        # Includes RQ's JobTimeoutException; re-raised so RQ records it as well.
        name = type(e).__name__
        reason = (
            f"timed out after {settings.job_timeout_s} s (SURFING_JOB_TIMEOUT_S)"
            if name == "JobTimeoutException"
            else f"{name}: {e}"
        )
        fail(sessions, job_id, attempt, reason)
        raise
    finally:
        beat.stop()


def _execute(
    sessions: sessionmaker[Session],
    job_id: str,
    attempt: int,
    settings: Settings,
    beat: Heartbeat,
) -> dict[str, Any]:
    started = time.monotonic()
    with sessions() as s:
        job = s.scalars(select(Job).where(Job.id == job_id).options(selectinload(Job.inputs))).one()
        kind, model_id, method, params = job.kind, job.model_id, job.method, dict(job.params)
        inputs = job.inputs
        started_at = job.started_at
        stages_total = job.stages or params.get("stages") or 1

    device = pick_device(settings)
    store = warm_store(settings, device)
    manifest = store.manifest(model_id)
    n = manifest.n_pixels
    k = manifest.latent_dim
    target = (
        torch.from_numpy(arrays.from_npy(inputs.target)).to(device)
        if inputs.target is not None
        else None
    )
    A: torch.Tensor | None = None
    if kind == "invert":
        assert target is not None
        b = target.flatten(1)
    else:
        b = torch.from_numpy(arrays.from_npy(inputs.measurements)).to(device)
        if inputs.matrix is not None:
            A = torch.from_numpy(arrays.from_npy(inputs.matrix))
        else:
            A = gaussian_matrix(int(inputs.matrix_seed), int(inputs.m), n)
        A = A.to(device)
    batch = b.shape[0]
    seed = int(params.get("seed", 0))
    given_x0 = inputs.x_init is not None
    x0 = (
        torch.from_numpy(arrays.from_npy(inputs.x_init)).to(device)
        if given_x0
        else uniform_latents(batch, k, seed, device)
    )

    tracker = Tracker(
        sessions=sessions,
        job_id=job_id,
        attempt=attempt,
        stages=int(stages_total),
        interval=settings.progress_interval_s,
        deadline=started + settings.job_timeout_s,
        timeout_s=settings.job_timeout_s,
        heartbeat=beat,
        b=b,
        A=A,
    )
    tracker.maybe_write(force=True)
    stride = int(params.get("stride", 1))
    lr_tol = _opts(params, "lr", "tol")
    restarts = int(params.get("restarts") or 4)

    t0 = time.perf_counter()
    res: SolveResult
    if method in ("surf", "hybrid"):
        stages = _Hooked(generators(store, model_id, stride=stride, device=device), tracker)
        if method == "surf":
            res = surf(
                stages,
                b,
                x0,
                A,
                progress=tracker.on_stage,
                **_opts(params, "steps", "final_steps", "schedule"),
                **lr_tol,
            )
        else:
            # seed + 1 for the restarts: with the same seed the first restart would repeat x0.
            res = hybrid(
                stages,
                b,
                x0,
                restarts,
                seed + 1,
                A,
                progress=tracker.on_stage,
                **_opts(params, "steps", "final_steps", "direct_steps"),
                **lr_tol,
            )
    else:
        G = final_generator(store, model_id, device=device)
        G.register_forward_hook(tracker.on_forward)
        steps = _opts(params, "direct_steps")
        if "direct_steps" in steps:
            steps = {"steps": steps["direct_steps"]}
        if method == "adam":
            res = direct(G, b, x0, A, **steps, **lr_tol)
        else:
            res = direct_restarts(
                G, b, restarts, seed, A, x0 if given_x0 else None, **steps, **lr_tol
            )
    solve_s = time.perf_counter() - t0
    tracker.check()

    G_T = final_generator(store, model_id, device=device)
    with torch.no_grad():
        recon = G_T(res.x.to(device))
        flat = recon.flatten(1)
        pixel_error = (
            ((flat - target.flatten(1)).pow(2).sum(dim=1) / n).cpu().tolist()
            if target is not None
            else None
        )
        residual = (
            ((flat @ A.T - b).pow(2).sum(dim=1) / A.shape[0]).cpu().tolist()
            if A is not None
            else None
        )
    trace = [{**t.to_dict(), "stage": t.stage + 1} for t in res.trace]
    objective = res.objective.detach().cpu().double().tolist()
    latent = res.x.detach().cpu().double().tolist()
    _finish(
        sessions,
        job_id,
        attempt,
        stages_total=int(stages_total),
        started_at=started_at,
        result=JobResult(
            job_id=job_id,
            attempt=attempt,
            latent=latent,
            objective=[_finite(v) for v in objective],
            pixel_error=None if pixel_error is None else [_finite(v) for v in pixel_error],
            measurement_residual=None if residual is None else [_finite(v) for v in residual],
            trace=trace,
            evals=int(res.evals),
            device=str(device),
            solve_seconds=solve_s,
            reconstruction=arrays.to_npy(recon.detach().cpu().numpy().astype("float32")),
        ),
    )
    log.info("job %s attempt %d succeeded in %.2f s", job_id, attempt, solve_s)
    return {"job_id": job_id, "attempt": attempt, "objective": objective}


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
    """Worker start-up: thread count and device (logged once, so deployments can check it)."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = pick_device(settings)
    log.info(
        "surfing worker: device %s%s, torch %s, %d threads",
        device,
        f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "",
        torch.__version__,
        torch.get_num_threads(),
    )
    return device
