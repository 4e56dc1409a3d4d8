"""RFC 9457 problem details: every error the API returns is `application/problem+json`.

Services raise `Problem` (or a subclass) with a message that says what is wrong; the handlers
here turn it, FastAPI's validation errors and Starlette's HTTP errors into problem bodies.
Unexpected exceptions become a 500 problem without internals (they are logged instead); a
database or Redis that is down or not answering becomes a 503 with Retry-After.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis import exceptions as redis_exc
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

_TITLES = {
    400: "Bad request",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    409: "Conflict",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Invalid input",
    500: "Internal server error",
    503: "Service unavailable",
}


class Problem(Exception):
    """An error to report to the client as a problem document."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        type_: str = "about:blank",
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.headers = dict(headers or {})  # e.g. Retry-After on a 429 or 503
        self.status = status
        self.detail = detail
        self.title = title or _TITLES.get(status, "Error")
        self.type = type_
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            doc["instance"] = instance
        doc.update(self.extra)
        return doc


class InvalidInput(Problem):
    """422: the request is well-formed HTTP but its content cannot be used."""

    def __init__(self, detail: str, *, field: str | None = None, **extra: Any) -> None:
        if field is not None:
            extra["field"] = field
        super().__init__(422, detail, **extra)


class NotFound(Problem):
    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(404, detail, **extra)


class TooLarge(Problem):
    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(413, detail, **extra)


def dependency_down(exc: BaseException) -> bool:
    """True for errors that mean PostgreSQL or Redis is down, frozen or overloaded (not a bug):
    connection refused or lost, a connect/statement/pool timeout, a Redis socket timeout."""
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.TimeoutError)):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        return bool(exc.connection_invalidated)
    return isinstance(exc, (redis_exc.ConnectionError, redis_exc.TimeoutError))


def unavailable(retry_after: int, instance: str | None = None) -> JSONResponse:
    """503 with Retry-After: a dependency is down; the request may simply be repeated."""
    response = problem_response(
        Problem(503, "a backing service (database or queue) is not answering; try again later"),
        instance,
    )
    response.headers["Retry-After"] = str(retry_after)
    return response


def _allowed_methods(request: Request) -> str:
    """Allow for a 405: the methods of *every* route on this path (Starlette names only the
    first route that matched, e.g. GET for /jobs/{id}, which also has DELETE)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return ", ".join(sorted(methods))


def _retry_after(request: Request) -> int:
    return int(getattr(getattr(request.app.state, "settings", None), "retry_after_s", 5))


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).partition(chr(10))[0][:200]}"


def problem_response(problem: Problem, instance: str | None = None) -> JSONResponse:
    return JSONResponse(
        jsonable_encoder(problem.body(instance)),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers={"Cache-Control": "no-store", **problem.headers},
    )


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path"))
    return f"{loc}: {error.get('msg')}" if loc else str(error.get("msg"))


def validation_problem(errors: list[dict[str, Any]]) -> Problem:
    """A 422 problem listing pydantic errors (input values left out: they may be huge)."""
    cleaned = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors
    ]
    detail = "; ".join(_describe(e) for e in cleaned) or "invalid request"
    return InvalidInput(detail, errors=cleaned)


def install_handlers(app: FastAPI) -> None:
    """Register the problem handlers on `app`."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        response = problem_response(exc, request.url.path)
        if exc.status == 503 and "retry-after" not in response.headers:
            response.headers["Retry-After"] = str(_retry_after(request))
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(validation_problem(list(exc.errors())), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        problem = Problem(exc.status_code, str(exc.detail))
        response = problem_response(problem, request.url.path)
        if exc.headers:
            response.headers.update(exc.headers)
        if exc.status_code == 405:
            response.headers["Allow"] = _allowed_methods(request)
        return response

    @app.exception_handler(sa_exc.OperationalError)
    @app.exception_handler(sa_exc.TimeoutError)
    @app.exception_handler(sa_exc.DBAPIError)
    @app.exception_handler(redis_exc.ConnectionError)
    @app.exception_handler(redis_exc.TimeoutError)
    async def _dependency(request: Request, exc: Exception) -> JSONResponse:
        if not dependency_down(exc):
            return await _unexpected(request, exc)
        log.warning("%s %s: %s", request.method, request.url.path, _first_line(exc))
        return unavailable(_retry_after(request), request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(
            Problem(500, "internal error; the server log has the details"), request.url.path
        )
