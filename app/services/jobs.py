"""Job service: validate requests against the model's manifest, build job rows, enqueue, view.

Routes stay thin: they turn HTTP (JSON or multipart) into the raw values below and call these
functions. Everything that can be wrong with an input is found here, before a row exists, and
reported as a 4xx problem naming the field.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from app import arrays, lifecycle
from app.models import ACTIVE, Job, JobInput, JobKind, JobResult, JobStatus
from app.problems import InvalidInput, NotFound, Problem
from app.queue import JobQueue
from app.schemas import MatrixSeed, SolveOptions
from app.settings import Settings
from models_store import (
    InvalidModelId,
    Manifest,
    ModelNotFound,
    ModelStore,
    StoreError,
    select_indices,
    validate_model_id,
)

log = logging.getLogger(__name__)

MATRIX_GENERATOR = (
    "torch.Generator('cpu').manual_seed(seed); torch.randn(m, n, dtype=float32) / sqrt(m) "
    "(surfing.measure.gaussian_matrix)"
)

# An uploaded or JSON array: raw bytes (.npy/PNG/JPEG), a base64 string, or a nested list.
RawArray = bytes | str | list[Any]
# Called with the finished row just before its commit (app.services.admission.Gate: quotas,
# owner, idempotency key); raising refuses the job.
Admit = Callable[[Session, Job], None]


def load_manifest(store: ModelStore, model_id: str) -> Manifest:
    """The manifest of a usable model, or 422 (bad id) / 404 (unknown) / 409 (unusable)."""
    try:
        validate_model_id(model_id)
    except InvalidModelId as e:
        raise InvalidInput(str(e), field="model_id") from None
    try:
        manifest = store.manifest(model_id)
    except ModelNotFound:
        raise NotFound(
            f"unknown model {model_id!r}: GET /models lists the available trajectories",
            model_id=model_id,
        ) from None
    except StoreError as e:
        raise Problem(409, f"model {model_id!r} cannot be used: {e}", model_id=model_id) from None
    if not manifest.checkpoints:
        raise Problem(409, f"model {model_id!r} has no checkpoints yet", model_id=model_id)
    return manifest


def n_stages(method: str, n_checkpoints: int, stride: int) -> int:
    """Progress denominator T: checkpoints surfed (+1 for hybrid's restart phase); 1 for the
    methods that only use the final network."""
    if method in ("adam", "adam-restarts", "lm-restarts"):
        return 1
    surfed = len(select_indices(n_checkpoints, stride))
    return surfed + 1 if method == "hybrid" else surfed


def _x_init(options: SolveOptions, manifest: Manifest, batch: int) -> np.ndarray | None:
    if options.x_init is None:
        return None
    x = np.asarray(options.x_init, dtype=np.float64)
    k = manifest.latent_dim
    if x.ndim == 1:
        x = x[None]
    if x.shape[-1] != k or x.shape[0] not in (1, batch):
        raise InvalidInput(
            f"x_init has shape {list(np.asarray(options.x_init).shape)}; this model's latent "
            f"dimension is k = {k}, so send {k} numbers (or {batch} x {k})",
            field="x_init",
        )
    return arrays.as_float32(np.broadcast_to(x, (batch, k)).copy(), "x_init")


def _params(options: SolveOptions, manifest: Manifest, **extra: Any) -> dict[str, Any]:
    params = options.model_dump(exclude={"x_init"}, exclude_none=True)
    # where the starts come from: the manifest's latent prior, seeded by `seed`
    params["x_init"] = "given" if options.x_init is not None else f"{manifest.latent_prior}(seed)"
    params["latent_prior"] = manifest.latent_prior  # also what restarts and rescues draw from
    params["latent_dim"] = manifest.latent_dim  # k: the compute cap of lm-restarts needs it
    params["stages"] = n_stages(options.method, len(manifest.checkpoints), options.stride)
    params["output_shape"] = list(manifest.output_shape)
    params["value_range"] = list(manifest.value_range)
    params.update(extra)
    return params


def _new_job(
    kind: JobKind,
    manifest: Manifest,
    options: SolveOptions,
    n_targets: int,
    params: dict[str, Any],
    inputs: JobInput,
    settings: Settings,
) -> Job:
    job = Job(
        id=str(uuid.uuid4()),
        kind=kind.value,
        model_id=manifest.model_id,
        method=options.method,
        params=params,
        n_targets=n_targets,
        status=JobStatus.queued.value,
        attempt=0,
        max_attempts=settings.max_attempts,
        stages=params["stages"],
    )
    job.inputs = inputs
    return job


def submit(session: Session, queue: JobQueue, job: Job, admit: Admit | None = None) -> Job:
    """Commit the row as `queued`, then try to enqueue it (app.lifecycle.outbox): with the
    queue down the job is still accepted, and the reconciler enqueues it once Redis is back."""
    if admit is not None:
        admit(session, job)
    return lifecycle.submit(session, queue, job)


def create_invert_job(
    session: Session,
    store: ModelStore,
    settings: Settings,
    queue: JobQueue,
    model_id: str,
    options: SolveOptions,
    image: RawArray,
    source: str,
    admit: Admit | None = None,
) -> Job:
    """Validate an /invert request and queue it."""
    manifest = load_manifest(store, model_id)
    target = arrays.decode_image(
        image,
        "image",
        manifest.output_shape,
        manifest.value_range,
        settings.max_image_pixels,
        settings.max_batch,
    )
    batch = target.shape[0]
    x0 = _x_init(options, manifest, batch)
    params = _params(options, manifest, n=manifest.n_pixels, source=source)
    inputs = JobInput(
        target=arrays.to_npy(target), x_init=None if x0 is None else arrays.to_npy(x0)
    )
    job = _new_job(JobKind.invert, manifest, options, batch, params, inputs, settings)
    return submit(session, queue, job, admit)


def check_m(m: int, n: int, field: str = "m") -> None:
    if not 1 <= m <= n:
        raise InvalidInput(
            f"m = {m} is out of range: need 1 <= m <= n = {n} (the model's pixel count)",
            field=field,
        )


def _matrix(raw: MatrixSeed | RawArray, n: int) -> tuple[np.ndarray | None, int, int | None]:
    """(explicit matrix or None, m, seed or None)."""
    if isinstance(raw, MatrixSeed):
        check_m(raw.m, n, "matrix.m")
        return None, raw.m, raw.seed
    if isinstance(raw, list):
        arr = arrays.parse_nested(raw, "matrix")
    elif isinstance(raw, bytes):
        if arrays.sniff(raw) != "npy":
            raise InvalidInput("matrix upload must be a .npy float array", field="matrix")
        arr = arrays.load_npy(raw, "matrix", max_elements=n * n)
    else:
        raise InvalidInput("matrix must be {seed, m}, an m x n nested list or a .npy upload")
    if arr.ndim != 2 or arr.shape[1] != n:
        raise InvalidInput(
            f"matrix has shape {list(arr.shape)}; it must be (m, n) with n = {n} "
            "(the model's pixel count)",
            field="matrix",
        )
    check_m(arr.shape[0], n, "matrix")
    return arrays.as_float32(arr, "matrix"), int(arr.shape[0]), None


def _measurements(raw: RawArray, m: int, max_batch: int) -> np.ndarray:
    if isinstance(raw, list):
        arr = arrays.parse_nested(raw, "measurements")
    elif isinstance(raw, bytes):
        if arrays.sniff(raw) != "npy":
            raise InvalidInput(
                "measurements upload must be a .npy float array", field="measurements"
            )
        arr = arrays.load_npy(raw, "measurements", max_elements=max_batch * m)
    else:
        raise InvalidInput(
            "measurements must be a list of numbers or a .npy upload", field="measurements"
        )
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != m:
        length = arr.shape[-1] if arr.ndim else 0
        raise InvalidInput(
            f"measurements has length {length} (shape {list(arr.shape)}); expected m = {m} "
            "values (or a batch [B, m])",
            field="measurements",
        )
    if arr.shape[0] > max_batch:
        raise InvalidInput(
            f"measurements holds {arr.shape[0]} targets; the limit per job is {max_batch}",
            field="measurements",
        )
    return arrays.as_float32(arr, "measurements")


def create_cs_job(
    session: Session,
    store: ModelStore,
    settings: Settings,
    queue: JobQueue,
    model_id: str,
    options: SolveOptions,
    measurements: RawArray,
    matrix: MatrixSeed | RawArray,
    true_image: RawArray | None,
    source: str,
    admit: Admit | None = None,
) -> Job:
    """Validate a /cs-recover request and queue it."""
    manifest = load_manifest(store, model_id)
    n = manifest.n_pixels
    A, m, seed = _matrix(matrix, n)
    b = _measurements(measurements, m, settings.max_batch)
    batch = b.shape[0]
    truth = None
    if true_image is not None:
        truth = arrays.decode_image(
            true_image,
            "true_image",
            manifest.output_shape,
            manifest.value_range,
            settings.max_image_pixels,
            settings.max_batch,
        )
        if truth.shape[0] != batch:
            raise InvalidInput(
                f"true_image holds {truth.shape[0]} images but measurements holds {batch} targets",
                field="true_image",
            )
    x0 = _x_init(options, manifest, batch)
    params = _params(
        options,
        manifest,
        n=n,
        m=m,
        matrix={"seed": seed, "m": m} if seed is not None else "explicit",
        true_image=truth is not None,
        source=source,
    )
    inputs = JobInput(
        measurements=arrays.to_npy(b),
        matrix=None if A is None else arrays.to_npy(A),
        matrix_seed=seed,
        m=m,
        target=None if truth is None else arrays.to_npy(truth),
        x_init=None if x0 is None else arrays.to_npy(x0),
    )
    job = _new_job(JobKind.cs, manifest, options, batch, params, inputs, settings)
    return submit(session, queue, job, admit)


# ---- reading and canceling ------------------------------------------------------------------


def get_job(
    session: Session, job_id: str, with_result: bool = True, owner: str | None = None
) -> Job:
    """The job, or 404; with `owner` set, another key's job is 404 too (app.auth)."""
    try:
        uuid.UUID(job_id)
    except ValueError:
        raise NotFound(f"no job {job_id!r} (job ids are UUIDs)") from None
    stmt = select(Job).where(Job.id == job_id)
    if owner is not None:
        stmt = stmt.where(Job.owner_key_id == owner)
    if with_result:
        stmt = stmt.options(selectinload(Job.result))
    job = session.scalars(stmt).one_or_none()
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return job


def cancel_job(session: Session, queue: JobQueue, job_id: str, owner: str | None = None) -> Job:
    """Mark a queued or running job canceled; its worker notices and stops writing.

    The status is the cancellation: a worker only claims `queued` rows and only writes while
    its row is `running` with its attempt, so nothing can resurrect the job afterwards.
    """
    job = get_job(session, job_id, owner=owner)
    if job.status not in ACTIVE:
        raise Problem(
            409,
            f"job {job_id} is already {job.status}; only queued or running jobs can be canceled",
            status_now=job.status,
        )
    if not lifecycle.cancel(session, job_id):
        session.refresh(job)
        raise Problem(409, f"job {job_id} finished meanwhile ({job.status})")
    queue.discard(job.queue_ref)
    session.refresh(job)
    return job


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    if a is None or b is None:
        return None
    return round((b - a).total_seconds(), 3)


@dataclass
class JobLinks:
    base: str

    def for_job(self, job_id: str) -> dict[str, str]:
        return {
            "self": f"{self.base}/jobs/{job_id}",
            "reconstruction": f"{self.base}/jobs/{job_id}/reconstruction.png",
            "preview": f"{self.base}/jobs/{job_id}/preview.png",
            "events": f"{self.base}/jobs/{job_id}/events",
        }


def progress_view(job: Job) -> dict[str, Any] | None:
    """The `progress` object of a job (app.schemas.Progress), or None before it started.

    Pass fields count only once this attempt wrote progress (a claim or re-queue clears
    progress_at); a finished job shows its last pass complete (tol may end one early)."""
    if job.stage is None and job.status != JobStatus.running.value:
        return None
    by_pass = job.pass_name is not None and job.progress_at is not None
    stage, stages = (job.pass_stage, job.pass_stages) if by_pass else (job.stage, job.stages)
    if by_pass and job.status == JobStatus.succeeded.value:
        stage = stages
    return {
        "pass": job.pass_name if by_pass else None,
        "pass_index": job.pass_index if by_pass else None,
        "pass_round": job.pass_round if by_pass else None,
        "stage": stage,
        "stages": stages,
        "step": job.pass_step if by_pass else None,
        "objective": job.objective,
        "updated_at": job.progress_at,
    }


def job_view(job: Job, now: datetime) -> dict[str, Any]:
    """The JSON shape of GET /jobs/{id} (see app.schemas.JobOut)."""
    links = JobLinks("").for_job(job.id)
    progress = progress_view(job)
    result: JobResult | None = job.result if job.status == JobStatus.succeeded.value else None
    end = job.finished_at or (now if job.status == JobStatus.running.value else None)
    timings = {
        "queued_s": _seconds(job.created_at, job.started_at),
        "run_s": _seconds(job.started_at, end),
        "solve_s": None if result is None else round(result.solve_seconds, 3),
    }
    return {
        "job_id": job.id,
        "kind": job.kind,
        "model_id": job.model_id,
        "method": job.method,
        "status": job.status,
        "params": job.params,
        "n_targets": job.n_targets,
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "heartbeat_at": job.heartbeat_at,
        "progress": progress,
        "timings": timings,
        "error": job.error,
        "result": None
        if result is None
        else {
            "latent": result.latent,
            "objective": result.objective,
            "pixel_error": result.pixel_error,
            "measurement_residual": result.measurement_residual,
            "evals": result.evals,
            "device": result.device,
            "pass_jobs": result.pass_jobs,
            "pass_targets": result.pass_targets,
            "trace": result.trace,
            "reconstruction_url": links["reconstruction"],
        },
        "links": links,
    }


def reconstruction_png(
    job: Job, manifest_value_range: Sequence[float], index: int, scale: int
) -> bytes:
    """PNG of G_T(x) for target `index`, rendered from the stored reconstruction array."""
    if job.status != JobStatus.succeeded.value or job.result is None:
        raise Problem(
            409,
            f"job {job.id} has no reconstruction yet (status {job.status})",
            status_now=job.status,
        )
    recon = arrays.from_npy(job.result.reconstruction)
    if not 0 <= index < recon.shape[0]:
        raise InvalidInput(
            f"index {index} is out of range: the job has {recon.shape[0]} targets", field="index"
        )
    return arrays.to_png(recon[index], manifest_value_range, scale)


def value_range_of(job: Job) -> list[float]:
    """The value range stored with the job (so rendering never needs the model store)."""
    vr = job.params.get("value_range")
    if isinstance(vr, list) and len(vr) == 2 and all(math.isfinite(float(v)) for v in vr):
        return [float(vr[0]), float(vr[1])]
    return [0.0, 1.0]
