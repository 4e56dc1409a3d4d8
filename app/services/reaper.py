"""Reaper: a `running` job whose worker died must not stay `running` forever.

A running job's worker refreshes `heartbeat_at` every few seconds from a side thread. When
the heartbeat is older than `stale_after_s`, the worker is presumed dead: the job is re-queued
if it has attempts left, otherwise failed with the reason. Every transition is a guarded
UPDATE (status, attempt and staleness re-checked in the WHERE clause), so any number of
reapers (workers, API processes) can run at once without double re-queues, and a worker that
was merely slow finds its attempt superseded and stops without writing.

It runs at worker start-up, periodically inside every worker, periodically in the API, and on
GET /jobs/{id} for that job.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import utcnow
from app.models import Job, JobStatus
from app.queue import JobQueue, QueueUnavailable
from app.settings import Settings

log = logging.getLogger(__name__)

RUNNING = JobStatus.running.value


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
                res = session.execute(
                    update(Job)
                    .where(*guard)
                    .values(
                        status=JobStatus.queued.value,
                        error=f"{lost}; re-queued",
                        stage=None,
                        objective=None,
                        progress_at=None,
                        worker=None,
                        updated_at=now,
                    )
                    .execution_options(synchronize_session=False)
                )
                session.commit()
                if not res.rowcount:  # type: ignore[attr-defined]
                    continue  # someone else handled it, or it came back to life
                try:
                    ref = queue.enqueue(jid)
                except QueueUnavailable as e:
                    session.execute(
                        update(Job)
                        .where(Job.id == jid, Job.status == JobStatus.queued.value)
                        .values(
                            status=JobStatus.failed.value,
                            error=f"{lost}; could not re-queue: {e}",
                            finished_at=now,
                            updated_at=now,
                        )
                    )
                    session.commit()
                    actions.append((jid, "failed"))
                    continue
                session.execute(update(Job).where(Job.id == jid).values(queue_ref=ref))
                session.commit()
                actions.append((jid, "requeued"))
            else:
                why = (
                    f"gave up after {attempt} of {max_attempts} attempts"
                    if attempt >= max_attempts
                    else "no queue to retry on"
                )
                res = session.execute(
                    update(Job)
                    .where(*guard)
                    .values(
                        status=JobStatus.failed.value,
                        error=f"{lost}; {why}",
                        finished_at=now,
                        run_seconds=(now - started).total_seconds() if started else None,
                        updated_at=now,
                    )
                    .execution_options(synchronize_session=False)
                )
                session.commit()
                if res.rowcount:  # type: ignore[attr-defined]
                    actions.append((jid, "failed"))
    for jid, action in actions:
        log.warning("reaper: job %s %s (stale heartbeat)", jid, action)
    return actions


def requeue_orphans(sessions: sessionmaker[Session], queue: JobQueue) -> int:
    """Embedded start-up: put rows left `queued` by a previous process back on the runner."""
    with sessions() as session:
        ids = list(session.scalars(select(Job.id).where(Job.status == JobStatus.queued.value)))
    for jid in ids:
        queue.enqueue(jid)
    return len(ids)


class PeriodicReaper:
    """Runs `reap_stale_jobs` every `interval` seconds on a daemon thread."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        queue: JobQueue | None,
        settings: Settings,
        interval: float | None = None,
    ) -> None:
        import threading

        self.sessions, self.queue, self.settings = sessions, queue, settings
        self.interval = interval or max(1.0, settings.stale_after_s / 2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="surfing-reaper", daemon=True)

    def start(self) -> PeriodicReaper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                reap_stale_jobs(self.sessions, self.queue, self.settings)
            except Exception:  # keep reaping after a db or Redis blip
                log.exception("reaper pass failed")
