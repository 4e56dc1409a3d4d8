"""Webhooks: one signed POST of the job document when a job ends, sent in the background.

At submit, `check_callback_url` (app.lifecycle.webhook_targets) accepts an http(s) URL without
credentials whose host matches SURFING_WEBHOOK_ALLOW; the row then carries `callback_url` and
`webhook_status = pending`.
Any process may deliver (`Deliverer`: a few daemon threads): the worker kicks its jobs as it
finishes them, and the housekeeper of every process schedules the pending ones of finished rows
each tick, so a delivery outlives a restart and a cancel made by the API is sent too.

- One attempt at a time, across processes: an attempt is claimed by `webhook_attempts += 1`
  guarded by the count read. The claim and the outcome also stamp `updated_at`, which on a
  finished row only webhook writes move, so the next attempt is due at `updated_at + gap`
  (`gap`: retry_s * 3^i, never under 1.5 request timeouts, so attempts do not overlap).
- SSRF: the host is resolved at delivery and every address must be public, or inside an
  address/CIDR entry of the allow list; the connection goes to the checked address (no second
  lookup), and redirects are not followed.
- 2xx is delivered; anything else is retried until `webhook_max_attempts`, then failed. A
  refused target fails at once. An outcome lost with its process is retried: receivers get the
  document at least once and may deduplicate on `job_id`.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import threading
import time
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, selectinload, sessionmaker

from app.db import utcnow
from app.lifecycle.retry import DbRetry
from app.lifecycle.webhook_targets import (
    SIGNATURE_HEADER,
    WebhookRefused,
    check_callback_url,
    parse_allow,
    parse_target,
    post,
    resolve,
)
from app.models import TERMINAL, Job
from app.settings import Settings

__all__ = ["Deliverer", "WebhookRefused", "check_callback_url", "deliverer", "notify",
           "parse_allow", "sign", "verify"]  # fmt: skip

log = logging.getLogger(__name__)

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
TIMESTAMP_HEADER = "X-Surfing-Timestamp"
MAX_SCHEDULED = 10_000  # per process; past it the database remembers and a later scan resumes


# ---- signing and sending -----------------------------------------------------------------


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """`sha256=` + hex HMAC-SHA256 over `<timestamp>.<body>` (the bytes exactly as sent)."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def verify(
    secret: bytes, timestamp: str, body: bytes, signature: str, tolerance_s: float = 300.0
) -> bool:
    """What a receiver does: the signature matches and the timestamp is recent (no replay)."""
    try:
        fresh = abs(time.time() - int(timestamp)) <= tolerance_s
    except ValueError:
        return False
    return fresh and hmac.compare_digest(sign(secret, timestamp, body), signature)


def job_document(job: Job) -> bytes:
    """The job as GET /jobs/{id} returns it (app.services imports this package: imported
    here, at call time)."""
    from app.schemas import JobOut
    from app.services.jobs import job_view

    view = JobOut.model_validate(job_view(job, utcnow()))
    doc = view.model_dump(mode="json", by_alias=True)  # as FastAPI answers
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


# ---- delivery ----------------------------------------------------------------------------


