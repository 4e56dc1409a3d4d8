"""Retention: the inputs and results of jobs finished long ago are purged; the job row stays.

What goes is what is big: the arrays a job was sent (target, measurements, matrix, x_init) and
the bulk of its result (the latents, the reconstruction and the per-stage trace). What stays is
the job row (status, timings, method, params, error) and the result's summary (per-target
objective, pixel error and measurement residual, evals, device, solve time, pass size).

No schema change marks a purged job: a stored reconstruction is a .npy and never empty, so an
empty one means "purged" (its latents and trace become empty lists); purged inputs are NULL.

Only terminal jobs (succeeded, failed, canceled) are touched. A terminal state is final and
every UPDATE re-checks it, so a purge can never meet a queued or running job. Bounded: `batch`
jobs per transaction, `max_seconds` per call; on PostgreSQL a batch locks its job rows with
SKIP LOCKED, so purgers in several processes take disjoint batches, and every UPDATE only
changes rows not purged yet (RETURNING says which), so the counts add up and a rerun is a no-op.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TextIO

from sqlalchemy import ColumnElement, Text, cast, func, or_, select, tuple_, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import utcnow
from app.lifecycle.states import SUCCEEDED, TERMINAL
from app.models import Job, JobInput, JobResult

PURGED = b""  # the reconstruction of a purged result
BATCH = 500
BUDGET_S = 2.0  # per housekeeping run: a purge must not hold up reconciling and reaping
PURGE_EVERY_S = 600.0  # how often the Housekeeper purges

_INPUTS = (JobInput.target, JobInput.measurements, JobInput.matrix, JobInput.x_init)


@dataclass
class PurgeReport:
    """What one `purge` call did (or, with dry_run, would do)."""

    cutoff: datetime
    jobs: int = 0  # jobs whose payloads were removed
    bytes_freed: int = 0  # stored size of what was removed (approximate: column lengths)
    batches: int = 0
    complete: bool = True  # False: the time budget ran out, older jobs may be left
    dry_run: bool = False


def _unpurged() -> ColumnElement[bool]:
    """Payloads still there (over jobs outer-joined to their inputs and result)."""
    return or_(*(c.is_not(None) for c in _INPUTS), JobResult.reconstruction != PURGED)


def _expired(cutoff: datetime) -> tuple[ColumnElement[bool], ...]:
    """The state condition every statement re-checks: terminal and finished before cutoff."""
    return (Job.status.in_(TERMINAL), Job.finished_at < cutoff)


def _size() -> ColumnElement[Any]:
    """Bytes a job's payloads take (JSON measured as text): what a purge frees, roughly."""
    texts = [cast(c, Text) for c in (JobResult.latent, JobResult.trace)]
    parts = [func.coalesce(func.length(c), 0) for c in (*_INPUTS, JobResult.reconstruction, *texts)]
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def _batch(
    session: Session, cutoff: datetime, after: tuple[datetime, str] | None, n: int, lock: bool
) -> list[Any]:
    stmt = (
        select(Job.id, Job.finished_at, _size().label("size"))
        .outerjoin(JobInput, JobInput.job_id == Job.id)
        .outerjoin(JobResult, JobResult.job_id == Job.id)
        .where(*_expired(cutoff), _unpurged())
    )
    if after is not None:
        stmt = stmt.where(tuple_(Job.finished_at, Job.id) > tuple_(*after))
    stmt = stmt.order_by(Job.finished_at, Job.id).limit(n)
    if lock:  # PostgreSQL: other purgers skip these rows; SQLite has one writer anyway
        stmt = stmt.with_for_update(of=Job, skip_locked=True)
    return list(session.execute(stmt).all())


def _purge_rows(session: Session, ids: list[str], cutoff: datetime) -> set[str]:
    """Null the payloads of `ids` (guarded: still terminal and expired, not yet purged);
    returns the ids whose rows this call changed."""
    mine = select(Job.id).where(Job.id.in_(ids), *_expired(cutoff))
    session.execute(  # the live preview is progress, not a result: it goes too
        update(Job)
        .where(Job.id.in_(mine), Job.preview_png.is_not(None))
        .values(preview_png=None)
        .execution_options(synchronize_session=False)
    )
    done = session.scalars(
        update(JobInput)
        .where(JobInput.job_id.in_(mine), or_(*(c.is_not(None) for c in _INPUTS)))
        .values({c: None for c in _INPUTS})
        .returning(JobInput.job_id)
        .execution_options(synchronize_session=False)
    ).all()
    done += session.scalars(
        update(JobResult)
        .where(JobResult.job_id.in_(mine), JobResult.reconstruction != PURGED)
        .values(latent=[], trace=[], reconstruction=PURGED)
        .returning(JobResult.job_id)
        .execution_options(synchronize_session=False)
    ).all()
    return set(done)


