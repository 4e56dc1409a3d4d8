"""The lease a running attempt holds on its rows: `heartbeat_at`, refreshed from a side thread.

A pass may hold several jobs (coalescing); each is a `Member` with its own attempt. Every write
is guarded per member, and a member whose row no longer belongs to its attempt (canceled,
re-queued by the reaper) is marked lost and never written again. A database error in a beat is
only logged: the next beat retries, and the reaper's stale window is many beats long.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select, tuple_, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.db import utcnow
from app.lifecycle.states import RUNNING
from app.models import Job

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One job of a pass: its id, the attempt this worker holds, and whether it slipped away
    (canceled or re-queued behind our back: nothing more is written for it)."""

    job_id: str
    attempt: int
    lost: bool = False


def live(members: list[Member]) -> list[Member]:
    return [m for m in members if not m.lost]


def touch(
    sessions: sessionmaker[Session], members: list[Member], rows: dict[str, dict[str, Any]]
) -> None:
    """Guarded per-job UPDATEs (`rows[job_id]` for each live member) in one transaction;
    members whose row no longer belongs to their attempt are marked lost."""
    alive = live(members)
    if not alive:
        return
    stmt = (
        update(Job)
        .where(Job.id == bindparam("jid"), Job.attempt == bindparam("att"), Job.status == RUNNING)
        .execution_options(synchronize_session=False)
    )
    params = [{"jid": m.job_id, "att": m.attempt, **rows[m.job_id]} for m in alive]
    with sessions() as s:
        s.connection().execute(stmt, params)
        ours = set(
            s.scalars(
                select(Job.id).where(
                    tuple_(Job.id, Job.attempt).in_([(m.job_id, m.attempt) for m in alive]),
                    Job.status == RUNNING,
                )
            )
        )
        s.commit()
    for m in alive:
        if m.job_id not in ours:
            m.lost = True


class Heartbeat(threading.Thread):
    """Refreshes heartbeat_at of every job in the pass; sets `lost` once none is ours any more."""

    def __init__(
        self, sessions: sessionmaker[Session], members: list[Member], interval: float
    ) -> None:
        super().__init__(name=f"heartbeat-{members[0].job_id[:8]}", daemon=True)
        self.sessions, self.members, self.interval = sessions, members, interval
        self.lost = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                now = utcnow()
                touch(
                    self.sessions,
                    self.members,
                    {m.job_id: {"heartbeat_at": now} for m in self.members},
                )
            except SQLAlchemyError as e:  # a db blip must not kill the job; retry next beat
                log.warning("heartbeat for job %s failed: %s", self.members[0].job_id, e)
            if not live(self.members):
                self.lost.set()
                return

    def stop(self) -> None:
        self._stop_event.set()
