"""GET /jobs/{id}/events (Server-Sent Events) and GET /jobs/{id}/preview.png.

Same access rules as GET /jobs/{id}: a key sees only its own jobs. A browser's EventSource
cannot send headers, so the event stream (and only it) also takes the key as `?access_token=`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.auth import AUTH_RESPONSES, Principal, authenticate, bearer, check_scope
from app.deps import ReadKey, SessionDep
from app.models import Job
from app.problems import NotFound
from app.services import events
from app.services import jobs as service

router = APIRouter(tags=["jobs"])

EVENTS_DESCRIPTION = """Live progress of a job as Server-Sent Events (`text/event-stream`).

Events, each with an `id:` that increases (from `Last-Event-ID` + 1 on a reconnect):

- `snapshot`: on connect, the job document as `GET /jobs/{id}` returns it;
- `progress`: the `progress` object (`pass`, `pass_index`, `pass_round`, `stage`, `stages`,
  `step`, `objective`, `updated_at`) plus `preview`: a base64 PNG of the first target's current
  reconstruction G_t(x_t) when a new one was written (at most about once a second), else null;
- `status`: `{status, attempt, error?}` when the status or the attempt changes;
- `end`: the final job document; then the server closes the stream;
- `timeout`: the stream reached SURFING_EVENTS_MAX_S; reconnect to go on.

Comment lines (`: keep-alive`) are sent every 15 s on a quiet stream. A reconnect gets a fresh
snapshot; old progress is not replayed. Browsers' EventSource cannot set headers: pass the API
key as `?access_token=` (accepted on this route only)."""


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"


def events_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    access_token: Annotated[
        str | None,
        Query(description="The API key, for clients that cannot send an Authorization header "
              "(EventSource). This route only; the header wins when both are sent."),
    ] = None,
) -> Principal:
    """The caller, by Bearer header or `access_token`, allowed to read (app.auth's rules)."""
    token = credentials.credentials if credentials else access_token
    state = request.app.state
    return check_scope(authenticate(state.sessions, state.settings, token), "read")


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventStreamResponse,
    responses={
        **AUTH_RESPONSES,
        200: {
            "description": "The event stream.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        404: {"description": "No such job of this key."},
    },
    summary="Live progress of a job (Server-Sent Events)",
    description=EVENTS_DESCRIPTION,
)
async def job_events(
    job_id: str,
    request: Request,
    principal: Annotated[Principal, Depends(events_principal)],
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", description="Sent by EventSource on a reconnect."),
    ] = None,
) -> Any:
    sessions = request.app.state.sessions
    owner = principal.owner_filter
    snapshot = await run_in_threadpool(events.document, sessions, job_id, owner)
    stream = events.job_events(
        sessions,
        job_id,
        owner,
        snapshot,
        last_event_id,
        events.max_seconds(request.app.state.settings),
        request.is_disconnected,
    )
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return EventStreamResponse(stream, headers=headers)


@router.get(
    "/jobs/{job_id}/preview.png",
    response_class=Response,
    responses={
        **AUTH_RESPONSES,
        200: {"content": {"image/png": {}}},
        404: {"description": "No such job of this key, or no preview yet."},
    },
    summary="The latest preview of a running job: G_t(x_t) of its first target, as PNG",
)
def preview_png(job_id: str, session: SessionDep, principal: ReadKey) -> Response:
    job = service.get_job(session, job_id, False, principal.owner_filter)
    png = session.scalar(select(Job.preview_png).where(Job.id == job.id))
    if not png:
        raise NotFound(f"job {job_id} has no preview (yet)")
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})
