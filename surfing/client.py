"""Python client for the Surfing HTTP API: submit, watch live progress, fetch results as numpy.

    from surfing.client import Client
    with Client("http://127.0.0.1:8000", api_key="sk_...") as c:
        job_id = c.invert("digit.png", model="demo-dcgan-k10", method="surf")
        c.wait(job_id)                      # tqdm bar fed by GET /jobs/{id}/events
        res = c.result(job_id)              # res.latent (B, k), res.reconstruction (B, *shape)

HTTP only (httpx): it never imports the service's code, so it works against any deployment.
Every POST carries an Idempotency-Key, so retrying it (503/429 with Retry-After, a dropped
connection) can never create a second job. Errors raise `SurfingError` subclasses carrying the
server's problem+json.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from surfing.client_wire import (
    Conflict,
    Forbidden,
    Gone,
    ImageLike,
    InvalidInput,
    JobFailed,
    NotFound,
    RateLimited,
    SurfingError,
    Unauthorized,
    Unavailable,
    decode_png,
    encode_image,
    error_from,
    form_fields,
    parse_sse,
)

__all__ = [
    "Client", "Result", "SurfingError", "InvalidInput", "Unauthorized", "Forbidden", "NotFound",
    "Conflict", "Gone", "RateLimited", "Unavailable", "JobFailed",
]

TERMINAL = ("succeeded", "failed", "canceled")
RETRY_STATUSES = (429, 503)
OnEvent = Callable[[str, dict[str, Any]], None]


# ---- results and progress -------------------------------------------------------------------


@dataclass
class Result:
    """A succeeded job's result as arrays. `reconstruction` is G_T(x) decoded from the server's
    8-bit PNG (within (hi - lo) / 510 of the stored float array; None if not requested or the
    output is not a 1- or 3-channel image)."""

    job_id: str
    latent: np.ndarray  # (B, k)
    objective: np.ndarray  # (B,)
    reconstruction: np.ndarray | None  # (B, *output_shape)
    pixel_error: np.ndarray | None
    measurement_residual: np.ndarray | None
    evals: int
    job: dict[str, Any] = field(repr=False)


class _Bar:
    """A tqdm bar per pass (surf, rescue, final, restart i, adam): the total is the pass's own
    stage count, so the bar never runs backwards; older servers' growing totals also work."""

    def __init__(self, enabled: bool, job_id: str) -> None:
        self.bar = tqdm(total=None, desc=job_id[:8], unit="stage", disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True)
        self.key: tuple[Any, Any] | None = None

    def show(self, p: dict[str, Any] | None, status: str | None = None) -> None:
        if status:
            self.bar.set_postfix_str(status, refresh=False)
        if p:
            stage, stages = p.get("stage"), p.get("stages")
            key = (p.get("pass_index"), p.get("pass"))
            if key != self.key:
                self.key = key
                self.bar.reset(total=stages)
                name, rnd = p.get("pass"), p.get("pass_round")
                if name:  # an older server sends no pass: keep the job id
                    self.bar.set_description(name if rnd is None else f"{name} {rnd}")
            elif stages and stages != self.bar.total:
                self.bar.total = stages
            if stage is not None:
                self.bar.n = stage
            if p.get("objective") is not None:
                self.bar.set_postfix_str(f"objective {p['objective']:.3g}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


# ---- the client -----------------------------------------------------------------------------


class Client:
    """A connection to one Surfing server. `api_key` defaults to $SURFING_API_KEY. 503 and 429
    answers (and lost connections) are retried up to `retries` times, waiting Retry-After (else
    an exponential back-off), as long as the waits fit in `retry_budget` seconds."""

    def __init__(
        self, url: str, api_key: str | None = None, timeout: float = 30.0, retries: int = 5,
        retry_budget: float = 120.0, transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        key = api_key if api_key is not None else os.environ.get("SURFING_API_KEY")
        headers = {"User-Agent": "surfing-client/0.1", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.url, self.timeout = url.rstrip("/"), timeout
        self.retries, self.retry_budget, self._sleep = retries, retry_budget, sleep
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                  transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- transport with retries --

    def _send(self, method: str, path: str, *, stream: bool = False, **kw: Any) -> httpx.Response:
        """One request, retried on 503/429 and on connection errors (a POST only with its
        Idempotency-Key, so a retry finds the job the first try created)."""
        safe = method in ("GET", "HEAD") or "Idempotency-Key" in kw.get("headers", {})
        waited = 0.0
        for attempt in range(self.retries + 1):
            try:
                r = self._http.send(self._http.build_request(method, path, **kw), stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                error: SurfingError = Unavailable(None, "No connection", f"{self.url}: {e}")
                wait = None
            except httpx.TransportError as e:
                if not safe:
                    raise Unavailable(None, "Connection lost", f"{method} {path}: {e}") from e
                error, wait = Unavailable(None, "Connection lost", f"{method} {path}: {e}"), None
            else:
                if r.status_code < 400:
                    return r
                r.read()
                r.close()
                error = error_from(r)
                if r.status_code not in RETRY_STATUSES:
                    raise error
                wait = error.retry_after
            if wait is None:
                wait = min(0.25 * 2**attempt, 10.0) * (0.5 + random.random() / 2)
            if attempt == self.retries or waited + wait > self.retry_budget:
                raise error
            self._sleep(wait)
            waited += wait
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self._send(method, path, **kw).json()

    # -- models --

    def models(self) -> list[dict[str, Any]]:
        """GET /models: the stored trajectories (id, kind, k, output shape, checkpoints)."""
        return list(self._json("GET", "/models"))

    def model(self, model_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/models/{model_id}"))

    # -- submitting --

    def _submit(self, path: str, fields: dict[str, Any], files: dict[str, Any],
                idempotency_key: str | None) -> str:
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        kw: dict[str, Any] = {"data": form_fields(fields), "headers": headers}
        if files:
            kw["files"] = files
        return str(self._json("POST", path, **kw)["job_id"])

    def invert(self, image: ImageLike, model: str, *, idempotency_key: str | None = None,
               **options: Any) -> str:
        """POST /invert; returns the job id. `image`: a PNG/JPEG/.npy path, bytes, a PIL image
        or a numpy array in the model's range ((C, H, W) or a batch (B, C, H, W)). `options`:
        method, schedule, rescue, steps, final_steps, direct_steps, tol, lr, stride, restarts,
        seed, x_init (see /docs)."""
        files = {"image": encode_image(image)}
        return self._submit("/invert", {"model_id": model, **options}, files, idempotency_key)

    def cs_recover(
        self, measurements: Any, model: str, *, matrix: np.ndarray | None = None,
        seed: int | None = None, m: int | None = None, true_image: ImageLike | None = None,
        start_seed: int | None = None, idempotency_key: str | None = None, **options: Any,
    ) -> str:
        """POST /cs-recover; returns the job id. `measurements` b = A·y, (m,) or (B, m); A is
        an explicit (m, n) `matrix`, or the server's Gaussian matrix named by `seed` (and `m`,
        default: len(b)). `start_seed` seeds x_init (the form's `seed`)."""
        b = np.asarray(measurements, dtype=np.float32)
        files: dict[str, Any] = {"measurements": encode_image(b, "measurements")}
        fields: dict[str, Any] = {"model_id": model, "seed": start_seed, **options}
        if matrix is not None:
            files["matrix"] = encode_image(np.asarray(matrix), "matrix")
        elif seed is not None:
            fields.update(matrix_seed=seed, m=m if m is not None else b.shape[-1])
        else:
            raise ValueError("give the measurement matrix, or its seed (and m)")
        if true_image is not None:
            files["true_image"] = encode_image(true_image, "true_image")
        return self._submit("/cs-recover", fields, files, idempotency_key)

    # -- jobs --

    def job(self, job_id: str) -> dict[str, Any]:
        """GET /jobs/{id}: status, progress, timings and (when done) the result."""
        return dict(self._json("GET", f"/jobs/{job_id}"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        """DELETE /jobs/{id}: cancel a queued or running job (Conflict if it already ended)."""
        return dict(self._json("DELETE", f"/jobs/{job_id}"))

    def reconstruction_png(self, job_id: str, index: int = 0, scale: int = 1) -> bytes:
        params = {"index": index, "scale": scale}
        return self._send("GET", f"/jobs/{job_id}/reconstruction.png", params=params).content

    def result(self, job_id: str, reconstruction: bool = True) -> Result:
        """The result of a succeeded job as arrays (JobFailed if it failed or was canceled,
        Conflict while it runs)."""
        doc = self.job(job_id)
        if doc["status"] != "succeeded":
            if doc["status"] in TERMINAL:
                raise JobFailed(doc)
            raise Conflict(409, "Not finished", f"job {job_id} is {doc['status']}", {})
        res, params = doc["result"], doc["params"]
        recon = None
        shape, vr = params.get("output_shape"), params.get("value_range", [0.0, 1.0])
        if reconstruction and shape:
            planes = [decode_png(self.reconstruction_png(job_id, i), shape, vr)
                      for i in range(doc["n_targets"])]
            if all(p is not None for p in planes):
                recon = np.stack(planes)  # type: ignore[arg-type]

        def arr(name: str) -> np.ndarray | None:
            return None if res.get(name) is None else np.asarray(res[name], dtype=np.float64)

        return Result(
            job_id=job_id, latent=np.asarray(res["latent"], dtype=np.float32),
            objective=np.asarray(res["objective"], dtype=np.float64), reconstruction=recon,
            pixel_error=arr("pixel_error"), measurement_residual=arr("measurement_residual"),
            evals=int(res["evals"]), job=doc,
        )

    # -- waiting --

    def wait(self, job_id: str, progress: bool = True, timeout: float | None = None,
             on_event: OnEvent | None = None, poll_interval: float = 0.5) -> dict[str, Any]:
        """Block until the job ends; returns its final document (whatever the status). Follows
        GET /jobs/{id}/events, reconnecting with Last-Event-ID when the stream drops; polls
        GET /jobs/{id} on a server without the stream. `on_event(kind, data)` sees every
        snapshot/progress/status/end event (kind "poll" for each polled document)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _Bar(progress, job_id)
        try:
            doc = self._follow(job_id, bar, deadline, on_event or (lambda k, d: None))
            if doc is None:
                doc = self._poll(job_id, bar, deadline, on_event, poll_interval)
            bar.show(doc.get("progress"), doc["status"])
            return doc
        finally:
            bar.close()

    def _left(self, deadline: float | None, job_id: str) -> float:
        if deadline is None:
            return float("inf")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"job {job_id} still not finished when the wait timed out")
        return left

    def _follow(self, job_id: str, bar: _Bar, deadline: float | None,
                on_event: OnEvent) -> dict[str, Any] | None:
        """The final document from the event stream; None if the server has no stream."""
        last_id: str | None = None
        drops = 0
        while True:
            left = self._left(deadline, job_id)
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            timeout = httpx.Timeout(self.timeout, read=min(60.0, left))  # keep-alive: ~15 s
            try:
                r = self._send("GET", f"/jobs/{job_id}/events", stream=True, headers=headers,
                               timeout=timeout)
            except NotFound:
                self.job(job_id)  # a missing job raises NotFound; else the route is missing
                return None
            moved = False  # anything past the snapshot: a stream that only ever sends
            try:  # snapshots and drops must not loop for ever
                for ev in parse_sse(r.iter_lines()):
                    last_id = ev.id if ev.id is not None else last_id
                    if ev.event == "timeout":  # the server's bound on one stream: reconnect
                        moved = True
                        break
                    data = json.loads(ev.data) if ev.data else {}
                    on_event(ev.event, data)
                    moved = moved or ev.event != "snapshot"
                    if ev.event in ("snapshot", "end"):
                        bar.show(data.get("progress"), data.get("status"))
                        if ev.event == "end" or data.get("status") in TERMINAL:
                            return dict(data)
                    elif ev.event == "progress":
                        bar.show(data)
                    elif ev.event == "status":
                        bar.show(None, data.get("status"))
            except httpx.TransportError:
                pass  # dropped: reconnect below
            finally:
                r.close()
            drops = 0 if moved else drops + 1
            if drops > self.retries:
                raise Unavailable(None, "Stream lost", f"/jobs/{job_id}/events keeps dropping")
            if drops:
                self._sleep(min(0.25 * 2**drops, 5.0, self._left(deadline, job_id)))

    def _poll(self, job_id: str, bar: _Bar, deadline: float | None, on_event: OnEvent | None,
              interval: float) -> dict[str, Any]:
        delay = min(0.1, interval)
        while True:
            doc = self.job(job_id)
            if on_event:
                on_event("poll", doc)
            bar.show(doc.get("progress"), doc["status"])
            if doc["status"] in TERMINAL:
                return doc
            self._sleep(min(delay, self._left(deadline, job_id)))
            delay = min(delay * 1.5, interval)
