"""The job lifecycle (app.lifecycle) on SQLite, every transition on cue:

- the outbox: a job whose enqueue fails is accepted and stays `queued`;
- the reconciler enqueues queued rows whose queue entry is gone, once, in bounded batches,
  leaves young rows alone, and keeps away from rows it does not own any more;
- the reaper leaves a lost job `queued` when the queue is down (no more failing it);
- retries never share a pass with first attempts;
- progress writes and the final write outlast a short database outage;
- `app` builds the embedded runner from an allow-listed name and never imports `worker`.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Collection
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from app import lifecycle
from app.db import utcnow
from app.lifecycle import Reconciler, reap_stale_jobs
from app.models import Job, JobResult
from app.queue import QueueUnavailable, load_runner
from app.schemas import SolveOptions
from app.services.jobs import create_invert_job
from worker import jobs as wj

REPO = Path(__file__).resolve().parents[1]


class LossyQueue:
    """A queue that can go down (enqueue raises) or lose its entries (a Redis flush)."""

    kind = "lossy"

    def __init__(self) -> None:
        self.enqueued: list[str] = []
        self.alive: set[str] = set()
        self.down = False

    def enqueue(self, job_id: str) -> str:
        if self.down:
            raise QueueUnavailable("connection refused")
        self.enqueued.append(job_id)
        ref = f"{job_id}_{len(self.enqueued)}"
        self.alive.add(ref)
        return ref

    def waiting(self, refs: Collection[str]) -> set[str]:
        if self.down:
            raise QueueUnavailable("connection refused")
        return self.alive.intersection(refs)

    def flush(self) -> None:
        self.alive.clear()

    def start(self) -> None: ...

    def close(self) -> None: ...

    def discard(self, queue_ref: str | None) -> None: ...

    def depth(self) -> int:
        return len(self.alive)

    def workers(self) -> int:
        return 1

    def ping(self) -> None: ...


@pytest.fixture
def lenv(env: dict[str, Any]) -> dict[str, Any]:
    return {**env, "queue": LossyQueue()}


def new_job(env: dict[str, Any], value: float = 0.5, **options: Any) -> str:
    opts = SolveOptions.model_validate({"method": "surf", "steps": 2, "final_steps": 4, **options})
    with env["sessions"]() as s:
        return create_invert_job(
            s,
            env["store"],
            env["settings"],
            env["queue"],
            "tiny",
            opts,
            np.full((1, 28, 28), value).tolist(),
            "test",
        ).id


def row(env: dict[str, Any], job_id: str) -> Job:
    with env["sessions"]() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def age(env: dict[str, Any], job_id: str, seconds: float = 60, heartbeat: bool = False) -> None:
    then = utcnow() - timedelta(seconds=seconds)
    values = {"heartbeat_at": then} if heartbeat else {"updated_at": then}
    with env["sessions"]() as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))
        s.commit()


def test_submit_with_the_queue_down_is_accepted_and_reconciled_once(lenv: dict[str, Any]) -> None:
    queue: LossyQueue = lenv["queue"]
    queue.down = True
    jid = new_job(lenv)
    job = row(lenv, jid)
    assert (job.status, job.queue_ref, job.error) == ("queued", None, None)
    reconciler = Reconciler(lenv["sessions"], queue, grace=5.0)
    assert reconciler.run() == []  # young: maybe between commit and enqueue
    age(lenv, jid)
    assert reconciler.run() == []  # old enough, but the queue is still down
    queue.down = False
    assert reconciler.run() == [jid]
    assert queue.enqueued == [jid] and row(lenv, jid).queue_ref == f"{jid}_1"
    age(lenv, jid)
    assert reconciler.run() == []  # its entry is waiting now: nothing to do
    assert Reconciler(lenv["sessions"], queue, grace=0.0).run() == []
    assert queue.enqueued == [jid]


def test_lost_entries_are_enqueued_again_once_across_reconcilers(lenv: dict[str, Any]) -> None:
    queue: LossyQueue = lenv["queue"]
    ids = [new_job(lenv, 0.1 * i) for i in range(7)]
    running = ids.pop()
    assert lifecycle.claim(lenv["sessions"], running, "w") == 1
    for jid in ids:
        age(lenv, jid)
    queue.flush()  # Redis restarted without persistence
    first = Reconciler(lenv["sessions"], queue, grace=5.0, batch=4)
    second = Reconciler(lenv["sessions"], queue, grace=5.0, batch=4)
    got = first.run()
    assert len(got) == 4 and not first.at_end  # a full batch: it continues there next time
    rest = second.run()  # another process's reconciler takes the rest, not the same rows
    assert sorted(got + rest) == sorted(ids) and second.at_end
    assert first.run() == [] and second.run() == []
    assert sorted(queue.enqueued[len(ids) + 1 :]) == sorted(ids)  # each once; not the running one
    for jid in ids:
        assert row(lenv, jid).queue_ref in queue.alive
    # Two reconcilers that read the same stale row: the reservation lets only one enqueue it.
    queue.flush()
    stale_ref = row(lenv, ids[0]).queue_ref
    stale_at = row(lenv, ids[0]).updated_at
    assert first._enqueue(ids[0], stale_ref, stale_at) is True
    assert second._enqueue(ids[0], stale_ref, stale_at) is False


def test_reaper_with_the_queue_down_leaves_the_job_queued(lenv: dict[str, Any]) -> None:
    queue: LossyQueue = lenv["queue"]
    jid = new_job(lenv)
    assert lifecycle.claim(lenv["sessions"], jid, "dead") == 1
    age(lenv, jid, heartbeat=True)
    queue.down = True
    assert reap_stale_jobs(lenv["sessions"], queue, lenv["settings"]) == [(jid, "requeued")]
    job = row(lenv, jid)
    assert job.status == "queued" and job.queue_ref is None and job.attempt == 1
    queue.down = False
    age(lenv, jid)
    assert Reconciler(lenv["sessions"], queue, grace=5.0).run() == [jid]
    out = wj.run_job(jid, lenv["settings"])
    assert out["attempt"] == 2 and row(lenv, jid).status == "succeeded"


def test_retries_never_share_a_pass_with_first_attempts(lenv: dict[str, Any]) -> None:
    sessions = lenv["sessions"]
    retry, other_retry, *firsts = [new_job(lenv, 0.1 * (i + 1), seed=i) for i in range(5)]
    for jid in (retry, other_retry):  # attempt 1 lost: the reaper re-queues them
        assert lifecycle.claim(sessions, jid, "dead") == 1
        age(lenv, jid, heartbeat=True)
    assert len(reap_stale_jobs(sessions, lenv["queue"], lenv["settings"])) == 2
    out = wj.run_job(retry, lenv["settings"])
    assert out["attempt"] == 2 and out["coalesced"] == []  # four compatible jobs were queued
    out = wj.run_job(firsts[0], lenv["settings"])
    assert out["attempt"] == 1 and out["coalesced"] == firsts[1:]  # not the queued retry
    assert row(lenv, other_retry).status == "queued"
    with sessions() as s:
        results = {j: s.get(JobResult, j) for j in (retry, *firsts)}
    assert results[retry] is not None and results[retry].pass_jobs == 1
    assert all(r is not None and (r.attempt, r.pass_jobs) == (1, 3) for j, r in results.items()
               if j != retry)


class FlakyDatabase:
    """A session factory that refuses every session while `down` (a database outage)."""

    def __init__(self, real: Any) -> None:
        self.real, self.down, self.refused = real, False, 0

    def __call__(self) -> Any:
        if self.down:
            self.refused += 1
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("database is down"))
        return self.real()


def test_progress_and_result_writes_outlast_a_database_outage(
    lenv: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = lenv["settings"].model_copy(update={"progress_interval_s": 0.0})
    calm = new_job(lenv, 0.3, seed=4)
    wj.run_job(calm, settings)  # the same job without an outage, for reference
    stormy = new_job(lenv, 0.3, seed=4)
    flaky = FlakyDatabase(lenv["sessions"])
    monkeypatch.setattr(wj, "session_factory", lambda url: flaky)
    solve = wj._solve

    def solve_in_an_outage(*args: Any, **kwargs: Any) -> Any:
        flaky.down = True  # every progress write of the pass hits the outage ...
        try:
            return solve(*args, **kwargs)
        finally:  # ... and so do the first tries of the result write
            threading.Timer(0.5, lambda: setattr(flaky, "down", False)).start()

    monkeypatch.setattr(wj, "_solve", solve_in_an_outage)
    out = wj.run_job(stormy, settings)
    assert out["attempt"] == 1 and out["written"] == [stormy]
    assert flaky.refused >= 3  # progress writes and result tries, refused
    with lenv["sessions"]() as s:
        job, res, ref = s.get(Job, stormy), s.get(JobResult, stormy), s.get(JobResult, calm)
        assert job is not None and res is not None and ref is not None
        assert (job.status, job.attempt, res.attempt) == ("succeeded", 1, 1)
        assert res.latent == ref.latent and res.objective == ref.objective


def test_a_job_popped_during_a_database_outage_is_enqueued_again(
    lenv: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    queue: LossyQueue = lenv["queue"]
    jid = new_job(lenv)
    flaky = FlakyDatabase(lenv["sessions"])
    flaky.down = True
    monkeypatch.setattr(wj, "session_factory", lambda url: flaky)
    ref = row(lenv, jid).queue_ref
    queue.alive.discard(str(ref))  # a worker popped the entry ...
    with pytest.raises(OperationalError):  # ... and could not claim the row (RQ: failed)
        wj.run_job(jid, lenv["settings"])
    assert row(lenv, jid).status == "queued"
    age(lenv, jid)
    assert Reconciler(lenv["sessions"], queue, grace=5.0).run() == [jid]
    assert queue.enqueued == [jid, jid] and row(lenv, jid).queue_ref in queue.alive
    flaky.down = False
    assert wj.run_job(jid, lenv["settings"])["attempt"] == 1


def test_a_replayed_finish_after_a_lost_reply_counts_as_written(
    lenv: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The result committed but the reply was lost: the retry finds it written, not aborted."""
    from worker import attempt

    jid = new_job(lenv)
    real = lifecycle.finish
    calls = []

    def commit_then_drop(*args: Any) -> None:
        calls.append(args[1])
        if len(calls) == 1:
            real(*args)
            raise OperationalError("COMMIT", {}, ConnectionResetError("reply lost"))
        real(*args)  # the replay: the guard refuses it (JobAborted)

    monkeypatch.setattr(attempt.lifecycle, "finish", commit_then_drop)
    out = wj.run_job(jid, lenv["settings"])
    assert out["written"] == [jid] and calls == [jid, jid]
    assert row(lenv, jid).status == "succeeded"


