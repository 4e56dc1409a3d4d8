"""End-to-end service tests, run twice: on the embedded default (SQLite + in-process runner)
and on the deployment stack (a real PostgreSQL, a real Redis and `python -m worker` as a
subprocess). The same flows must behave the same on both.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.db import normalize_url, upgrade_database
from app.main import create_app
from app.services import admission
from app.settings import Settings
from conftest import create_pg_database, drop_pg_database, tiny_target
from models_store import ModelStore

REPO = Path(__file__).resolve().parents[1]
TERMINAL = ("succeeded", "failed", "canceled")
FAST = {"steps": 10, "final_steps": 150, "lr": 0.1}  # converges on the tiny model in < 1 s
X_STAR = [[-0.29, 0.43]]  # a latent the tiny model's surfing recovers from seed 0


def _test_env(settings: Settings) -> dict[str, str]:
    return {
        "SURFING_MODELS_DIR": str(settings.models_dir),
        "SURFING_QUEUE_NAME": settings.queue_name,
        "SURFING_HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
        "SURFING_STALE_AFTER_S": str(settings.stale_after_s),
        "SURFING_PROGRESS_INTERVAL_S": str(settings.progress_interval_s),
        "SURFING_MAX_ATTEMPTS": str(settings.max_attempts),
        "SURFING_TORCH_THREADS": "1",
    }


def _settings(tmp: Path, models_dir: Path, **kw: Any) -> Settings:
    return Settings(
        auth="off",  # PostgreSQL + Redis would turn it on; keys are tests/test_auth.py's
        state_dir=tmp,
        models_dir=models_dir,
        progress_interval_s=0.2,
        heartbeat_interval_s=0.5,
        stale_after_s=3.0,
        max_attempts=2,
        torch_threads=1,
        **kw,
    )


@dataclass
class WorkerProcess:
    """`python -m worker` in a subprocess, logging to a file we print on failure."""

    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.log_file = open(self.log, "ab")  # noqa: SIM115 (closed in stop/kill)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker"],
            cwd=REPO,
            env=self.env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        """Simulate a crash: no warm shutdown, no cleanup."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log_file.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_file.close()