class Deliverer:
    """Daemon threads making due delivery attempts; `kick` schedules one, `scan` schedules
    every pending one. The database holds the state: this only decides when to look."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, senders: int = 4):
        assert settings.webhook_secret is not None
        self.sessions, self.settings = sessions, settings
        self.rules = parse_allow(settings.webhook_allow)
        self.secret = settings.webhook_secret.get_secret_value().encode()
        self._due: dict[str, float] = {}  # job id -> time.monotonic() it is due
        self._busy: set[str] = set()
        self._cv = threading.Condition()
        for i in range(senders):
            threading.Thread(target=self._loop, name=f"surfing-webhooks-{i}", daemon=True).start()

    def gap(self, attempts: int) -> float:
        """Seconds from attempt `attempts` (>= 1) to the next."""
        s = self.settings
        return max(s.webhook_retry_s * 3 ** (attempts - 1), 1.5 * s.webhook_timeout_s)

    def _wait(self, attempts: int, last: datetime, now: datetime) -> float:
        return 0.0 if attempts == 0 else self.gap(attempts) - (now - last).total_seconds()

    def kick(self, job_id: str, delay: float = 0.0) -> None:
        at = time.monotonic() + max(delay, 0.0)
        with self._cv:
            if job_id in self._due and self._due[job_id] <= at:
                return
            if job_id not in self._due and len(self._due) >= MAX_SCHEDULED:
                return
            self._due[job_id] = at
            self._cv.notify()

    def scan(self, limit: int = 500) -> int:
        """Schedule the pending deliveries of finished jobs (the housekeeper, every tick)."""
        now = utcnow()
        with self.sessions() as s:
            rows = s.execute(
                select(Job.id, Job.webhook_attempts, Job.updated_at)
                .where(Job.webhook_status == PENDING, Job.status.in_(TERMINAL))
                .order_by(Job.updated_at)
                .limit(limit)
            ).all()
        for job_id, attempts, last in rows:
            self.kick(job_id, self._wait(attempts, last, now))
        return len(rows)

    def _next(self) -> str:
        with self._cv:
            while True:
                ready = [(at, j) for j, at in self._due.items() if j not in self._busy]
                wait = None
                if ready:
                    at, job_id = min(ready)
                    wait = at - time.monotonic()
                    if wait <= 0:
                        del self._due[job_id]
                        self._busy.add(job_id)
                        return job_id
                self._cv.wait(wait)

    def _loop(self) -> None:
        while True:
            job_id = self._next()
            retry_in = None
            try:
                retry_in = self.attempt(job_id)
            except Exception as e:  # a database blip: the next scan picks the job up again
                log.warning("webhook of job %s: %s: %s", job_id, type(e).__name__, e)
            finally:
                with self._cv:
                    self._busy.discard(job_id)
                    self._cv.notify_all()
            if retry_in is not None:
                self.kick(job_id, retry_in)

    def attempt(self, job_id: str) -> float | None:
        """Make the job's next delivery attempt if it is due and still pending; returns when to
        look again (None: nothing more to do here)."""
        now = utcnow()
        with self.sessions() as s:
            job = s.scalars(
                select(Job).where(Job.id == job_id).options(selectinload(Job.result))
            ).one_or_none()
            if (job is None or job.webhook_status != PENDING or job.status not in TERMINAL
                    or not job.callback_url):  # fmt: skip
                return None
            seen = job.webhook_attempts or 0
            wait = self._wait(seen, job.updated_at, now)
            if wait > 0:
                return wait
            if seen >= self.settings.webhook_max_attempts:  # the last one's outcome was lost
                self._record(job_id, seen, FAILED, f"no answer recorded after {seen} attempts")
                return None
            claimed = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.webhook_status == PENDING,
                       Job.webhook_attempts == seen)  # fmt: skip
                .values(webhook_attempts=seen + 1, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                s.rollback()
                return None  # another process made this attempt
            s.commit()
            url, status, body = job.callback_url, job.status, job_document(job)
        n = seen + 1
        final, error = self._send(job_id, url, status, body, n)
        if error is not None:
            log.info("webhook of job %s, attempt %d: %s", job_id, n, error)
        state = DELIVERED if error is None else FAILED if final else PENDING
        DbRetry(budget_s=30.0)(f"webhook outcome of job {job_id}", lambda: self._record(
            job_id, n, state, error
        ))
        return self.gap(n) if state == PENDING else None

    def _send(self, job_id: str, url: str, status: str, body: bytes, n: int
              ) -> tuple[bool, str | None]:  # fmt: skip
        """(give up now, error or None)."""
        try:
            target = parse_target(url)
            if not any(r.allows(target.host, target.port) for r in self.rules):
                raise WebhookRefused(f"callback host {target.host} is no longer allowed")
            address = resolve(target, self.rules)
            stamp = str(int(time.time()))
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "surfing-webhook/1",
                "X-Surfing-Event": f"job.{status}",
                "X-Surfing-Job": job_id,
                "X-Surfing-Attempt": str(n),
                TIMESTAMP_HEADER: stamp,
                SIGNATURE_HEADER: sign(self.secret, stamp, body),
            }
            code, reason = post(target, address, body, headers, self.settings.webhook_timeout_s)
        except WebhookRefused as e:
            return True, f"refused: {e}"
        except (OSError, http.client.HTTPException) as e:
            error = f"{type(e).__name__}: {e}"
        else:
            if 200 <= code < 300:
                return True, None
            error = f"HTTP {code} {reason}".strip()
        return n >= self.settings.webhook_max_attempts, error[:1000]

    def _record(self, job_id: str, n: int, state: str, error: str | None) -> None:
        with self.sessions() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.webhook_status == PENDING, Job.webhook_attempts == n)
                .values(webhook_status=state, webhook_error=error, updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            s.commit()


_deliverers: dict[tuple[Any, ...], Deliverer] = {}
_lock = threading.Lock()


def deliverer(sessions: sessionmaker[Session], settings: Settings) -> Deliverer | None:
    """This process's deliverer for these settings (None while webhooks are off here: a
    process without the allow list or the secret leaves deliveries to those that have them)."""
    if not settings.webhook_allow.strip() or settings.webhook_secret is None:
        return None
    key = (settings.sqlalchemy_url, settings.webhook_allow,
           settings.webhook_secret.get_secret_value(), settings.webhook_max_attempts,
           settings.webhook_retry_s, settings.webhook_timeout_s)  # fmt: skip
    with _lock:
        if key not in _deliverers:
            _deliverers[key] = Deliverer(sessions, settings)
        return _deliverers[key]


def notify(sessions: sessionmaker[Session], settings: Settings, job_ids: list[str]) -> None:
    """Schedule the webhooks of jobs that may just have ended; never raises, never waits."""
    try:
        d = deliverer(sessions, settings)
        if d is not None:
            for job_id in job_ids:
                d.kick(job_id)
    except Exception as e:
        log.warning("webhooks not scheduled: %s: %s", type(e).__name__, e)
