"""Bookkeeping of one attempt: claim, companions, lease, finish or fail. The arithmetic is
the caller's `solve` step (`worker.jobs.solve_pass`); every state change goes through
`app.lifecycle`.

1. *Claim* the job (`queued -> running`, attempt += 1). A row that is not `queued` (canceled,
   taken by another worker, finished) is skipped: duplicate queue entries are harmless.
2. *Companions* (`worker.coalesce`): a first attempt also claims queued first attempts that can
   share its pass. A retry (attempt >= 2: an earlier attempt was lost, maybe by crashing its
   worker) always runs alone, so it can never cost another job an attempt.
3. A heartbeat thread holds the lease on every row of the pass; the solve step writes progress.
4. *Finish* each job in its own guarded transaction, retried through a short database outage
   (`app.lifecycle.DbRetry`); a job canceled or re-queued meanwhile is dropped alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app import lifecycle
from app.lifecycle import DbRetry, Heartbeat, JobAborted, Member, live, webhooks
from app.models import JobResult
from app.settings import Settings
from models_store import StoreError
from surfing.architectures import StateMismatch, UnknownArchitecture
from worker.coalesce import find_companions
from worker.progress import JobTimedOut
from worker.runtime import worker_name

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """One job's share of a finished pass, ready to be written."""

    member: Member
    result: JobResult
    stages_total: int  # with this job's rescue stages
    started_at: Any


@dataclass
class PassOutcome:
    outcomes: list[Outcome]
    solve_seconds: float
    targets: int
    objective: list[float]  # the first job's, for the return value


SolveStep = Callable[[sessionmaker[Session], list[Member], Settings, Heartbeat], PassOutcome]


def run_attempt(
    sessions: sessionmaker[Session], job_id: str, settings: Settings, solve: SolveStep
) -> dict[str, Any]:
    """One attempt of `job_id` (plus companions); the return value is what RQ records."""
    me = worker_name()
    attempt = lifecycle.claim(sessions, job_id, me)
    if attempt is None:
        log.info("job %s is not queued any more (canceled or taken); skipping", job_id)
        return {"job_id": job_id, "skipped": True}
    members = [Member(job_id, attempt)]
    beat: Heartbeat | None = None
    try:
        if settings.coalesce_max_targets > 0 and attempt == 1:  # retries run alone
            for other in find_companions(sessions, job_id, settings.coalesce_max_targets):
                other_attempt = lifecycle.claim(sessions, other, me)
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
        done = solve(sessions, members, settings, beat)
        written = _finish_all(sessions, done.outcomes)
        log.info(
            "job %s attempt %d succeeded in %.2f s (%d job(s), %d targets in the pass)",
            job_id,
            attempt,
            done.solve_seconds,
            len(members),
            done.targets,
        )
        return {
            "job_id": job_id,
            "attempt": attempt,
            "objective": done.objective,
            "coalesced": [m.job_id for m in members[1:]],
            "written": written,
        }
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
        # Completion webhooks go out on background threads: this only schedules them.
        webhooks.notify(sessions, settings, [m.job_id for m in members])


def _finish_all(sessions: sessionmaker[Session], outcomes: list[Outcome]) -> list[str]:
    """Write every live job's result; JobAborted when none could be written."""
    retry = DbRetry()
    written = []
    for o in outcomes:
        m = o.member
        if m.lost:
            continue
        errors = retry.failures
        try:
            retry(
                f"result of job {m.job_id}",
                lambda o=o, m=m: lifecycle.finish(
                    sessions, m.job_id, m.attempt, o.stages_total, o.started_at, o.result
                ),
            )
            written.append(m.job_id)
        except JobAborted as e:
            # After an error the write may have committed with its reply lost: check.
            if retry.failures > errors and retry(
                "result check", lambda m=m: lifecycle.written(sessions, m.job_id, m.attempt)
            ):
                written.append(m.job_id)
                continue
            m.lost = True  # this one was canceled at the last moment; the rest stand
            log.info("job %s attempt %d not written: %s", m.job_id, m.attempt, e)
    if not written:
        raise JobAborted(
            "every job of the pass was canceled or re-queued before its result was written"
        )
    return written


def _fail_all(sessions: sessionmaker[Session], members: list[Member], reason: str) -> None:
    """Fail every live job of the pass, retried through a short outage; past that, the rows
    stay running with a dying lease and the reaper settles them."""
    retry = DbRetry()
    for m in live(members):
        try:
            retry(f"failure of job {m.job_id}", lambda m=m: lifecycle.fail(
                sessions, m.job_id, m.attempt, reason
            ))
        except SQLAlchemyError as e:
            log.error("job %s attempt %d: could not record failure (%s)", m.job_id, m.attempt, e)
