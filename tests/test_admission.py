"""Admission control (429 + Retry-After for rate, per-key quota, queue depth, compute) and
Idempotency-Key, on the embedded app with auth on; then 500 concurrent submits against the
quotas, with a queue that runs nothing (exact counts) and with the in-process runner (every
accepted job completes)."""

from __future__ import annotations

import inspect
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app import lifecycle
from app import main as app_main
from app.main import create_app
from app.models import Job
from app.services import admission, keys
from app.settings import Settings
from models_store import select_indices
from tests.helpers import FakeQueue
from tests.test_auth import auth, problem

IMAGE = np.full((1, 28, 28), 0.5).tolist()
BODY = {"model_id": "tiny", "image": IMAGE, "method": "adam", "direct_steps": 1}


class IdleQueue(FakeQueue):
    """FakeQueue whose entries all stay waiting, so the reconciler leaves their rows alone."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: set[str] = set()

    def enqueue(self, job_id: str) -> str:
        ref = super().enqueue(job_id)
        self.refs.add(ref)
        return ref

    def waiting(self, refs: Any) -> set[str]:
        return self.refs.intersection(refs)


@contextmanager
def service(
    tmp: Path, models_dir: Path, n_keys: int = 2, run: bool = False, **kw: Any
) -> Iterator[tuple[TestClient, Any, list[str]]]:
    """(client, app, submit-scope keys); with run=False a queue that runs nothing, for the
    housekeeper too: swapping only app.state.queue left the in-process runner to the
    reconciler, which ran rows older than its grace and so freed quota mid-burst."""
    base: dict[str, Any] = dict(
        database_url=None, redis_url=None, state_dir=tmp, models_dir=models_dir, auth="on",
        torch_threads=1, rate_limit_per_min=0, progress_interval_s=0.1,
    )
    settings = Settings(**{**base, **kw})
    if run:
        app = create_app(settings)
    else:
        with mock.patch.object(app_main, "make_queue", lambda *_: IdleQueue()):
            app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        with app.state.sessions() as s:
            made = [keys.create_key(s, f"k{i}", "submit")[1] for i in range(n_keys)]
        yield client, app, made


def too_many(r: Any, rule: str) -> dict[str, Any]:
    body = problem(r, 429)
    assert body["rule"] == rule and body["title"] == "Too many requests", body
    assert int(r.headers["retry-after"]) >= 1
    return body


def n_jobs(app: Any, key: str | None = None) -> int:
    stmt = select(func.count()).select_from(Job)
    if key is not None:
        stmt = stmt.where(Job.owner_key_id == key.split("_")[1])
    with app.state.sessions() as s:
        return int(s.scalar(stmt) or 0)


def test_rate_limit(models_dir: Path, tmp_path: Path) -> None:
    # 0.6 per minute: one token per 100 s, so the third submit certainly finds none
    with service(tmp_path, models_dir, rate_limit_per_min=0.6, rate_limit_burst=2) as (c, app, k):
        for _ in range(2):
            assert c.post("/invert", json=BODY, headers=auth(k[0])).status_code == 202
        r = c.post("/invert", json=BODY, headers=auth(k[0]))
        too_many(r, "rate")
        assert 90 <= int(r.headers["retry-after"]) <= 100
        assert c.post("/invert", json=BODY, headers=auth(k[1])).status_code == 202  # per key
        assert n_jobs(app, k[0]) == 2 and n_jobs(app, k[1]) == 1


def test_active_job_quota(models_dir: Path, tmp_path: Path) -> None:
    opts = dict(max_active_jobs_per_key=2, admission_retry_after_s=7)
    with service(tmp_path, models_dir, **opts) as (c, app, k):
        ids = [c.post("/invert", json=BODY, headers=auth(k[0])).json()["job_id"] for _ in "ab"]
        r = c.post("/invert", json=BODY, headers=auth(k[0]))
        body = too_many(r, "active")
        assert r.headers["retry-after"] == "7" and body["limit"] == 2
        payload = {"model_id": "tiny", "measurements": [0.1] * 5, "matrix": {"seed": 0, "m": 5}}
        too_many(c.post("/cs-recover", json=payload, headers=auth(k[0])), "active")
        assert c.post("/invert", json=BODY, headers=auth(k[1])).status_code == 202
        assert c.delete(f"/jobs/{ids[0]}", headers=auth(k[0])).status_code == 200
        assert c.post("/cs-recover", json=payload, headers=auth(k[0])).status_code == 202
        assert n_jobs(app, k[0]) == 3


def test_queue_depth_cap(models_dir: Path, tmp_path: Path) -> None:
    with service(tmp_path, models_dir, n_keys=3, max_queued_jobs=3) as (c, app, k):
        for key in (k[0], k[0], k[1]):
            assert c.post("/invert", json=BODY, headers=auth(key)).status_code == 202
        body = too_many(c.post("/invert", json=BODY, headers=auth(k[2])), "queue")
        assert body["limit"] == 3 and n_jobs(app) == 3


def test_compute_cap(models_dir: Path, tmp_path: Path) -> None:
    """The estimate is generator evaluations x targets from the request's own numbers."""
    with service(tmp_path, models_dir, max_job_evals=1000) as (c, app, k):
        h = auth(k[0])

        def post(**opts: Any) -> Any:
            return c.post("/invert", json={"model_id": "tiny", "image": IMAGE, **opts}, headers=h)

        body = too_many(post(method="adam-restarts", restarts=3, direct_steps=400), "compute")
        assert body["estimate"] == 3 * 400 and body["limit"] == 1000
        assert post(method="adam-restarts", restarts=3, direct_steps=300).status_code == 202
        two = c.post("/invert", json={**BODY, "image": [IMAGE, IMAGE], "direct_steps": 600},
                     headers=h)
        assert too_many(two, "compute")["estimate"] == 2 * 600  # targets count
        # surf on 4 checkpoints: 3 x steps + final_steps, x 2 for the rescue pass; the
        # default schedule (portfolio) adds LM on G_T and its restart rounds: (1 + rounds)
        # solves of at most 40 Jacobians, (k + 2) / 2 evaluations each (k = 2)
        lm = (1 + admission.PORTFOLIO_ROUNDS) * 40 * (2 + 2) // 2
        auto = post(steps=100, final_steps=300, schedule="auto")
        assert too_many(auto, "compute")["estimate"] == 1200
        assert too_many(post(steps=100, final_steps=300), "compute")["estimate"] == 1200 + lm
        portfolio = post(steps=100, final_steps=300, schedule="portfolio")
        assert too_many(portfolio, "compute")["estimate"] == 1200 + lm
        assert 3 * 100 + 200 + lm <= 1000  # one pass (no rescue) and the LM solves fit
        assert post(steps=100, final_steps=200, rescue=False).status_code == 202
        stages = len(select_indices(4, 2))
        hybrid = post(method="hybrid", stride=2, steps=100, final_steps=300, direct_steps=200)
        assert too_many(hybrid, "compute")["estimate"] == (stages - 1) * 100 + 300 + 4 * 200
        assert n_jobs(app) == 2


