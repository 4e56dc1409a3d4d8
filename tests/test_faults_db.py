"""Fault injection against a real stack: PostgreSQL stopped, PostgreSQL frozen, Redis frozen.

Everything here is our own and on loopback: a throwaway PostgreSQL cluster and redis-server
(tests/throwaway.py), the API under uvicorn and one `surfing worker`, both subprocesses with the
default time bounds. Clients keep submitting, polling and probing /healthz (keep-alive
connections) while a fault lasts ~10 s; a burst of concurrent polls during the freeze is larger
than the API's thread pool. Expected: only 503 problem+json with Retry-After while a dependency
is down, /healthz 200 throughout, no 500, no hang, recovery without a restart, and the job that
was running through both PostgreSQL outages succeeds. The numbers are printed (pytest -s).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.db import upgrade_database
from conftest import create_pg_database
from tests.throwaway import PostgresServer, RedisServer, free_port

REPO = Path(__file__).resolve().parents[1]
OUTAGE_S = 10.0
CLIENT_TIMEOUT_S = 15.0  # a request still open after this counts as a hang
IMAGE = [[0.5] * 28 for _ in range(28)]
SMALL = {"model_id": "tiny", "image": IMAGE, "method": "adam", "direct_steps": 5}

pytestmark = pytest.mark.timeout(420)


@dataclass
class Answer:
    kind: str
    t: float
    status: int | None  # None: no response (connection error or client timeout)
    seconds: float
    retry_after: str | None = None
    content_type: str = ""
    error: str = ""
    job_id: str | None = None


@dataclass
class Stack:
    pg: PostgresServer
    redis: RedisServer
    base: str
    procs: list[subprocess.Popen[bytes]]
    logs: list[Path]
    last_readyz: str = ""

    def tail(self) -> str:
        return self.last_readyz + "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in self.logs
        )


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def _ready(stack: Stack) -> bool:
    r = httpx.get(stack.base + "/readyz")
    if r.status_code != 200:
        stack.last_readyz = r.text
    return r.status_code == 200


def _until(check: Any, what: str, stack: Stack, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            out = check()
        except httpx.HTTPError:
            out = None
        if out:
            return out
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached in {timeout:.0f} s\n{stack.tail()}")


@pytest.fixture(scope="module")
def stack(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("faults")
    pg = PostgresServer().start()
    redis = RedisServer().start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        db_url = create_pg_database(pg.url)
        upgrade_database(db_url)
        port = free_port()
        env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "REDIS_URL": redis.url,
            "SURFING_MODELS_DIR": str(models_dir),
            "SURFING_QUEUE_NAME": "faults",
            "SURFING_TORCH_THREADS": "1",
            "SURFING_COALESCE_MAX_TARGETS": "0",
            "SURFING_AUTH": "off",
            "SURFING_BIND_HOST": "127.0.0.1",
            "SURFING_RATE_LIMIT_PER_MIN": "0",
            "SURFING_MAX_ACTIVE_JOBS_PER_KEY": "100000",
            "SURFING_MAX_QUEUED_JOBS": "100000",
            "SURFING_LOG_LEVEL": "WARNING",
        }
        api = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app"]
        api += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        logs = [tmp / "api.log", tmp / "worker.log"]
        procs.append(_spawn(api, env, logs[0]))
        procs.append(_spawn([sys.executable, "-m", "worker"], env, logs[1]))
        s = Stack(pg, redis, f"http://127.0.0.1:{port}", procs, logs)
        _until(lambda: _ready(s), "/readyz 200", s, 40)
        yield s
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        redis.stop()
        pg.stop()


class Load:
    """Client threads that submit, poll one job and probe /healthz until stopped."""

    def __init__(self, base: str, job_id: str) -> None:
        self.base, self.job_id = base, job_id
        self.answers: list[Answer] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, args=(kind, pause), daemon=True)
            for kind, pause in (("submit", 0.3), ("poll", 0.1), ("healthz", 0.1))
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(CLIENT_TIMEOUT_S + 5)

    def request(self, client: httpx.Client, kind: str) -> Answer:
        t = time.monotonic()
        try:
            if kind == "submit":
                r = client.post("/invert", json=SMALL)
            elif kind == "poll":
                r = client.get(f"/jobs/{self.job_id}")
            else:
                r = client.get("/healthz")
        except httpx.HTTPError as e:
            a = Answer(kind, t - self.t0, None, time.monotonic() - t, error=repr(e))
        else:
            a = Answer(
                kind,
                t - self.t0,
                r.status_code,
                time.monotonic() - t,
                r.headers.get("retry-after"),
                r.headers.get("content-type", ""),
                job_id=r.json().get("job_id") if r.status_code == 202 else None,
            )
        with self._lock:
            self.answers.append(a)
        return a

    def _loop(self, kind: str, pause: float) -> None:
        with httpx.Client(base_url=self.base, timeout=CLIENT_TIMEOUT_S) as client:
            while not self._stop.is_set():
                self.request(client, kind)
                self._stop.wait(pause)

    def burst(self, n: int) -> list[Answer]:
        """n concurrent polls, each on its own connection: more than the API's thread pool."""

        def one(_: int) -> Answer:
            with httpx.Client(base_url=self.base, timeout=CLIENT_TIMEOUT_S) as client:
                return self.request(client, "poll")

        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(one, range(n)))

    def since(self, t: float) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if a.t >= t]

    def now(self) -> float:
        return time.monotonic() - self.t0


