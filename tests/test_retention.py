"""Retention (app.lifecycle.retention) on SQLite, with jobs inserted directly at chosen ages:

- old terminal jobs lose their inputs and result payloads, keep the row and the summary;
- recent jobs, and queued or running jobs of any age, are left byte for byte as they were;
- a second run purges nothing, a dry run changes nothing, batches and the time budget bound a
  run, and two purgers racing purge each job once;
- the API still answers GET /jobs/{id} with the summary and the reconstruction with 410;
- `surfing jobs purge` and the Housekeeper run it.
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.arrays import from_npy, to_npy
from app.db import session_factory, upgrade_database, utcnow
from app.lifecycle.housekeeping import Housekeeper
from app.lifecycle.retention import PURGE_EVERY_S, _purge_rows, purge
from app.main import create_app
from app.models import Job, JobInput, JobResult
from app.settings import Settings
from tests.helpers import FakeQueue

B, K = 3, 2
TRACE = [
    {"stage": s, "total": 4, "index": s, "step": 10 * s, "steps_used": 5,
     "objective_mean": 0.5 / (s + 1), "x_norm_mean": 0.7}
    for s in range(4)
]


def put_job(sessions: sessionmaker[Session], status: str, days_ago: float, seed: int = 0) -> str:
    """A job row with inputs (and, if succeeded, a result) whose timestamps are `days_ago` old;
    queued and running rows get an old finished_at too, so only their status protects them."""
    rng = np.random.default_rng(seed)
    then = utcnow() - timedelta(days=days_ago)
    job = Job(
        id=str(uuid.uuid4()), kind="cs", model_id="tiny", method="surf",
        params={"value_range": [0.0, 1.0], "output_shape": [1, 28, 28], "stages": 4},
        n_targets=B, status=status, attempt=1, max_attempts=2, created_at=then,
        updated_at=then, started_at=then, heartbeat_at=then, finished_at=then,
        run_seconds=2.5, error="boom" if status == "failed" else None,
    )
    job.inputs = JobInput(
        target=to_npy(rng.random((B, 1, 28, 28), dtype=np.float32)),
        measurements=to_npy(rng.random((B, 50), dtype=np.float32)),
        matrix=to_npy(rng.standard_normal((50, 784), dtype=np.float32)),
        m=50,
        x_init=to_npy(rng.random((B, K), dtype=np.float32)),
    )
    if status == "succeeded":
        job.result = JobResult(
            attempt=1, latent=rng.random((B, K)).tolist(), objective=rng.random(B).tolist(),
            pixel_error=rng.random(B).tolist(), measurement_residual=rng.random(B).tolist(),
            trace=TRACE, evals=123, device="cpu", solve_seconds=1.25, pass_jobs=1,
            pass_targets=B, reconstruction=to_npy(rng.random((B, 1, 28, 28), dtype=np.float32)),
        )
    with sessions() as s:
        s.add(job)
        s.commit()
        return job.id


def snapshot(sessions: sessionmaker[Session], job_id: str) -> dict[str, Any]:
    """Every stored column of the job, its inputs and its result."""
    with sessions() as s:
        out: dict[str, Any] = {}
        tables = ((Job, Job.id), (JobInput, JobInput.job_id), (JobResult, JobResult.job_id))
        for model, key in tables:
            row = s.scalars(select(model).where(key == job_id)).one_or_none()
            cols = model.__table__.columns.keys()
            out[model.__tablename__] = None if row is None else {c: getattr(row, c) for c in cols}
        return out


def payload_bytes(snap: dict[str, Any]) -> int:
    """What a purge should free: the input arrays, the reconstruction, latents and trace as
    the JSON text SQLite holds."""
    n = sum(len(snap["job_inputs"][c]) for c in ("target", "measurements", "matrix", "x_init"))
    if snap["job_results"] is not None:
        r = snap["job_results"]
        n += len(r["reconstruction"]) + len(json.dumps(r["latent"])) + len(json.dumps(r["trace"]))
    return n


@pytest.fixture
def db(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path / 'retention.db'}"
    upgrade_database(url)
    return session_factory(url)


@pytest.fixture
def jobs(db: sessionmaker[Session]) -> dict[str, str]:
    """Old and recent jobs in every state (old = 40 days, recent = 5 days)."""
    made = {f"old_{st}": put_job(db, st, 40, i) for i, st in
            enumerate(("succeeded", "failed", "canceled", "queued", "running"))}
    made.update({f"new_{st}": put_job(db, st, 5, 10 + i) for i, st in
                 enumerate(("succeeded", "failed", "canceled"))})
    return made


OLD_TERMINAL = ("old_succeeded", "old_failed", "old_canceled")


def test_purge_removes_old_payloads_and_keeps_summaries(
    db: sessionmaker[Session], jobs: dict[str, str]
) -> None:
    before = {name: snapshot(db, jid) for name, jid in jobs.items()}
    report = purge(db, timedelta(days=30))
    assert report.jobs == 3 and report.complete
    assert report.bytes_freed == sum(payload_bytes(before[n]) for n in OLD_TERMINAL)
    assert report.bytes_freed > 3 * B * 784 * 4  # at least the three targets
    for name in OLD_TERMINAL:
        old, now = before[name], snapshot(db, jobs[name])
        assert now["jobs"] == old["jobs"]  # status, timings, method, params, error: all kept
        for c in ("target", "measurements", "matrix", "x_init"):
            assert now["job_inputs"][c] is None and old["job_inputs"][c]
        assert now["job_inputs"]["m"] == 50
    res_old, res_now = before["old_succeeded"]["job_results"], snapshot(
        db, jobs["old_succeeded"])["job_results"]
    assert (res_now["latent"], res_now["trace"], res_now["reconstruction"]) == ([], [], b"")
    for c in ("objective", "pixel_error", "measurement_residual", "evals", "device",
              "solve_seconds", "pass_jobs", "pass_targets", "attempt"):
        assert res_now[c] == res_old[c], c
    for name in set(jobs) - set(OLD_TERMINAL):  # recent, queued and running: untouched
        assert snapshot(db, jobs[name]) == before[name], name
    assert from_npy(snapshot(db, jobs["new_succeeded"])["job_results"]["reconstruction"]).shape \
        == (B, 1, 28, 28)

    again = purge(db, timedelta(days=30))
    assert (again.jobs, again.bytes_freed) == (0, 0)
    wider = purge(db, timedelta(days=1))  # the recent terminal ones now; never the active ones
    assert wider.jobs == 3
    assert snapshot(db, jobs["old_queued"]) == before["old_queued"]
    assert snapshot(db, jobs["old_running"]) == before["old_running"]


def test_dry_run_counts_and_changes_nothing(
    db: sessionmaker[Session], jobs: dict[str, str]
) -> None:
    before = {name: snapshot(db, jid) for name, jid in jobs.items()}
    dry = purge(db, timedelta(days=30), dry_run=True)
    assert dry.dry_run and dry.jobs == 3
    assert {name: snapshot(db, jid) for name, jid in jobs.items()} == before
    real = purge(db, timedelta(days=30))
    assert (real.jobs, real.bytes_freed) == (dry.jobs, dry.bytes_freed)


def test_batches_budget_and_racing_purgers(db: sessionmaker[Session]) -> None:
    ids = [put_job(db, "succeeded" if i % 2 else "failed", 50 + i, i) for i in range(7)]
    first = purge(db, timedelta(days=30), batch=2, max_seconds=0.0)
    assert (first.jobs, first.batches, first.complete) == (2, 1, False)  # budget spent
    rest = purge(db, timedelta(days=30), batch=2)
    assert (rest.jobs, rest.batches, rest.complete) == (5, 3, True)
    assert all(snapshot(db, j)["job_inputs"]["target"] is None for j in ids)

    # Two purgers that picked the same rows: the guarded UPDATEs let each job count once.
    more = [put_job(db, "succeeded", 60, 100 + i) for i in range(3)]
    with db() as s:
        assert _purge_rows(s, more, utcnow() - timedelta(days=30)) == set(more)
        s.commit()
    with db() as s:
        assert _purge_rows(s, more, utcnow() - timedelta(days=30)) == set()

    # ... and run concurrently, their counts add up to the jobs there were.
    racing = [put_job(db, "canceled", 70, 200 + i) for i in range(12)]
    counts: list[int] = []
    threads = [
        threading.Thread(target=lambda: counts.append(
            purge(db, timedelta(days=30), batch=3, max_seconds=None).jobs))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts) == len(racing)
    assert all(snapshot(db, j)["job_inputs"]["x_init"] is None for j in racing)


def test_api_answers_summary_and_410(tmp_path: Path, models_dir: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'api.db'}", redis_url=None,
                        state_dir=tmp_path, models_dir=models_dir, torch_threads=1)
    upgrade_database(settings.sqlalchemy_url)
    sessions = session_factory(settings.sqlalchemy_url)
    old, old_failed = put_job(sessions, "succeeded", 45, 1), put_job(sessions, "failed", 45, 2)
    recent = put_job(sessions, "succeeded", 2, 3)
    summary = snapshot(sessions, old)["job_results"]
    assert purge(sessions, timedelta(days=settings.retention_days)).jobs == 2
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        r = c.get(f"/jobs/{old}")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "succeeded" and body["method"] == "surf"
        assert body["result"]["objective"] == summary["objective"]
        assert body["result"]["pixel_error"] == summary["pixel_error"]
        assert body["result"]["evals"] == 123 and body["result"]["latent"] == []
        gone = c.get(f"/jobs/{old}/reconstruction.png")
        assert gone.status_code == 410
        assert gone.headers["content-type"] == "application/problem+json"
        problem = gone.json()
        assert problem["status"] == 410 and problem["purged"] is True
        assert "purged" in problem["detail"] and "45 days ago" in problem["detail"]
        assert "kept 30 days" in problem["detail"] and problem["retention_days"] == 30
        assert c.get(f"/jobs/{old_failed}").json()["error"] == "boom"
        assert c.get(f"/jobs/{old_failed}/reconstruction.png").status_code == 409
        png = c.get(f"/jobs/{recent}/reconstruction.png", params={"index": 2})
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
        doc = c.get("/openapi.json").json()
        assert "410" in doc["paths"]["/jobs/{job_id}/reconstruction.png"]["get"]["responses"]


def test_cli_purge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    from app.settings import get_settings
    from surfing.cli import main

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    upgrade_database(url)
    sessions = session_factory(url)
    a, b = put_job(sessions, "succeeded", 20, 1), put_job(sessions, "canceled", 12, 2)
    c = put_job(sessions, "failed", 4, 3)
    expect = payload_bytes(snapshot(sessions, a)) + payload_bytes(snapshot(sessions, b))
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("SURFING_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("SURFING_RETENTION_DAYS", "3")
    monkeypatch.delenv("REDIS_URL", raising=False)
    get_settings.cache_clear()
    try:
        before = snapshot(sessions, a)
        main(["jobs", "purge", "--older-than-days", "10", "--dry-run"])
        out = capsys.readouterr().out
        assert "would purge 2 job(s)" in out and f"{expect:,} bytes" in out, out
        assert snapshot(sessions, a) == before
        main(["jobs", "purge", "--older-than-days", "10"])
        assert "purged 2 job(s) finished more than 10 days ago" in capsys.readouterr().out
        assert snapshot(sessions, a)["job_results"]["reconstruction"] == b""
        assert snapshot(sessions, c)["job_inputs"]["target"] is not None
        main(["jobs", "purge"])  # SURFING_RETENTION_DAYS=3: the 4-day-old job now
        assert "purged 1 job(s) finished more than 3 days ago" in capsys.readouterr().out
        assert snapshot(sessions, c)["job_inputs"]["target"] is None
        main(["jobs", "purge"])
        assert "purged 0 job(s)" in capsys.readouterr().out
        with pytest.raises(SystemExit) as e:
            main(["jobs", "purge", "--older-than-days", "0"])
        assert e.value.code == 2 and "at least 1" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()


def test_housekeeper_purges_every_ten_minutes(db: sessionmaker[Session], tmp_path: Path) -> None:
    settings = Settings(database_url="sqlite://", redis_url=None, state_dir=tmp_path,
                        retention_days=30)
    first = put_job(db, "succeeded", 31, 1)
    hk = Housekeeper(db, FakeQueue(), settings)  # not started: ticks are called by hand
    hk.run_once()
    assert snapshot(db, first)["job_results"]["reconstruction"] == b""
    second = put_job(db, "failed", 31, 2)
    hk.run_once()  # the next purge is due only PURGE_EVERY_S later
    assert snapshot(db, second)["job_inputs"]["target"] is not None
    hk._last_purge -= PURGE_EVERY_S
    hk.run_once()
    assert snapshot(db, second)["job_inputs"]["target"] is None

    off = Housekeeper(db, FakeQueue(), settings.model_copy(update={"retention_days": 0}))
    third = put_job(db, "canceled", 400, 3)
    off.run_once()
    assert snapshot(db, third)["job_inputs"]["target"] is not None


def test_racing_purgers_on_postgresql(pg_database: str) -> None:
    """The same on PostgreSQL, where batches lock their rows FOR UPDATE SKIP LOCKED."""
    upgrade_database(pg_database)
    sessions = session_factory(pg_database)
    ids = [put_job(sessions, ("succeeded", "failed", "canceled")[i % 3], 40 + i, i)
           for i in range(15)]
    active = [put_job(sessions, st, 90, 50 + i) for i, st in enumerate(("queued", "running"))]
    before = {j: snapshot(sessions, j) for j in ids + active}
    dry = purge(sessions, timedelta(days=30), dry_run=True)
    reports: list[Any] = []
    threads = [
        threading.Thread(target=lambda: reports.append(
            purge(sessions, timedelta(days=30), batch=2, max_seconds=None)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.jobs for r in reports) == dry.jobs == len(ids)
    assert sum(r.bytes_freed for r in reports) == dry.bytes_freed
    assert dry.bytes_freed == sum(payload_bytes(before[j]) for j in ids)
    for j in ids:
        now = snapshot(sessions, j)
        assert now["jobs"] == before[j]["jobs"] and now["job_inputs"]["matrix"] is None
    for j in active:
        assert snapshot(sessions, j) == before[j]
    assert purge(sessions, timedelta(days=30)).jobs == 0
