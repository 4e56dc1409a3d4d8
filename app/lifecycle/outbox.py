"""The outbox: a job is queued when its row says `queued`, whatever Redis holds.

Submitting commits the row first and only then tries the queue. If the queue is down (or the
process dies in between), the row stays `queued` and the reconciler (`app.lifecycle.reconciler`)
enqueues it later; a queue entry is only ever a hint that a worker should look at the row.
"""

from __future__ import annotations

import logging

from sqlalchemy import update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from app.models import Job
from app.queue import JobQueue, QueueUnavailable

log = logging.getLogger(__name__)


def enqueue_row(session: Session, queue: JobQueue, job_id: str) -> str | None:
    """Put a committed row on the queue and record the entry; None (row left for the
    reconciler) when the queue cannot be reached."""
    try:
        ref = queue.enqueue(job_id)
    except QueueUnavailable as e:
        log.warning("job %s stays queued for the reconciler: %s", job_id, e)
        return None
    # Only where nobody recorded another entry meanwhile (a reconciler, a racing reaper).
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.queue_ref.is_(None))
        .values(queue_ref=ref)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return ref


def submit(session: Session, queue: JobQueue, job: Job) -> Job:
    """Commit the row as `queued`, then try to enqueue it. A queue outage is not an error for
    the client: the job is accepted and runs once the queue is back."""
    session.add(job)
    session.commit()
    ref = enqueue_row(session, queue, job.id)
    # The answer describes the job as submitted (`queued`), even if a worker took it already.
    set_committed_value(job, "queue_ref", ref)
    return job
