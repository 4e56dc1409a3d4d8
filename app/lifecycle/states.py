"""The states a job row moves through, and which moves are allowed.

    queued ──claim──▶ running ──finish──▶ succeeded
      ▲  │              │ └────fail────▶ failed
      │  └──cancel──┐   │ └───cancel───▶ canceled
      └───requeue───┼───┘  (the reaper: heartbeat stale, attempts left)
                    ▼
                 canceled

Every move is one guarded UPDATE whose WHERE clause re-checks the state it starts from (and,
for a running row, the attempt), so any number of processes may race for the same row and
exactly one wins. `attempt` counts claims: first attempt = 1; a row queued with attempt >= 1
is a retry of a lost attempt.
"""

from __future__ import annotations

from typing import Any

from app.models import ACTIVE, TERMINAL, Job, JobStatus

QUEUED = JobStatus.queued.value
RUNNING = JobStatus.running.value
SUCCEEDED = JobStatus.succeeded.value
FAILED = JobStatus.failed.value
CANCELED = JobStatus.canceled.value

# from-state -> the states one guarded transition may move it to
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELED, QUEUED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELED: frozenset(),
}

__all__ = [
    "ACTIVE",
    "CANCELED",
    "FAILED",
    "QUEUED",
    "RUNNING",
    "SUCCEEDED",
    "TERMINAL",
    "TRANSITIONS",
    "JobAborted",
    "attempt_guard",
]


class JobAborted(Exception):
    """The attempt must stop without writing: canceled, or superseded by a newer attempt."""


def attempt_guard(job_id: str, attempt: int) -> tuple[Any, ...]:
    """WHERE clause of every write an attempt makes: the row is still running *this* attempt."""
    return (Job.id == job_id, Job.attempt == attempt, Job.status == RUNNING)