def test_estimate_uses_the_solver_defaults() -> None:
    from surfing import solvers

    surf = inspect.signature(solvers.surf).parameters
    direct = inspect.signature(solvers.direct).parameters
    assert admission.SURF_STEPS == surf["steps"].default
    assert admission.FINAL_STEPS == surf["final_steps"].default
    assert admission.DIRECT_STEPS == direct["steps"].default
    assert admission.estimate_evals("adam", {}, 3) == 3 * direct["steps"].default
    paper = {"stages": 5, "schedule": "paper"}
    assert admission.estimate_evals("surf", paper, 1) == 4 * 20 + 1000
    from surfing import portfolio

    assert admission.DEFAULT_SCHEDULE == solvers.DEFAULT_SCHEDULE == "portfolio"
    assert admission.PORTFOLIO_ROUNDS == portfolio.PORTFOLIO_ROUNDS
    assert admission.FEW_MEASUREMENT_ROUNDS == portfolio.FEW_MEASUREMENT_ROUNDS
    assert admission.FEW_MEASUREMENTS_PER_LATENT == portfolio.FEW_MEASUREMENTS_PER_LATENT
    for m, k in [(None, 10), (20, 10), (30, 10), (31, 10), (50, 10), (50, 20), (61, 20), (4, 1)]:
        params = {"latent_dim": k} if m is None else {"latent_dim": k, "m": m}
        assert admission.portfolio_rounds(params) == portfolio.portfolio_rounds(m, k)
    assert admission.LM_ITERS == solvers.StageRule().lm_iters