def purge(
    session_factory: sessionmaker[Session],
    older_than: timedelta,
    now: datetime | None = None,
    batch: int = BATCH,
    max_seconds: float | None = BUDGET_S,
    dry_run: bool = False,
) -> PurgeReport:
    """Purge the inputs and result payloads of terminal jobs finished more than `older_than`
    ago, oldest first, `batch` jobs per transaction, until none are left or `max_seconds`
    (None: no limit) have passed. Safe to run from any number of processes at once."""
    if older_than <= timedelta(0):
        raise ValueError(f"older_than must be positive, not {older_than}")
    started = time.monotonic()
    report = PurgeReport(cutoff=(now or utcnow()) - older_than, dry_run=dry_run)
    after: tuple[datetime, str] | None = None
    while True:
        if report.batches and max_seconds is not None and time.monotonic() - started > max_seconds:
            report.complete = False
            break
        with session_factory() as s:
            rows = _batch(s, report.cutoff, after, batch, lock=not dry_run)
            if not rows:
                break
            sizes = {r.id: int(r.size or 0) for r in rows}
            if dry_run:
                done = set(sizes)
            else:
                done = _purge_rows(s, list(sizes), report.cutoff)
                s.commit()
        report.batches += 1
        report.jobs += len(done)
        report.bytes_freed += sum(sizes[j] for j in done)
        if len(rows) < batch:
            break
        after = (rows[-1].finished_at, rows[-1].id)
    return report


def is_purged(job: Job) -> bool:
    """A succeeded job whose result payload retention removed (needs `job.result` loaded)."""
    result = job.result
    return job.status == SUCCEEDED and result is not None and result.reconstruction == PURGED


def purged_detail(job: Job, retention_days: int, now: datetime | None = None) -> str:
    """What a 410 for a purged job's payload says: that it was purged, and after how long
    (the API wraps it in a problem; this package stays free of HTTP)."""
    days = ((now or utcnow()) - job.finished_at).days if job.finished_at else "?"
    kept = (
        f"results are kept {retention_days} days (SURFING_RETENTION_DAYS)"
        if retention_days
        else "an operator purged it (`surfing jobs purge`)"
    )
    return (
        f"the inputs and results of job {job.id} were purged: it finished {days} days ago and "
        f"{kept}; its summary is still at /jobs/{job.id}"
    )


def command(older_than_days: int | None, dry_run: bool = False, out: TextIO | None = None) -> None:
    """`surfing jobs purge` against the configured database (DATABASE_URL, or the embedded
    SQLite file, migrated first like `surfing serve` would); no time limit."""
    out = out or sys.stdout
    from app.db import session_factory, upgrade_database
    from app.settings import get_settings

    if older_than_days is not None and older_than_days < 1:
        raise ValueError(f"--older-than-days must be at least 1, not {older_than_days}")
    settings = get_settings()
    days = settings.retention_days if older_than_days is None else older_than_days
    if days <= 0:
        print("retention is off (SURFING_RETENTION_DAYS=0): nothing purged; "
              "pass --older-than-days N to purge anyway", file=out)
        return
    if settings.should_migrate:
        upgrade_database(settings.sqlalchemy_url)
    sessions = session_factory(settings.sqlalchemy_url)
    r = purge(sessions, timedelta(days=days), max_seconds=None, dry_run=dry_run)
    verb, freed = ("would purge", "would be freed") if dry_run else ("purged", "freed")
    print(f"{verb} {r.jobs} job(s) finished more than {days} days ago (before "
          f"{r.cutoff:%Y-%m-%d %H:%M} UTC): {r.bytes_freed:,} bytes "
          f"({r.bytes_freed / 1e6:.2f} MB) {freed}", file=out)