def _recovered(load: Load, since: float) -> bool:
    kinds = {a.kind for a in load.since(since) if a.status in (200, 202)}
    return {"submit", "poll"} <= kinds


def _check(answers: list[Answer], label: str) -> dict[str, Any]:
    """The invariants, then a summary of what was seen."""
    hung = [a for a in answers if a.status is None]
    assert not hung, f"{label}: requests without a response: {hung[:5]}"
    health = [a for a in answers if a.kind == "healthz"]
    assert health and all(a.status == 200 for a in health), label
    others = [a for a in answers if a.kind != "healthz"]
    assert {a.status for a in others} <= {200, 202, 503}, (label, {a.status for a in others})
    for a in others:
        if a.status == 503:
            assert a.retry_after and int(a.retry_after) >= 1, a
            assert a.content_type.startswith("application/problem+json"), a
    failed = [a for a in others if a.status == 503]
    return {
        "requests": len(others),
        "503": len(failed),
        "max_503_s": round(max((a.seconds for a in failed), default=0.0), 2),
        "max_s": round(max((a.seconds for a in others), default=0.0), 2),
        "healthz": len(health),
        "max_healthz_s": round(max(a.seconds for a in health), 2),
    }


def _job(stack: Stack, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{stack.base}/jobs/{job_id}", timeout=CLIENT_TIMEOUT_S)
    return r.json() if r.status_code == 200 else {}


def _submit(stack: Stack, **options: Any) -> str:
    r = httpx.post(f"{stack.base}/invert", json={**SMALL, **options}, timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


def _long_job(stack: Stack, seconds: float) -> str:
    """A job that runs about `seconds` on this machine: calibrated on a short one first."""
    probe = _submit(stack, direct_steps=4000)
    done = _until(
        lambda: (j := _job(stack, probe)).get("status") == "succeeded" and j, "calibration", stack
    )
    per_step = max(done["timings"]["solve_s"] or 0.0, 1e-3) / 4000
    steps = int(min(1_000_000, seconds / per_step))
    return _submit(stack, direct_steps=steps, lr=1e-4)


def test_postgres_stopped_then_frozen_during_a_running_job(stack: Stack) -> None:
    job_id = _long_job(stack, 45.0)
    _until(lambda: _job(stack, job_id).get("status") == "running", "job running", stack)
    report: dict[str, Any] = {}
    with Load(stack.base, job_id) as load:
        for fault in ("stopped", "frozen"):
            time.sleep(2.0)
            start = load.now()
            if fault == "stopped":
                stack.pg.halt()
            else:
                stack.pg.freeze()
            time.sleep(3.0)
            burst = load.burst(60) if fault == "frozen" else []
            time.sleep(OUTAGE_S - 3.0)
            end = load.now()
            if fault == "stopped":
                stack.pg.start()
            else:
                stack.pg.thaw()
            _until(lambda e=end: _recovered(load, e), f"recovery after {fault}", stack, 60)
            outage = [a for a in load.since(start) if a.t < end]
            report[fault] = _check(load.since(start), fault)
            report[fault]["503_during_outage"] = sum(a.status == 503 for a in outage)
            report[fault]["recovered_after_s"] = round(
                min(a.t for a in load.since(end) if a.status in (200, 202)) - end, 2
            )
            assert report[fault]["503_during_outage"] > 0, f"the {fault} fault was not seen"
            if burst:
                assert all(a.status == 503 for a in burst), [a.status for a in burst]
                report[fault]["burst_60_max_s"] = round(max(a.seconds for a in burst), 2)
        still_running = _job(stack, job_id).get("status") == "running"
    report["all"] = _check(load.answers, "whole run")
    job = _until(
        lambda: (j := _job(stack, job_id)).get("status") in ("succeeded", "failed") and j,
        "the long job to finish",
        stack,
        240,
    )
    report["job"] = {k: job[k] for k in ("status", "attempt", "error")}
    print("\nfaults:", report)
    assert still_running, "the job finished before the faults ended: calibrate longer"
    assert job["status"] == "succeeded", (job, stack.tail())
    assert job["attempt"] == 1, job


def test_redis_frozen_during_submits(stack: Stack) -> None:
    seen = _submit(stack)
    with Load(stack.base, seen) as load:
        time.sleep(1.0)
        start = load.now()
        stack.redis.freeze()
        time.sleep(OUTAGE_S)
        end = load.now()
        stack.redis.thaw()
        _until(lambda: _recovered(load, end), "recovery after the Redis freeze", stack, 60)
    report = _check(load.since(start), "redis frozen")
    during = [a for a in load.since(start) if a.t < end and a.kind == "submit"]
    report["submits_during_freeze"] = {
        s: sum(a.status == s for a in during) for s in sorted({a.status for a in during})
    }
    accepted = [str(a.job_id) for a in during if a.status == 202]
    assert during, "no submit was made during the freeze"
    # Every job accepted meanwhile runs once Redis is back (SQL is the source of truth).
    for job_id in [*accepted, _submit(stack)]:
        _until(lambda j=job_id: _job(stack, j).get("status") == "succeeded", job_id, stack)
    report["accepted_during_freeze_then_succeeded"] = len(accepted)
    print("\nredis frozen:", report)
