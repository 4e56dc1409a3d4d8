"""A job's life, in one place: states, guarded transitions, leases, the outbox, reconciling
and reaping. The API, the worker and the in-process runner all move jobs only through here.

    states.py        the states, the allowed moves, the per-attempt write guard
    transitions.py   claim, finish, fail, cancel, requeue, give_up: one guarded UPDATE each
    lease.py         Member, touch, Heartbeat: a running attempt's hold on its rows
    retry.py         DbRetry: the final write outlasts a short database outage
    outbox.py        submit, enqueue_row: the row is committed `queued` before any enqueue
    reconciler.py    queued rows whose queue entry is gone go back on the queue
    reaper.py        running rows whose heartbeat went stale are re-queued or failed
    housekeeping.py  Housekeeper: reconciler + reaper on a timer in every process
    presence.py      workers' own Redis heartbeats, so /readyz counts only live ones

Dependencies run one way: `worker` imports this package; nothing here imports `worker`.
"""

from app.lifecycle.housekeeping import Housekeeper
from app.lifecycle.lease import Heartbeat, Member, live, touch
from app.lifecycle.outbox import enqueue_row, submit
from app.lifecycle.reaper import reap_stale_jobs
from app.lifecycle.reconciler import Reconciler, grace_s, requeue_orphans
from app.lifecycle.retry import FINISH_RETRY_S, DbRetry
from app.lifecycle.states import JobAborted, attempt_guard
from app.lifecycle.transitions import cancel, claim, fail, finish, give_up, requeue, written

__all__ = [
    "FINISH_RETRY_S",
    "DbRetry",
    "Heartbeat",
    "Housekeeper",
    "JobAborted",
    "Member",
    "Reconciler",
    "attempt_guard",
    "cancel",
    "claim",
    "enqueue_row",
    "fail",
    "finish",
    "give_up",
    "grace_s",
    "live",
    "reap_stale_jobs",
    "requeue",
    "requeue_orphans",
    "submit",
    "touch",
    "written",
]
