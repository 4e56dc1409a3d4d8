"""Completion webhooks (app.lifecycle.webhooks) against a receiver on loopback:

- a finished job gets one POST whose body is the job document (as GET /jobs/{id}) and whose
  X-Surfing-Signature is HMAC-SHA256 of `<X-Surfing-Timestamp>.<body>` with the secret;
- a receiver that fails twice gets the third attempt, and the attempts are recorded; one that
  always fails leaves the delivery `failed` after the last attempt;
- however many deliverers race, and however often the housekeeper scans, one successful POST;
- a pending delivery left by a stopped process is sent by the next housekeeper tick;
- disallowed, credentialed or disabled callbacks are a 422 at submit; a host name that
  resolves to loopback is refused at delivery (SSRF) unless an address entry names it;
- a slow receiver does not hold up the worker: the job is final, and the next job runs,
  while the POST is still waiting.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app import lifecycle
from app.db import session_factory, upgrade_database, utcnow
from app.lifecycle import Housekeeper, webhooks
from app.main import create_app
from app.models import Job
from app.schemas import SolveOptions
from app.services.jobs import create_invert_job
from app.settings import Settings
from tests.helpers import FakeQueue

SECRET = "a-test-secret-of-32-characters!!"
IMAGE = [[[0.5] * 28] * 28]
FAST = {"method": "adam", "direct_steps": 5}


class Receiver:
    """An HTTP receiver on 127.0.0.1: records every POST; answers `fail` 500s first, and
    while `hold` is set waits for `release` before answering."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.posts: list[tuple[dict[str, str], bytes, int]] = []
        self.entered = threading.Event()
        self.hold = False
        self.release = threading.Event()
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.entered.set()
                if outer.hold:
                    outer.release.wait(30)
                with outer.lock:
                    code = 500 if outer.fail > 0 else 204
                    outer.fail -= 1
                    outer.posts.append((dict(self.headers), body, code))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook?x=1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ok(self) -> list[tuple[dict[str, str], bytes, int]]:
        with self.lock:
            return [p for p in self.posts if p[2] < 300]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.release.set()
    r.server.shutdown()


def settings_for(tmp: Path, models_dir: Path, allow: str, **kw: Any) -> Settings:
    fields: dict[str, Any] = dict(
        database_url=None, redis_url=None, state_dir=tmp, models_dir=models_dir, auth="off",
        torch_threads=1, webhook_allow=allow, webhook_secret=SECRET if allow else None,
        webhook_retry_s=0.1, webhook_timeout_s=0.3,
    )  # fmt: skip
    fields.update(kw)
    return Settings(**fields)