@dataclass
class Service:
    kind: str
    client: TestClient
    settings: Settings
    store: ModelStore
    workers: list[WorkerProcess] = field(default_factory=list)
    worker_env: dict[str, str] = field(default_factory=dict)
    tmp: Path | None = None

    def submit(self, path: str, **kwargs: Any) -> str:
        r = self.client.post(path, **kwargs)
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["status"] == "queued"
        assert r.headers["location"] == f"/jobs/{body['job_id']}"
        return str(body["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.client.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait(
        self, job_id: str, until: tuple[str, ...] = TERMINAL, timeout: float = 90, check: Any = None
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in until and (check is None or check(job)):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job stuck: {job}\n{self.logs()}")
            time.sleep(0.1)

    def start_worker(self) -> WorkerProcess:
        assert self.tmp is not None
        w = WorkerProcess(self.worker_env, self.tmp / f"worker-{len(self.workers)}.log")
        self.workers.append(w)
        deadline = time.monotonic() + 90
        while self.client.get("/readyz").status_code != 200:
            if w.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker did not come up\n{self.logs()}")
            time.sleep(0.2)
        return w

    def logs(self) -> str:
        return "\n".join(w.log.read_text(errors="replace")[-4000:] for w in self.workers)


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def service(
    request: pytest.FixtureRequest, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp(f"svc-{request.param}")
    store = ModelStore(models_dir)
    if request.param == "embedded":
        settings = _settings(tmp, models_dir, database_url=None, redis_url=None)
        assert settings.embedded and settings.sqlalchemy_url.startswith("sqlite")
        with TestClient(create_app(settings)) as client:
            yield Service("embedded", client, settings, store)
        return

    pg_admin = request.getfixturevalue("pg_server")
    redis_url = request.getfixturevalue("redis_url")
    db_url = create_pg_database(pg_admin)
    queue_name = f"surfing-test-{uuid.uuid4().hex[:8]}"
    settings = _settings(
        tmp, models_dir, database_url=db_url, redis_url=redis_url, queue_name=queue_name
    )
    upgrade_database(db_url)
    env = {**os.environ, **_test_env(settings), "DATABASE_URL": db_url, "REDIS_URL": redis_url}
    svc: Service | None = None
    try:
        with TestClient(create_app(settings)) as client:
            svc = Service("postgres", client, settings, store, worker_env=env, tmp=tmp)
            svc.start_worker()
            yield svc
    finally:
        if svc is not None:
            for w in svc.workers:
                w.stop()
        pids = [w.proc.pid for w in svc.workers] if svc is not None else []
        _clean_redis(redis_url, queue_name, db_url, pids)
        drop_pg_database(pg_admin, db_url)


def _clean_redis(redis_url: str, queue_name: str, db_url: str, pids: list[int]) -> None:
    """Delete this run's RQ keys: queue, registries, job hashes, and the registrations of
    workers we killed (a live worker removes its own on a warm shutdown)."""
    import sqlalchemy as sa
    from redis import Redis

    engine = sa.create_engine(normalize_url(db_url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            ids = [r[0] for r in conn.execute(sa.text("SELECT id FROM jobs"))]
    except Exception:
        ids = []
    finally:
        engine.dispose()
    r = Redis.from_url(redis_url)
    marks = [queue_name, *ids, *(f".{pid}." for pid in pids)]
    doomed = [k for k in r.scan_iter("rq:*") if any(m.encode() in k for m in marks)]
    if doomed:
        r.delete(*doomed)
    workers = [m for m in r.smembers("rq:workers") if any(f".{p}.".encode() in m for p in pids)]
    if workers:
        r.srem("rq:workers", *workers)
    r.srem("rq:queues", f"rq:queue:{queue_name}")
    r.close()


def _target(svc: Service, x: list[list[float]] = X_STAR) -> np.ndarray:
    return tiny_target(svc.store, "tiny", torch.tensor(x)).numpy()


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((image.squeeze() * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ---- the flows -------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["portfolio", "auto"])
def test_an_off_range_image_is_rescued_unless_the_client_says_no(
    service: Service, schedule: str
) -> None:
    """A constant image is off the tiny model's range: surf re-surfs it from a fresh start,
    which shows in the trace and the progress; rescue=false keeps one pass. The default,
    portfolio, first runs LM on G_T and its restart rounds (every one misses here)."""
    flat = np.full((1, 28, 28), 0.5).tolist()
    done = {}
    for rescue in (None, False):
        extra = {} if rescue is None else {"rescue": rescue}
        body = {"model_id": "tiny", "image": flat, **extra}
        if schedule != "portfolio":
            body["schedule"] = schedule
        job_id = service.submit("/invert", json=body)
        done[rescue] = service.wait(job_id)
        assert done[rescue]["status"] == "succeeded", done[rescue]
    rescued, plain = done[None], done[False]
    # portfolio: "final" on G_T (all targets), its "restart" rounds and the surf on the one target
    on_g_t = ["final"] + ["restart"] * admission.PORTFOLIO_ROUNDS
    head, first = ([], 0) if schedule == "auto" else (on_g_t, len(on_g_t))
    passes = [(t.get("pass"), t.get("rescued")) for t in rescued["result"]["trace"]]
    surf_moved = None if schedule == "auto" else 1  # portfolio surfs a subset: this target
    assert passes == [(p, None if p == "final" else 1) for p in head] + [
        ("surf", surf_moved)] * 4 + [("rescue", 1)] * 4  # fmt: skip
    # The rescue is its own pass with its own stage counter (never a grown total).
    progress = rescued["progress"]
    assert (progress["pass"], progress["pass_index"], progress["pass_round"]) == (
        "rescue", first + 1, 1)  # fmt: skip
    assert progress["stage"] == progress["stages"] == 4
    assert [t.get("pass") for t in plain["result"]["trace"]] == head + ["surf"] * 4
    assert plain["progress"]["pass"] == "surf" and plain["progress"]["pass_index"] == first
    assert plain["progress"]["stage"] == plain["progress"]["stages"] == 4
    assert rescued["result"]["objective"][0] <= plain["result"]["objective"][0]


@pytest.mark.parametrize("schedule", ["portfolio", "auto"])
def test_invert_json_recovers_the_latent(service: Service, schedule: str) -> None:
    y = _target(service)
    body = {"model_id": "tiny", "image": y[0].tolist(), **FAST}
    if schedule != "portfolio":  # the default
        body["schedule"] = schedule
    job = service.wait(service.submit("/invert", json=body))
    assert job["status"] == "succeeded", job
    res = job["result"]
    assert res["pixel_error"][0] < 1e-8
    assert np.allclose(res["latent"][0], X_STAR[0], atol=1e-3)
    assert res["objective"][0] < 1e-6
    assert res["measurement_residual"] is None
    if schedule == "auto":  # one pass over the 4 checkpoints
        assert len(res["trace"]) == 4 and [t["stage"] for t in res["trace"]] == [1, 2, 3, 4]
        assert job["progress"]["stage"] == job["progress"]["stages"] == 4
    else:  # LM on G_T fits it at once: one stage on the last checkpoint, the stream unread
        assert [(t["pass"], t["index"], t["stage"]) for t in res["trace"]] == [("final", 3, 1)]
        assert job["progress"]["pass"] == "final"
        assert job["progress"]["stage"] == job["progress"]["stages"] == 1
    assert job["attempt"] == 1 and job["timings"]["run_s"] is not None
    png = service.client.get(res["reconstruction_url"] + "?scale=2")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (56, 56)


def test_invert_multipart_png_upload(service: Service) -> None:
    y = _target(service)
    job_id = service.submit(
        "/invert",
        data={"model_id": "tiny", "method": "adam", "direct_steps": "150", "lr": "0.1"},
        files={"image": ("target.png", _png(y[0]), "image/png")},
    )
    job = service.wait(job_id)
    assert job["status"] == "succeeded", job
    assert job["method"] == "adam" and job["params"]["source"] == "multipart"
    # 8-bit quantisation of the target bounds how well it can be matched.
    assert job["result"]["pixel_error"][0] < 1e-4


def test_cs_recover_with_seeded_matrix(service: Service) -> None:
    y = _target(service)
    r = service.client.get(
        "/measurement-matrix",
        params={"model_id": "tiny", "m": 20, "seed": 7},
        headers={"Accept": "application/x-npy"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
    A = np.load(io.BytesIO(r.content))
    assert A.shape == (20, 784) and A.dtype == np.float32
    b = (A @ y.reshape(1, -1).T).ravel()
    job_id = service.submit(
        "/cs-recover",
        json={
            "model_id": "tiny",
            "measurements": b.tolist(),
            "matrix": {"seed": 7, "m": 20},
            "true_image": y[0].tolist(),
            **FAST,
        },
    )
    job = service.wait(job_id)
    assert job["status"] == "succeeded", job
    res = job["result"]
    assert job["kind"] == "cs" and job["params"]["m"] == 20
    assert res["measurement_residual"][0] < 1e-8
    assert res["pixel_error"][0] < 1e-6


def test_progress_is_visible_and_cancel_works(service: Service) -> None:
    long_job = {
        "model_id": "tiny",
        "image": _target(service)[0].tolist(),
        "method": "adam",
        "direct_steps": 1_000_000,
        "lr": 1e-6,
    }
    running = service.submit("/invert", json=long_job)
    job = service.wait(
        running,
        until=("running",),
        check=lambda j: j["progress"] and j["progress"]["objective"] is not None,
    )
    assert job["progress"]["pass"] == "adam" and job["progress"]["stages"] == 1_000_000
    first_update = job["progress"]["updated_at"]
    queued = service.submit("/invert", json=long_job)  # waits behind the running one
    assert service.job(queued)["status"] == "queued"
    service.wait(
        running, until=("running",), check=lambda j: j["progress"]["updated_at"] != first_update
    )

    r = service.client.delete(f"/jobs/{queued}")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    r = service.client.delete(f"/jobs/{running}")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    again = service.client.delete(f"/jobs/{running}")
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"

    # The worker lets go of the canceled job and takes the next one.
    quick = service.submit(
        "/invert",
        json={
            "model_id": "tiny",
            "image": _target(service)[0].tolist(),
            "method": "adam",
            "direct_steps": 5,
        },
    )
    assert service.wait(quick)["status"] == "succeeded"
    for jid in (running, queued):
        job = service.job(jid)
        assert job["status"] == "canceled" and job["result"] is None


def test_other_methods(service: Service) -> None:
    y = _target(service)[0].tolist()
    base = {"model_id": "tiny", "image": y, **FAST}
    ids = [
        service.submit("/invert", json={**base, "method": m, "restarts": 2, "direct_steps": 60})
        for m in ("adam-restarts", "hybrid")
    ]
    paper = service.submit("/invert", json={**base, "schedule": "paper"})
    # adam-restarts ends on its restarts pass (60 Adam steps); hybrid on its final pass.
    for jid, stages, last in zip(ids, (1, 5), (("restart", 60), ("final", 1)), strict=True):
        job = service.wait(jid)
        assert job["status"] == "succeeded", job
        assert job["params"]["stages"] == stages
        progress = job["progress"]
        assert (progress["pass"], progress["stages"]) == last
        assert progress["stage"] == progress["stages"]
    job = service.wait(paper)
    assert job["status"] == "succeeded", job
    # Algorithm 3.1 as published: exactly `steps` per stage and `final_steps` at the end.
    assert [t["steps_used"] for t in job["result"]["trace"]] == [10, 10, 10, 150]
    assert job["result"]["evals"] == 180


def test_batch_job_and_explicit_matrix_upload(service: Service) -> None:
    xs = [X_STAR[0], [0.5, -0.5]]
    y = _target(service, xs)
    A = np.random.default_rng(0).normal(size=(30, 784)).astype(np.float32) / np.sqrt(30)
    b = y.reshape(2, -1) @ A.T
    buf_a, buf_b = io.BytesIO(), io.BytesIO()
    np.save(buf_a, A)
    np.save(buf_b, b.astype(np.float32))
    job_id = service.submit(
        "/cs-recover",
        data={"model_id": "tiny", **{k: str(v) for k, v in FAST.items()}},
        files={"matrix": ("A.npy", buf_a.getvalue()), "measurements": ("b.npy", buf_b.getvalue())},
    )
    job = service.wait(job_id)
    assert job["status"] == "succeeded", job
    assert job["n_targets"] == 2 and len(job["result"]["latent"]) == 2
    assert job["params"]["matrix"] == "explicit" and job["result"]["pixel_error"] is None
    png = service.client.get(f"/jobs/{job_id}/reconstruction.png?index=1")
    assert png.status_code == 200
    assert service.client.get(f"/jobs/{job_id}/reconstruction.png?index=2").status_code == 422


def test_operations_endpoints(service: Service) -> None:
    ready = service.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks["database"]["revision"] == checks["database"]["head"]
    assert checks["workers"]["count"] >= 1
    assert service.client.get("/healthz").json() == {"status": "ok"}
    text = service.client.get("/metrics").text
    assert "surfing_queue_depth" in text
    assert 'surfing_jobs{kind="invert",status="succeeded"}' in text
    assert "surfing_job_duration_seconds_bucket" in text
    assert 'surfing_http_requests_total{method="POST",route="/invert",status="202"}' in text


def test_lost_worker_job_is_requeued(service: Service) -> None:
    """Kill the worker mid-job: the reaper re-queues it and a new worker runs attempt 2."""
    if service.kind != "postgres":
        pytest.skip("needs a separate worker process to kill")
    long_job = {
        "model_id": "tiny",
        "image": _target(service)[0].tolist(),
        "method": "adam",
        "direct_steps": 1_000_000,
        "lr": 1e-6,
    }
    jid = service.submit("/invert", json=long_job)
    service.wait(jid, until=("running",))
    for w in service.workers:
        if w.proc.poll() is None:
            w.kill()
    service.start_worker()
    job = service.wait(jid, until=("running",), check=lambda j: j["attempt"] == 2)
    assert "worker lost during attempt 1" in job["error"]
    assert service.client.delete(f"/jobs/{jid}").status_code == 200
