"""A job's live progress as Server-Sent Events (GET /jobs/{id}/events).

On connect one `snapshot` (the job document, as GET /jobs/{id} shows it), then `progress`
(the progress object, plus `preview`: a base64 PNG when a new one was written, else null) and
`status` ({status, attempt, error?}) as the row changes, and finally one `end` (the final
document), after which the stream closes. A stream lives at most SURFING_EVENTS_MAX_S, then
says `timeout`; a client reconnects (with Last-Event-ID: ids go on increasing from there) and
gets a fresh snapshot, so nothing has to be replayed.

The row is polled every POLL_S in a worker thread (the event loop never waits on the
database); a poll that fails (database away) is skipped, and comments keep idle connections
open through proxies.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.db import utcnow
from app.models import TERMINAL, Job
from app.problems import NotFound
from app.schemas import JobOut, Progress
from app.services import jobs as service

POLL_S = 0.5
KEEPALIVE_S = 15.0
RETRY_MS = 2000  # EventSource's reconnect delay, sent with the snapshot
DEFAULT_MAX_S = 3600.0
MAX_EVENT_ID = 2**53  # ids stay exact in JavaScript

Sessions = Callable[[], Session]


def max_seconds(settings: Any) -> float:
    """SURFING_EVENTS_MAX_S: how long one stream may stay open."""
    return max(float(getattr(settings, "events_max_s", DEFAULT_MAX_S)), 0.0)


def first_id(last_event_id: str | None) -> int:
    """Ids continue after the client's Last-Event-ID (anything else starts at 1)."""
    text = (last_event_id or "").strip()
    if text.isdigit() and int(text) < MAX_EVENT_ID:
        return int(text) + 1
    return 1


def document(sessions: Sessions, job_id: str, owner: str | None) -> dict[str, Any]:
    """The job document, JSON-ready; NotFound for another key's job, as GET answers."""
    with sessions() as session:
        job = service.get_job(session, job_id, True, owner)
        view = service.job_view(job, utcnow())
    return JobOut.model_validate(view).model_dump(mode="json", by_alias=True)


@dataclass(frozen=True)
class State:
    """What the stream compares between polls."""

    status: str
    attempt: int
    error: str | None
    progress: dict[str, Any] | None
    preview_at: datetime | None = None

    @classmethod
    def of(cls, doc: dict[str, Any]) -> State:
        return cls(doc["status"], doc["attempt"], doc["error"], doc["progress"])

    def status_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"status": self.status, "attempt": self.attempt}
        if self.error is not None:
            data["error"] = self.error
        return data


def poll(sessions: Sessions, job_id: str) -> State | None:
    """The row's state now (None once it is gone)."""
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        progress = service.progress_view(job)
        if progress is not None:
            progress = Progress.model_validate(progress).model_dump(mode="json", by_alias=True)
        return State(job.status, job.attempt, job.error, progress, job.preview_at)


def preview(sessions: Sessions, job_id: str) -> bytes | None:
    with sessions() as session:
        return session.scalar(select(Job.preview_png).where(Job.id == job_id))


def encode(event_id: int, name: str, data: dict[str, Any], retry: int | None = None) -> bytes:
    lines = [f"id: {event_id}", f"event: {name}"]
    if retry is not None:
        lines.append(f"retry: {retry}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


async def job_events(
    sessions: Sessions,
    job_id: str,
    owner: str | None,
    snapshot: dict[str, Any],
    last_event_id: str | None,
    max_s: float,
    disconnected: Callable[[], Awaitable[bool]],
) -> AsyncIterator[bytes]:
    """The event stream of one job, starting from `snapshot` (already read, so that a 404 is
    answered before the stream starts)."""
    next_id = first_id(last_event_id)

    def event(name: str, data: dict[str, Any], retry: int | None = None) -> bytes:
        nonlocal next_id, sent_at
        next_id, sent_at = next_id + 1, time.monotonic()
        return encode(next_id - 1, name, data, retry)

    started = sent_at = time.monotonic()
    yield event("snapshot", snapshot, RETRY_MS)
    last, doc = State.of(snapshot), snapshot
    while last.status not in TERMINAL:
        try:
            now = await run_in_threadpool(poll, sessions, job_id)
        except SQLAlchemyError:
            now = last  # the database is away: nothing new to say; keep the connection
        if now is None:  # the row is gone (deleted): what we knew last is all there is
            break
        if now.progress is not None and (
            now.progress != last.progress or now.preview_at != last.preview_at
        ):
            png = None
            if now.preview_at is not None and now.preview_at != last.preview_at:
                png = await _preview(sessions, job_id)
            yield event("progress", {**now.progress, "preview": png})
        if (now.status, now.attempt) != (last.status, last.attempt):
            yield event("status", now.status_data())
        last = now
        if last.status in TERMINAL:
            try:
                doc = await run_in_threadpool(document, sessions, job_id, owner)
            except (NotFound, SQLAlchemyError):
                doc = {**doc, **last.status_data()}
            break
        if time.monotonic() - started >= max_s:
            yield event("timeout", {"after_s": max_s, "status": last.status})
            return
        if await disconnected():
            return
        if time.monotonic() - sent_at >= KEEPALIVE_S:
            sent_at = time.monotonic()
            yield b": keep-alive\n\n"
        await asyncio.sleep(POLL_S)
    yield event("end", doc)


async def _preview(sessions: Sessions, job_id: str) -> str | None:
    try:
        png = await run_in_threadpool(preview, sessions, job_id)
    except SQLAlchemyError:
        return None
    return base64.b64encode(png).decode("ascii") if png else None
