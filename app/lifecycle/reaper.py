"""Reaper: a `running` job whose worker died must not stay `running` forever.

A running job's worker refreshes `heartbeat_at` every few seconds (`app.lifecycle.lease`). When
the heartbeat is older than `stale_after_s`, the worker is presumed dead: the job is re-queued
if it has attempts left, otherwise failed with the reason. Every transition is a guarded
UPDATE (status, attempt and staleness re-checked in the WHERE clause), so any number of
reapers (workers, API processes) can run at once without double re-queues, and a worker that
was merely slow finds its attempt superseded and stops without writing.

A re-queued row is `queued` before it is on the queue: if the queue is down, the reconciler
puts it there later. It runs at worker start-up, periodically inside every worker and the API
(`app.lifecycle.housekeeping`), and on GET /jobs/{id} for that job.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.orm import Session, sessionmaker

from app.db import utcnow
from app.lifecycle.outbox import enqueue_row
from app.lifecycle.states import RUNNING
from app.lifecycle.transitions import give_up, requeue
from app.models import Job
from app.queue import JobQueue
from app.settings import Settings

log = logging.getLogger(__name__)


def reap_stale_jobs(
    sessions: sessionmaker[Session],
    queue: JobQueue | None,
    settings: Settings,
    *,
    job_id: str | None = None,
    assume_dead: bool = False,
    now: datetime | None = None,
) -> list[tuple[str, str]]:
    """Re-queue or fail running jobs with a stale heartbeat; returns [(job_id, action)].

    `assume_dead` treats every running job as lost regardless of its heartbeat: right for the
    embedded runner at start-up, whose previous process can no longer be running anything.
    Without a `queue`, lost jobs are failed rather than re-queued.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=settings.stale_after_s)
    stale: ColumnElement[bool] = or_(Job.heartbeat_at < cutoff, Job.heartbeat_at.is_(None))
    actions: list[tuple[str, str]] = []
    with sessions() as session:
        stmt = select(Job.id, Job.attempt, Job.max_attempts, Job.heartbeat_at, Job.started_at)
        stmt = stmt.where(Job.status == RUNNING)
        if not assume_dead:
            stmt = stmt.where(stale)
        if job_id is not None:
            stmt = stmt.where(Job.id == job_id)
        rows = session.execute(stmt).all()
        for jid, attempt, max_attempts, heartbeat, started in rows:
            guard = [Job.id == jid, Job.status == RUNNING, Job.attempt == attempt]
            if not assume_dead:
                guard.append(stale)
            last = heartbeat.isoformat(timespec="seconds") if heartbeat else "never"
            lost = f"worker lost during attempt {attempt} (last heartbeat {last})"
            if queue is not None and attempt < max_attempts:
                if not requeue(session, guard, f"{lost}; re-queued", now):
                    continue  # someone else handled it, or it came back to life
                enqueue_row(session, queue, jid)  # on failure the reconciler enqueues it
                actions.append((jid, "requeued"))
            else:
                why = (
                    f"gave up after {attempt} of {max_attempts} attempts"
                    if attempt >= max_attempts
                    else "no queue to retry on"
                )
                if give_up(session, guard, f"{lost}; {why}", now, started):
                    actions.append((jid, "failed"))
    for jid, action in actions:
        log.warning("reaper: job %s %s (stale heartbeat)", jid, action)
    return actions
