"""Guarded transitions: claim, finish, fail, cancel and requeue, each one UPDATE.

Each function re-checks the state it moves from in its WHERE clause and reports whether it
won (rowcount), so callers never read-then-write a status. See `app.lifecycle.states`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import utcnow
from app.lifecycle.states import (
    ACTIVE,
    CANCELED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobAborted,
    attempt_guard,
)
from app.models import Job, JobResult


def _won(res: Any) -> bool:
    return bool(res.rowcount)


# A new attempt starts its progress from nothing: no pass, no stale preview of the last one.
FRESH_PROGRESS: dict[str, Any] = {
    "stage": None, "objective": None, "progress_at": None, "pass_name": None,
    "pass_index": None, "pass_round": None, "pass_stage": None, "pass_stages": None,
    "pass_step": None, "preview_png": None, "preview_at": None,
}


def claim(sessions: sessionmaker[Session], job_id: str, worker: str) -> int | None:
    """queued -> running, attempt += 1; returns the new attempt, or None if not claimable.

    The single guard against running a job twice: duplicate queue entries are harmless."""
    now = utcnow()
    with sessions() as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == QUEUED)
            .values(
                status=RUNNING,
                attempt=Job.attempt + 1,
                started_at=now,
                heartbeat_at=now,
                worker=worker,
                finished_at=None,
                updated_at=now,
                **FRESH_PROGRESS,
            )
            .execution_options(synchronize_session=False)
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            s.rollback()
            return None
        attempt = s.scalar(select(Job.attempt).where(Job.id == job_id))
        s.commit()
        return int(attempt) if attempt is not None else None


def finish(
    sessions: sessionmaker[Session],
    job_id: str,
    attempt: int,
    stages_total: int,
    started_at: Any,
    result: JobResult,
) -> None:
    """running -> succeeded: status and result in one transaction, only for this attempt.

    Raises JobAborted when the row no longer belongs to the attempt (canceled, re-queued or
    already finished): a replayed write changes nothing."""
    now = utcnow()
    mean = [v for v in result.objective if v is not None]
    with sessions() as s:
        res = s.execute(
            update(Job)
            .where(*attempt_guard(job_id, attempt))
            .values(
                status=SUCCEEDED,
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
        if not _won(res):
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


def written(sessions: sessionmaker[Session], job_id: str, attempt: int) -> bool:
    """True when this attempt's result is the job's result (a finish whose reply was lost)."""
    with sessions() as s:
        row = s.execute(
            select(Job.status, JobResult.attempt)
            .join(JobResult, JobResult.job_id == Job.id)
            .where(Job.id == job_id)
        ).first()
    return row is not None and row[0] == SUCCEEDED and row[1] == attempt


def fail(
    sessions: sessionmaker[Session],
    job_id: str,
    attempt: int | None,
    error: str,
    queue_ref: str | None = None,
) -> bool:
    """running -> failed for this attempt (or, with attempt None, for this queue entry)."""
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
                status=FAILED,
                error=error[:4000],
                finished_at=now,
                run_seconds=(now - started).total_seconds() if started else None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        s.commit()
        return _won(res)


def cancel(session: Session, job_id: str, now: datetime | None = None) -> bool:
    """queued|running -> canceled. The status is the cancellation: a worker claims only
    `queued` rows and writes only while its attempt is `running`, so nothing resurrects it."""
    now = now or utcnow()
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE))
        .values(status=CANCELED, finished_at=now, error="canceled by client", updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return _won(res)


def requeue(session: Session, guard: list[Any], error: str, now: datetime) -> bool:
    """running -> queued for a lost attempt (the reaper passes its staleness guard). The row
    forgets its queue entry: the caller enqueues it afresh, or the reconciler does."""
    res = session.execute(
        update(Job)
        .where(*guard)
        .values(
            status=QUEUED,
            error=error,
            worker=None,
            **FRESH_PROGRESS,
            queue_ref=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return _won(res)


def give_up(
    session: Session, guard: list[Any], error: str, now: datetime, started: datetime | None
) -> bool:
    """running -> failed for a lost attempt with no attempts (or no queue) left."""
    res = session.execute(
        update(Job)
        .where(*guard)
        .values(
            status=FAILED,
            error=error,
            finished_at=now,
            run_seconds=(now - started).total_seconds() if started else None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return _won(res)
