"""ASGI middleware: request body cap and Prometheus request metrics.

Both are plain ASGI (not BaseHTTPMiddleware) so they see the raw byte stream: the size cap
stops reading a chunked upload as soon as it passes the limit, instead of after buffering it.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import Metrics
from app.problems import TooLarge, problem_response


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """413 problem for request bodies over `max_bytes` (Content-Length or streamed count).

    `exempt` (method, path) pairs are routes that stream their body to disk under their own,
    larger cap (POST /models: a model archive).
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, exempt: frozenset[tuple[str, str]] = frozenset()
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    def _problem(self, scope: Scope) -> Any:
        return problem_response(
            TooLarge(
                f"request body exceeds the upload limit of {self.max_bytes} bytes "
                "(SURFING_MAX_UPLOAD_BYTES)",
                limit=self.max_bytes,
            ),
            scope.get("path"),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope.get("method"), scope.get("path")) in self.exempt:
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await self._problem(scope)(scope, receive, send)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._problem(scope)(scope, receive, send)


class RequestMetrics:
    """Counts requests and observes latency per route template (not per raw path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            method = scope.get("method", "?")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - t0)
