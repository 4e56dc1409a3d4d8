"""Job-state invariants, driven directly against the job function and the reaper (SQLite).

- a lost worker's job is re-queued while attempts remain, then failed with the reason;
- a superseded or canceled attempt can never write its result or status;
- the job timeout fails the job with a reason;
- RQ's failure callback only touches the enqueue it belongs to;
- an embedded server restart settles the previous process's jobs.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.db import utcnow
from app.main import create_app
from app.models import Job, JobResult
from app.schemas import SolveOptions
from app.services.jobs import create_invert_job
from app.services.reaper import reap_stale_jobs
from worker import jobs as wj


def new_job(env: dict[str, Any], **options: Any) -> str:
    opts = SolveOptions.model_validate({"method": "adam", "direct_steps": 5, **options})
    with env["sessions"]() as s:
        job = create_invert_job(
            s,
            env["store"],
            env["settings"],
            env["queue"],
            "tiny",
            opts,
            np.full((1, 28, 28), 0.5).tolist(),
            "test",
        )
        return job.id


def row(env: dict[str, Any], job_id: str) -> Job:
    with env["sessions"]() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def age_heartbeat(env: dict[str, Any], job_id: str, seconds: float = 60) -> None:
    with env["sessions"]() as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )
        s.commit()


def test_lost_worker_requeued_then_failed(env: dict[str, Any]) -> None:
    jid = new_job(env)
    assert wj.claim(env["sessions"], jid, "w1") == 1
    assert reap_stale_jobs(env["sessions"], env["queue"], env["settings"]) == []  # fresh
    age_heartbeat(env, jid)
    assert reap_stale_jobs(env["sessions"], env["queue"], env["settings"]) == [(jid, "requeued")]
    job = row(env, jid)
    assert job.status == "queued" and "worker lost during attempt 1" in (job.error or "")
    assert env["queue"].enqueued == [jid, jid] and job.queue_ref == f"{jid}_2"

    assert wj.claim(env["sessions"], jid, "w2") == 2
    age_heartbeat(env, jid)
    assert reap_stale_jobs(env["sessions"], env["queue"], env["settings"]) == [(jid, "failed")]
    job = row(env, jid)
    assert job.status == "failed" and job.finished_at is not None
    assert "gave up after 2 of 2 attempts" in (job.error or "")
    assert reap_stale_jobs(env["sessions"], env["queue"], env["settings"]) == []


def _result(jid: str, attempt: int) -> JobResult:
    return JobResult(
        job_id=jid,
        attempt=attempt,
        latent=[[0.0, 0.0]],
        objective=[1.0],
        trace=[],
        evals=1,
        device="cpu",
        solve_seconds=0.1,
        reconstruction=b"",
    )


def test_superseded_attempt_cannot_write(env: dict[str, Any]) -> None:
    sessions = env["sessions"]
    jid = new_job(env)
    assert wj.claim(sessions, jid, "slow") == 1
    age_heartbeat(env, jid)
    reap_stale_jobs(sessions, env["queue"], env["settings"])
    assert wj.claim(sessions, jid, "fresh") == 2
    assert wj.claim(sessions, jid, "third") is None  # running: nobody else may claim it
    # The slow worker of attempt 1 wakes up: every write it tries is refused.
    with pytest.raises(wj.JobAborted):
        wj._finish(sessions, jid, 1, 1, None, _result(jid, 1))
    assert wj.fail(sessions, jid, 1, "late failure") is False
    hb = wj.Heartbeat(sessions, [wj.Member(jid, 1)], 0.05)
    hb.start()
    assert hb.lost.wait(2)
    # Attempt 2 finishes normally.
    wj._finish(sessions, jid, 2, 1, None, _result(jid, 2))
    job = row(env, jid)
    assert job.status == "succeeded" and job.attempt == 2
    with sessions() as s:
        res = s.get(JobResult, jid)
        assert res is not None and res.attempt == 2
    # ... and a replay of attempt 2's write (e.g. an RQ retry) changes nothing.
    with pytest.raises(wj.JobAborted):
        wj._finish(sessions, jid, 2, 1, None, _result(jid, 2))


def test_cancel_wins_over_a_finishing_worker(env: dict[str, Any]) -> None:
    from app.services.jobs import cancel_job

    jid = new_job(env)
    wj.claim(env["sessions"], jid, "w")
    with env["sessions"]() as s:
        cancel_job(s, env["queue"], jid)
    with pytest.raises(wj.JobAborted):
        wj._finish(env["sessions"], jid, 1, 1, None, _result(jid, 1))
    assert row(env, jid).status == "canceled"
    # A canceled queued job is never claimed.
    jid2 = new_job(env)
    with env["sessions"]() as s:
        cancel_job(s, env["queue"], jid2)
    assert wj.run_job(jid2, env["settings"]) == {"job_id": jid2, "skipped": True}


def test_job_timeout_fails_the_job(env: dict[str, Any]) -> None:
    settings = env["settings"].model_copy(update={"job_timeout_s": 1})
    jid = new_job(env, direct_steps=1_000_000, lr=1e-6)
    out = wj.run_job(jid, settings)
    assert "timed out" in out["failed"]
    job = row(env, jid)
    assert job.status == "failed" and "timed out after 1 s" in (job.error or "")


def test_rq_failure_callback_matches_its_enqueue(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wj, "get_settings", lambda: env["settings"])
    jid = new_job(env)
    wj.claim(env["sessions"], jid, "w")
    ref = row(env, jid).queue_ref

    class RQJob:
        def __init__(self, rq_id: str) -> None:
            self.id, self.args, self.timeout = rq_id, (jid,), 10

    wj.on_rq_failure(RQJob("someone-else"), None, RuntimeError, RuntimeError("boom"), None)
    assert row(env, jid).status == "running"
    wj.on_rq_failure(RQJob(str(ref)), None, RuntimeError, RuntimeError("boom"), None)
    job = row(env, jid)
    assert job.status == "failed" and job.error == "RuntimeError: boom"


def test_embedded_restart_settles_previous_jobs(env: dict[str, Any]) -> None:
    """Jobs left queued or running by a dead embedded server run after the restart."""
    orphan = new_job(env)
    interrupted = new_job(env)
    wj.claim(env["sessions"], interrupted, "dead-process")  # heartbeat still looks fresh
    with TestClient(create_app(env["settings"])) as client:
        for jid in (orphan, interrupted):
            for _ in range(300):
                job = client.get(f"/jobs/{jid}").json()
                if job["status"] in ("succeeded", "failed", "canceled"):
                    break
                time.sleep(0.1)
            assert job["status"] == "succeeded", job
        assert client.get(f"/jobs/{interrupted}").json()["attempt"] == 2


def test_schedules_match_the_solver() -> None:
    from typing import get_args

    from app.schemas import Schedule
    from surfing.solvers import SCHEDULES

    assert set(get_args(Schedule)) == set(SCHEDULES)


def test_progress_hook_survives_torch_func_transforms(env: dict[str, Any]) -> None:
    """Levenberg-Marquardt evaluates G under vmap/jvp; progress writes on every forward pass
    (interval 0) must neither crash there nor stop the job."""
    settings = env["settings"].model_copy(update={"progress_interval_s": 0.0})
    jid = new_job(env, method="surf", schedule="lm", direct_steps=None)
    out = wj.run_job(jid, settings)
    assert out.get("attempt") == 1, out
    job = row(env, jid)
    assert job.status == "succeeded" and job.params["schedule"] == "lm"


def test_warm_store_keeps_trajectories_in_memory(tmp_path: Path) -> None:
    from conftest import make_tiny_trajectory
    from worker.cache import WarmStore

    make_tiny_trajectory(tmp_path, "w", n_ckpt=3)
    store = WarmStore(tmp_path, 8 * 2**20, "cpu")
    first = [c.tensors for c in store.checkpoints("w")]
    assert (store.hits, store.misses) == (0, 3)
    again = [c.index for c in store.checkpoints("w", stride=2)]
    assert again == [0, 2] and (store.hits, store.misses) == (2, 3)
    assert store.load("w", -1) is first[-1] and store.hits == 3
    # Overwriting the model changes its hashes: the cache never serves the old weights.
    make_tiny_trajectory(tmp_path, "w", n_ckpt=3, seed=5)
    fresh = [c.tensors for c in store.checkpoints("w")]
    assert store.misses == 6
    assert not all(a is b for a, b in zip(first, fresh, strict=True))
    # A trajectory larger than the budget streams without being cached.
    small = WarmStore(tmp_path, 1000, "cpu")
    list(small.checkpoints("w"))
    list(small.checkpoints("w"))
    assert (small.hits, small.misses) == (0, 6)


def test_worker_start_up_applies_the_tf32_setting(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SURFING_TF32=false turns cuDNN's TF32 off for the worker process (GPU precision)."""
    import torch

    from worker.jobs import prepare_runtime

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    prepare_runtime(env["settings"].model_copy(update={"tf32": False}))
    assert torch.backends.cudnn.allow_tf32 is False
    prepare_runtime(env["settings"])
    assert torch.backends.cudnn.allow_tf32 is True
