"""Reconciler: every `queued` row ends up on the queue, whatever happened to Redis.

A row can be `queued` with no live queue entry after a Redis flush or a restart without
persistence, a failed enqueue (Redis down at submit, or when the reaper re-queued), a crash
between the commit and the enqueue, or a worker that popped the entry during a database
outage. Each run looks at queued rows older than a grace period (younger ones may be between
commit and enqueue), asks the queue which of their entries are still waiting, and enqueues the
rest afresh.

Duplicates are harmless: the guarded claim (`queued -> running`) is the only thing that starts
a job, so a second entry for a row is skipped by whichever worker pops it. Still, each row is
reserved first (a guarded UPDATE of its `queue_ref` to a one-off marker, which also makes it
young again), so reconcilers running in every worker and API process do not pile up entries.

Bounded: at most `batch` rows and `budget_s` seconds per run, scanning the queued rows in
(updated_at, id) order from where the last run stopped; an empty queue costs one indexed
SELECT and no Redis call.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime, timedelta

from sqlalchemy import select, tuple_, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import utcnow
from app.lifecycle.states import QUEUED
from app.models import Job
from app.queue import JobQueue, QueueUnavailable
from app.settings import Settings

log = logging.getLogger(__name__)

PENDING = "pending."  # queue_ref of a row a reconciler is enqueueing right now
BATCH = 200
BUDGET_S = 2.0


def grace_s(settings: Settings) -> float:
    """Rows younger than this are left alone: two heartbeats (10 s by default)."""
    return 2 * settings.heartbeat_interval_s


class Reconciler:
    """Enqueues queued rows whose queue entry is gone; keeps its scan position between runs."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        queue: JobQueue,
        grace: float,
        batch: int = BATCH,
        budget_s: float = BUDGET_S,
    ) -> None:
        self.sessions, self.queue = sessions, queue
        self.grace, self.batch, self.budget_s = grace, batch, budget_s
        self._cursor: tuple[datetime, str] | None = None

    def run(self, now: datetime | None = None) -> list[str]:
        """One bounded pass; returns the ids enqueued."""
        started = time.monotonic()
        cutoff = (now or utcnow()) - timedelta(seconds=self.grace)
        stmt = select(Job.id, Job.queue_ref, Job.updated_at).where(
            Job.status == QUEUED, Job.updated_at < cutoff
        )
        if self._cursor is not None:
            stmt = stmt.where(tuple_(Job.updated_at, Job.id) > tuple_(*self._cursor))
        with self.sessions() as s:
            rows = s.execute(stmt.order_by(Job.updated_at, Job.id).limit(self.batch)).all()
        # a full batch: continue after it next time; a short one: start over next time
        self._cursor = (rows[-1][2], rows[-1][0]) if len(rows) == self.batch else None
        if not rows:
            return []
        refs = [ref for _, ref, _ in rows if ref and not ref.startswith(PENDING)]
        try:
            waiting = self.queue.waiting(refs) if refs else set()
        except QueueUnavailable as e:
            log.info("reconciler: queue unavailable (%s); %d queued row(s) wait", e, len(rows))
            return []
        enqueued: list[str] = []
        for job_id, ref, updated_at in rows:
            if ref in waiting:
                continue
            if time.monotonic() - started > self.budget_s:
                break
            try:
                if self._enqueue(job_id, ref, updated_at):
                    enqueued.append(job_id)
            except QueueUnavailable as e:
                log.info("reconciler: queue unavailable (%s); will retry", e)
                break
        if enqueued:
            shown = ", ".join(enqueued[:5]) + (", ..." if len(enqueued) > 5 else "")
            log.warning("reconciler: enqueued %d missing job(s): %s", len(enqueued), shown)
        return enqueued

    @property
    def at_end(self) -> bool:
        """The last run reached the end of the queued rows (the next one starts over)."""
        return self._cursor is None

    def _enqueue(self, job_id: str, old_ref: str | None, old_updated_at: datetime) -> bool:
        marker = f"{PENDING}{uuid.uuid4().hex[:12]}"
        same_ref = Job.queue_ref.is_(None) if old_ref is None else Job.queue_ref == old_ref
        mine = (Job.id == job_id, Job.queue_ref == marker)
        with self.sessions() as s:
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == QUEUED, same_ref)
                .values(queue_ref=marker, updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            s.commit()
            if not res.rowcount:  # type: ignore[attr-defined]
                return False  # claimed, canceled or reserved by another reconciler meanwhile
            try:
                ref = self.queue.enqueue(job_id)
            except QueueUnavailable:  # give the row back as it was: due at the next run
                s.execute(
                    update(Job)
                    .where(*mine)
                    .values(queue_ref=old_ref, updated_at=old_updated_at)
                    .execution_options(synchronize_session=False)
                )
                s.commit()
                raise
            s.execute(
                update(Job)
                .where(*mine)
                .values(queue_ref=ref)
                .execution_options(synchronize_session=False)
            )
            s.commit()
        return True


def requeue_orphans(sessions: sessionmaker[Session], queue: JobQueue) -> int:
    """Embedded start-up: every row left `queued` by a previous process goes back on the
    (empty, in-memory) queue at once, without a grace period."""
    reconciler = Reconciler(sessions, queue, grace=0.0, budget_s=float("inf"))
    total = 0
    while True:
        n = len(reconciler.run(now=utcnow() + timedelta(seconds=1)))
        total += n
        if reconciler.at_end and n == 0:
            return total