def test_idempotency_key(models_dir: Path, tmp_path: Path) -> None:
    with service(tmp_path, models_dir) as (c, app, k):
        h = {**auth(k[0]), "Idempotency-Key": "order-1"}
        first = c.post("/invert", json=BODY, headers=h)
        assert first.status_code == 202 and "idempotent-replayed" not in first.headers
        # the same body, keys in another order: the same job
        again = c.post("/invert", json=dict(reversed(list(BODY.items()))), headers=h)
        assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
        assert again.json()["job_id"] == first.json()["job_id"]
        assert again.headers["location"] == f"/jobs/{first.json()['job_id']}"
        changed = c.post("/invert", json={**BODY, "direct_steps": 2}, headers=h)
        body = problem(changed, 422, "order-1", "different request")
        assert body["job_id"] == first.json()["job_id"]
        # another key's Idempotency-Key space is its own
        other = c.post("/invert", json=BODY, headers={**auth(k[1]), "Idempotency-Key": "order-1"})
        assert other.status_code == 202 and other.json()["job_id"] != first.json()["job_id"]
        # multipart uploads are hashed too
        npy = _npy(np.full((1, 28, 28), 0.25, np.float32))
        form = {"model_id": "tiny", "method": "adam"}
        hm = {**auth(k[0]), "Idempotency-Key": "upload-1"}
        a = c.post("/invert", data=form, files={"image": ("x.npy", npy)}, headers=hm)
        b = c.post("/invert", data=form, files={"image": ("x.npy", npy)}, headers=hm)
        assert a.status_code == 202 and b.json()["job_id"] == a.json()["job_id"]
        npy2 = _npy(np.full((1, 28, 28), 0.75, np.float32))
        problem(c.post("/invert", data=form, files={"image": ("x.npy", npy2)}, headers=hm), 422)
        cs = {"model_id": "tiny", "measurements": [0.1] * 5, "matrix": {"seed": 0, "m": 5}}
        hc = {**auth(k[0]), "Idempotency-Key": "cs-1"}
        one = c.post("/cs-recover", json=cs, headers=hc)
        assert c.post("/cs-recover", json=cs, headers=hc).json()["job_id"] == one.json()["job_id"]
        problem(c.post("/cs-recover", json={**cs, "seed": 1}, headers=hc), 422, "cs-1")
        for bad in ("two words", "x" * 256):
            r = c.post("/invert", json=BODY, headers={**auth(k[0]), "Idempotency-Key": bad})
            problem(r, 422, "Idempotency-Key")
        assert n_jobs(app) == 4


def test_concurrent_retries_make_one_job(models_dir: Path, tmp_path: Path) -> None:
    with service(tmp_path, models_dir) as (c, app, k):
        h = {**auth(k[0]), "Idempotency-Key": "burst"}
        with ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda _: c.post("/invert", json=BODY, headers=h), range(24)))
        assert {r.status_code for r in rs} == {202}
        assert len({r.json()["job_id"] for r in rs}) == 1 and n_jobs(app) == 1


def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _burst(c: TestClient, keys_: list[str], n: int) -> list[tuple[str, Any]]:
    """n concurrent submits (16 threads), round-robin over the keys: (key, response)."""

    def one(i: int) -> tuple[str, Any]:
        key = keys_[i % len(keys_)]
        return key, c.post("/invert", json={**BODY, "seed": i}, headers=auth(key))

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, range(n)))


def test_500_concurrent_submits_never_overshoot(models_dir: Path, tmp_path: Path) -> None:
    """Nothing runs, so exactly min(5 x 30, 120) = 120 are admitted, none beyond a quota."""
    opts = dict(n_keys=5, max_active_jobs_per_key=30, max_queued_jobs=120)
    with service(tmp_path, models_dir, **opts) as (c, app, k):
        results = _burst(c, k, 500)
        codes = Counter(r.status_code for _, r in results)
        assert set(codes) <= {202, 429} and codes[202] == 120, codes
        rules = Counter(r.json()["rule"] for _, r in results if r.status_code == 429)
        assert set(rules) <= {"active", "queue"} and sum(rules.values()) == 380
        assert all(int(r.headers["retry-after"]) >= 1 for _, r in results if r.status_code == 429)
        accepted = {r.json()["job_id"]: key for key, r in results if r.status_code == 202}
        with app.state.sessions() as s:
            rows = {j.id: j for j in s.scalars(select(Job))}
        assert set(rows) == set(accepted)  # every 202 recorded, nothing else
        for job_id, key in accepted.items():
            assert rows[job_id].owner_key_id == key.split("_")[1]
            assert rows[job_id].status == "queued"
        per_key = Counter(j.owner_key_id for j in rows.values())
        assert max(per_key.values()) <= 30


