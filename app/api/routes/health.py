"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from app.problems import PROBLEM_JSON

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    """No I/O, and `async` so it runs on the event loop: it never waits for the thread pool,
    which requests blocked on a dependency may fill."""
    return {"status": "ok"}


def _checks(request: Request) -> dict[str, dict[str, Any]]:
    state = request.app.state
    checks: dict[str, dict[str, Any]] = {}
    try:
        with state.sessions() as s:
            s.execute(text("SELECT 1"))
            revision = s.execute(text("SELECT version_num FROM alembic_version")).scalar()
        head = state.schema_head
        ok = head is None or revision == head
        checks["database"] = {"ok": ok, "revision": revision, "head": head}
        if not ok:
            checks["database"]["error"] = (
                "schema is not at the latest migration (alembic upgrade head)"
            )
    except Exception as e:
        checks["database"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    try:
        state.queue.ping()
        checks["queue"] = {"ok": True, "kind": state.queue.kind, "depth": state.queue.depth()}
    except Exception as e:
        checks["queue"] = {"ok": False, "kind": state.queue.kind, "error": str(e)}
    try:
        n = state.queue.workers()  # only workers whose heartbeat is fresh (app.lifecycle.presence)
        checks["workers"] = {"ok": n >= 1, "count": n}
        if n < 1:
            checks["workers"]["error"] = (
                "no live worker is serving the queue (none beat within SURFING_STALE_AFTER_S; "
                "start `surfing worker`)"
            )
    except Exception as e:
        checks["workers"] = {"ok": False, "error": str(e)}
    return checks


@router.get(
    "/readyz",
    summary="Readiness: database at the latest schema, queue reachable, at least one worker",
    responses={503: {"description": "Not ready (problem+json listing the failed checks)."}},
)
async def readyz(request: Request) -> JSONResponse:
    checks = await run_in_threadpool(_checks, request)
    failed = [name for name, c in checks.items() if not c["ok"]]
    if not failed:
        return JSONResponse({"status": "ready", "checks": checks})
    return JSONResponse(
        {
            "type": "about:blank",
            "title": "Service unavailable",
            "status": 503,
            "detail": f"not ready: {', '.join(failed)} check(s) failed",
            "instance": "/readyz",
            "checks": checks,
        },
        status_code=503,
        media_type=PROBLEM_JSON,
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