def test_the_embedded_runner_comes_from_an_allow_list(
    tmp_path: Path, env: dict[str, Any]
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with pytest.raises(ValueError, match="not an allowed job runner"):
        load_runner("os.system")
    assert load_runner() is wj.embedded_runner
    ran: list[str] = []

    def factory(settings: Any) -> Any:
        return lambda job_id: ran.append(job_id) or wj.run_job(job_id, settings)

    settings = env["settings"]
    with TestClient(create_app(settings, runner=factory)) as client:
        job = client.post(
            "/invert",
            json={"model_id": "tiny", "image": np.full((1, 28, 28), 0.5).tolist(),
                  "method": "adam", "direct_steps": 3},
        )
        assert job.status_code == 202, job.text
        jid = job.json()["job_id"]
        for _ in range(300):
            if client.get(f"/jobs/{jid}").json()["status"] == "succeeded":
                break
            threading.Event().wait(0.05)
        assert client.get(f"/jobs/{jid}").json()["status"] == "succeeded"
    assert ran == [jid]


def test_app_never_imports_worker() -> None:
    code = (
        "import sys, app.main, app.lifecycle, app.queue, app.services.jobs\n"
        "from app.main import create_app\n"
        "bad = sorted(m for m in sys.modules if m == 'worker' or m.startswith('worker.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
