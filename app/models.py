"""SQLAlchemy models: the database is the source of truth for job state and results.

RQ keeps its own job records only for a while (result TTL); these tables keep everything a
client can ask about, plus the inputs, so any job can be re-run.

Arrays (targets, measurements, matrices, reconstructions) are stored as `.npy` bytes: exact,
compact, and readable without pickle.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base, UTCDateTime, utcnow


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


TERMINAL = (JobStatus.succeeded.value, JobStatus.failed.value, JobStatus.canceled.value)
ACTIVE = (JobStatus.queued.value, JobStatus.running.value)


class JobKind(str, enum.Enum):
    invert = "invert"
    cs = "cs"


class Scope(str, enum.Enum):
    """What an API key may do; each scope includes the ones before it (app.auth)."""

    read = "read"
    submit = "submit"
    admin = "admin"


_STATUS_VALUES = ", ".join(f"'{s.value}'" for s in JobStatus)
_KIND_VALUES = ", ".join(f"'{k.value}'" for k in JobKind)
_SCOPE_VALUES = ", ".join(f"'{s.value}'" for s in Scope)


class ApiKey(Base):
    """An API key: the public id and a SHA-256 of the secret; the secret itself is never stored
    (app.services.keys explains why a fast hash suffices). Keys are revoked, never deleted, so
    a job's owner_key_id always names a row."""

    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint(f"scope IN ({_SCOPE_VALUES})", name="scope"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    scope: Mapped[str] = mapped_column(String(16))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Job(Base):
    """One inversion request and its lifecycle (queued -> running -> terminal)."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"status IN ({_STATUS_VALUES})", name="status"),
        CheckConstraint(f"kind IN ({_KIND_VALUES})", name="kind"),
        Index(None, "status", "heartbeat_at"),  # the reaper's query
        # One job per (key, Idempotency-Key); also serves "this key's active jobs" counts.
        Index(None, "owner_key_id", "idempotency_key", unique=True),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    model_id: Mapped[str] = mapped_column(String(64), index=True)
    method: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    n_targets: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value)
    # attempt counts claims by a worker; results carry the attempt that wrote them.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    queue_ref: Mapped[str | None] = mapped_column(String(80))
    worker: Mapped[str | None] = mapped_column(String(200))
    # Progress while running: stage t of T and the current mean objective.
    stage: Mapped[int | None] = mapped_column(Integer)
    stages: Mapped[int | None] = mapped_column(Integer)
    objective: Mapped[float | None] = mapped_column(Float)
    progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # ... and by passes (worker.progress): which pass (surf | rescue | restart | final | adam),
    # how many came before it, its round, stage t of T *of this pass* and the checkpoint's
    # training step. `stage`/`stages` above never grow mid-run; these restart per pass.
    pass_name: Mapped[str | None] = mapped_column(String(16))
    pass_index: Mapped[int | None] = mapped_column(Integer)
    pass_round: Mapped[int | None] = mapped_column(Integer)
    pass_stage: Mapped[int | None] = mapped_column(Integer)
    pass_stages: Mapped[int | None] = mapped_column(Integer)
    pass_step: Mapped[int | None] = mapped_column(Integer)
    # A small PNG of the first target's current reconstruction (at most ~1 per second);
    # deferred so that reading a job never drags it along.
    preview_png: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    preview_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    run_seconds: Mapped[float | None] = mapped_column(Float)
    # The API key that submitted the job (None with auth off); only it (or an admin) sees it.
    # No foreign key: adding one rebuilds the jobs table on SQLite, and keys are never deleted.
    owner_key_id: Mapped[str | None] = mapped_column(String(32))
    # Idempotency-Key of the POST and the SHA-256 of its canonical body (app.services.admission).
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # Completion webhook (optional): where to POST the final job document, and how that went
    # (webhook_status: pending | delivered | failed).
    callback_url: Mapped[str | None] = mapped_column(Text)
    webhook_status: Mapped[str | None] = mapped_column(String(16))
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    webhook_error: Mapped[str | None] = mapped_column(Text)

    inputs: Mapped[JobInput] = relationship(
        back_populates="job", cascade="all, delete-orphan", uselist=False, lazy="raise"
    )
    result: Mapped[JobResult | None] = relationship(
        back_populates="job", cascade="all, delete-orphan", uselist=False, lazy="raise"
    )


class JobInput(Base):
    """What the client sent, decoded and validated: enough to re-run the job."""

    __tablename__ = "job_inputs"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    target: Mapped[bytes | None] = mapped_column(LargeBinary)  # (B, *shape): image / true image
    measurements: Mapped[bytes | None] = mapped_column(LargeBinary)  # (B, m)
    matrix: Mapped[bytes | None] = mapped_column(LargeBinary)  # (m, n) when sent explicitly
    matrix_seed: Mapped[int | None] = mapped_column(Integer)
    m: Mapped[int | None] = mapped_column(Integer)
    x_init: Mapped[bytes | None] = mapped_column(LargeBinary)  # (B, k)

    job: Mapped[Job] = relationship(back_populates="inputs")


class JobResult(Base):
    """The outcome of the attempt that finished the job (written once, guarded by attempt)."""

    __tablename__ = "job_results"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    latent: Mapped[list[list[float]]] = mapped_column(JSON)
    objective: Mapped[list[float]] = mapped_column(JSON)
    pixel_error: Mapped[list[float] | None] = mapped_column(JSON)
    measurement_residual: Mapped[list[float] | None] = mapped_column(JSON)
    trace: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    evals: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))
    solve_seconds: Mapped[float] = mapped_column(Float)  # of the whole pass
    # The pass this job was solved in: jobs and targets coalesced into it (1 = ran alone).
    pass_jobs: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    pass_targets: Mapped[int | None] = mapped_column(Integer)
    reconstruction: Mapped[bytes] = mapped_column(LargeBinary)  # (B, *shape) float32 .npy
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="result")