def test_slow_admissions_with_a_busy_reconciler_hold_the_caps(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loaded machine, forced: each admission holds its window (count .. commit) 50 ms and
    the reconciler scans every 0.1 s for rows older than 0.2 s. Admitted rows stay queued on
    the app's own queue, so exactly the caps are admitted."""
    real_submit = lifecycle.submit

    def slow_submit(*args: Any) -> Any:
        time.sleep(0.05)  # inside the gate's lock: the count is already taken
        return real_submit(*args)

    monkeypatch.setattr(lifecycle, "submit", slow_submit)
    opts = dict(n_keys=3, max_active_jobs_per_key=8, max_queued_jobs=20,
                heartbeat_interval_s=0.1)
    with service(tmp_path, models_dir, **opts) as (c, app, k):
        results = _burst(c, k, 60)  # >= 20 x 50 ms: rows go past the grace mid-burst
        time.sleep(1.0)  # and the reconciler has had its turns
        codes = Counter(r.status_code for _, r in results)
        assert set(codes) <= {202, 429} and codes[202] == 20, codes
        with app.state.sessions() as s:
            rows = list(s.scalars(select(Job)))
        assert {j.status for j in rows} == {"queued"} and len(rows) == 20
        assert {j.queue_ref for j in rows} <= app.state.queue.refs  # none handed elsewhere
        assert max(Counter(j.owner_key_id for j in rows).values()) <= 8


def test_500_concurrent_submits_all_accepted_complete(models_dir: Path, tmp_path: Path) -> None:
    """With the in-process runner: every answer is 202 or 429, every 202 succeeds."""
    opts = dict(n_keys=3, run=True, max_active_jobs_per_key=4, max_queued_jobs=8)
    with service(tmp_path, models_dir, **opts) as (c, app, k):
        results = _burst(c, k, 500)
        codes = Counter(r.status_code for _, r in results)
        assert set(codes) <= {202, 429} and codes[202] >= 8, codes
        accepted = [(key, r.json()["job_id"]) for key, r in results if r.status_code == 202]
        deadline = time.monotonic() + 120
        pending = {job_id: key for key, job_id in accepted}
        while pending and time.monotonic() < deadline:
            for job_id, key in list(pending.items()):
                job = c.get(f"/jobs/{job_id}", headers=auth(key)).json()
                if job["status"] not in ("queued", "running"):
                    assert job["status"] == "succeeded", job
                    assert job["result"]["evals"] >= 1
                    del pending[job_id]
            time.sleep(0.2)
        assert not pending, f"{len(pending)} of {len(accepted)} accepted jobs did not finish"
        print(f"500 concurrent submits: {codes[202]} accepted (all succeeded), "
              f"{codes[429]} refused with 429")


def test_concurrent_quota_on_postgresql(
    models_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The same exact counts on PostgreSQL, where an advisory lock serialises admissions of
    every API process (here: threads of one)."""
    pg = request.getfixturevalue("pg_database")
    opts = dict(n_keys=4, database_url=pg, auto_migrate=True, max_active_jobs_per_key=10,
                max_queued_jobs=30)
    with service(tmp_path, models_dir, **opts) as (c, app, k):
        results = _burst(c, k, 120)
        codes = Counter(r.status_code for _, r in results)
        assert set(codes) <= {202, 429} and codes[202] == 30, codes
        with app.state.sessions() as s:
            per_key = Counter(s.scalars(select(Job.owner_key_id)))
        assert sum(per_key.values()) == 30 and max(per_key.values()) <= 10
        # make room for one, then the Idempotency-Key path on PostgreSQL
        key, r = next((key, r) for key, r in results if r.status_code == 202)
        assert c.delete(f"/jobs/{r.json()['job_id']}", headers=auth(key)).status_code == 200
        h = {**auth(key), "Idempotency-Key": "pg-1"}
        first = c.post("/invert", json=BODY, headers=h)
        assert first.status_code == 202
        assert c.post("/invert", json=BODY, headers=h).json()["job_id"] == first.json()["job_id"]