def until(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll until `check()` is truthy (a bound on waiting, not a timing assertion)."""
    end = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.05)
    return value


def row(settings: Settings, job_id: str) -> Job:
    with session_factory(settings.sqlalchemy_url)() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def submit(client: TestClient, **body: Any) -> str:
    r = client.post("/invert", json={"model_id": "tiny", "image": IMAGE, **FAST, **body})
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


def test_a_finished_job_gets_one_signed_post_of_its_document(
    tmp_path: Path, models_dir: Path, receiver: Receiver
) -> None:
    settings = settings_for(tmp_path, models_dir, f"127.0.0.1:{receiver.port}")
    with TestClient(create_app(settings)) as client:
        job_id = submit(client, callback_url=receiver.url)
        until(lambda: row(settings, job_id).webhook_status == "delivered", "delivery")
        doc = client.get(f"/jobs/{job_id}").json()
        # the housekeeper scans and a late kick change nothing once delivered
        Housekeeper(client.app.state.sessions, None, settings).run_once()
        hooks = webhooks.deliverer(client.app.state.sessions, settings)
        assert hooks is not None and hooks.attempt(job_id) is None
    (headers, body, code), = receiver.posts  # fmt: skip
    assert doc["status"] == "succeeded" and json.loads(body) == doc
    assert json.loads(body)["result"]["latent"] == doc["result"]["latent"]
    stamp = headers["X-Surfing-Timestamp"]
    mac = hmac.new(SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert headers["X-Surfing-Signature"] == f"sha256={mac}"
    assert abs(int(stamp) - time.time()) < 600
    assert webhooks.verify(SECRET.encode(), stamp, body, headers["X-Surfing-Signature"])
    assert not webhooks.verify(b"another secret", stamp, body, headers["X-Surfing-Signature"])
    assert not webhooks.verify(SECRET.encode(), stamp, body + b" ", f"sha256={mac}")
    assert headers["X-Surfing-Event"] == "job.succeeded" and headers["X-Surfing-Job"] == job_id
    job = row(settings, job_id)
    assert (job.webhook_attempts, job.webhook_error, job.callback_url) == (1, None, receiver.url)


def test_failures_are_retried_until_delivered_then_given_up(
    tmp_path: Path, models_dir: Path, receiver: Receiver
) -> None:
    receiver.fail = 2
    settings = settings_for(tmp_path, models_dir, f"127.0.0.1:{receiver.port}",
                            webhook_max_attempts=3)  # fmt: skip
    with TestClient(create_app(settings)) as client:
        job_id = submit(client, callback_url=receiver.url)
        until(lambda: row(settings, job_id).webhook_status == "delivered", "delivery")
        job = row(settings, job_id)
        assert job.webhook_attempts == 3 and job.webhook_error is None
        assert [p[2] for p in receiver.posts] == [500, 500, 204]
        assert [p[0]["X-Surfing-Attempt"] for p in receiver.posts] == ["1", "2", "3"]
        assert len({p[1] for p in receiver.posts}) == 1  # the same document every time

        receiver.fail = 10  # from now on every POST fails
        other = submit(client, callback_url=receiver.url)
        until(lambda: row(settings, other).webhook_status == "failed", "giving up")
        job = row(settings, other)
        assert job.webhook_attempts == 3 and job.webhook_error == "HTTP 500 Internal Server Error"
    assert len(receiver.posts) == 6 and len(receiver.ok()) == 1


def _pending_canceled_job(settings: Settings, models_dir: Path, url: str) -> tuple[Any, str]:
    """A canceled job whose webhook no process has tried yet (as if its process stopped)."""
    upgrade_database(settings.sqlalchemy_url)
    sessions = session_factory(settings.sqlalchemy_url)
    from models_store import ModelStore

    def admit(session: Any, job: Job) -> None:
        job.callback_url, job.webhook_status = url, webhooks.PENDING

    with sessions() as s:
        job = create_invert_job(s, ModelStore(models_dir), settings, FakeQueue(), "tiny",
                                SolveOptions(), IMAGE, "json", admit)  # fmt: skip
        assert lifecycle.cancel(s, job.id)
    return sessions, job.id


def test_racing_deliverers_post_once(tmp_path: Path, models_dir: Path, receiver: Receiver) -> None:
    settings = settings_for(tmp_path, models_dir, f"127.0.0.1:{receiver.port}")
    sessions, job_id = _pending_canceled_job(settings, models_dir, receiver.url)
    racers = [webhooks.Deliverer(sessions, settings, senders=0) for _ in range(4)]
    start = threading.Barrier(len(racers))

    def race(d: webhooks.Deliverer) -> None:
        start.wait()
        d.attempt(job_id)

    threads = [threading.Thread(target=race, args=(d,)) for d in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(receiver.posts) == 1 and len(receiver.ok()) == 1
    headers, body, _ = receiver.posts[0]
    assert headers["X-Surfing-Event"] == "job.canceled"
    assert json.loads(body)["status"] == "canceled"
    job = row(settings, job_id)
    assert (job.webhook_status, job.webhook_attempts) == ("delivered", 1)


def test_the_housekeeper_sends_what_a_stopped_process_left(
    tmp_path: Path, models_dir: Path, receiver: Receiver
) -> None:
    settings = settings_for(tmp_path, models_dir, f"127.0.0.1:{receiver.port}")
    sessions, job_id = _pending_canceled_job(settings, models_dir, receiver.url)
    # an attempt was claimed long ago and its process died before recording the outcome
    with sessions() as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            webhook_attempts=1, updated_at=utcnow() - timedelta(hours=1)))  # fmt: skip
        s.commit()
    Housekeeper(sessions, None, settings).run_once()
    until(lambda: row(settings, job_id).webhook_status == "delivered", "delivery")
    assert len(receiver.posts) == 1 and receiver.posts[0][0]["X-Surfing-Attempt"] == "2"


def test_refused_callbacks_are_422_at_submit(
    tmp_path: Path, models_dir: Path, receiver: Receiver
) -> None:
    settings = settings_for(tmp_path / "a", models_dir, f"127.0.0.1:{receiver.port}")
    with TestClient(create_app(settings)) as client:
        for url, word in [
            ("http://example.com/hook", "not allowed"),
            (f"http://127.0.0.1:{receiver.port + 1}/hook", "not allowed"),  # other port
            (f"http://user:pw@127.0.0.1:{receiver.port}/hook", "credentials"),
            (f"ftp://127.0.0.1:{receiver.port}/hook", "callback_url"),
            (f"http://127.0.0.1:{receiver.port}/a b", "callback_url"),
        ]:
            r = client.post("/invert", json={"model_id": "tiny", "image": IMAGE,
                                             "callback_url": url})  # fmt: skip
            assert r.status_code == 422 and word in r.text, (url, r.text)
        r = client.post("/invert", data={"model_id": "tiny", "callback_url": "http://example.com/"},
                        files={"image": ("t.json", json.dumps(IMAGE).encode())})  # fmt: skip
        assert r.status_code == 422 and r.json().get("field") == "callback_url", r.text
    off = settings_for(tmp_path / "b", models_dir, "")
    with TestClient(create_app(off)) as client:
        r = client.post("/invert", json={"model_id": "tiny", "image": IMAGE,
                                         "callback_url": receiver.url})  # fmt: skip
        assert r.status_code == 422 and "SURFING_WEBHOOK_ALLOW" in r.text, r.text
    assert receiver.posts == []
    with pytest.raises(ValueError, match="SURFING_WEBHOOK_SECRET"):
        Settings(webhook_allow="127.0.0.1")


def test_a_name_resolving_to_loopback_is_refused_at_delivery(
    tmp_path: Path, models_dir: Path, receiver: Receiver
) -> None:
    settings = settings_for(tmp_path, models_dir, f"localhost:{receiver.port}")
    with TestClient(create_app(settings)) as client:
        job_id = submit(client, callback_url=f"http://localhost:{receiver.port}/hook")
        until(lambda: row(settings, job_id).webhook_status == "failed", "refusal")
    job = row(settings, job_id)
    assert job.webhook_attempts == 1 and "not a public address" in (job.webhook_error or "")
    assert receiver.posts == []


def test_a_slow_receiver_does_not_hold_up_the_worker(
    tmp_path: Path, models_dir: Path, receiver: Receiver
) -> None:
    receiver.hold = True
    settings = settings_for(tmp_path, models_dir, f"127.0.0.1:{receiver.port}",
                            webhook_timeout_s=30)  # fmt: skip
    with TestClient(create_app(settings)) as client:
        first = submit(client, callback_url=receiver.url)
        until(receiver.entered.is_set, "the POST to arrive")
        # the POST is waiting in the receiver: the job is already final ...
        assert client.get(f"/jobs/{first}").json()["status"] == "succeeded"
        # ... and the worker takes the next job meanwhile
        second = submit(client)
        until(lambda: client.get(f"/jobs/{second}").json()["status"] == "succeeded", "job 2")
        assert receiver.posts == [] and not receiver.release.is_set()
        assert row(settings, first).webhook_status == "pending"
        receiver.release.set()
        until(lambda: row(settings, first).webhook_status == "delivered", "delivery")
    assert len(receiver.posts) == 1 and row(settings, second).webhook_status is None
