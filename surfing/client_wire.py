"""The wire format of the Surfing API for `surfing.client`: problem+json errors as exceptions,
Retry-After, uploads (paths, PIL images, numpy arrays), server-sent events and PNG results.

Kept apart from the Client so each part can be read (and tested) on its own; HTTP only.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ImageLike = str | os.PathLike[str] | bytes | np.ndarray | Image.Image


# ---- errors ----------------------------------------------------------------------------------


class SurfingError(RuntimeError):
    """An error answer of the API: `status`, `title`, `detail` and the whole `problem` body."""

    def __init__(
        self, status: int | None, title: str, detail: str, problem: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status or ''} {title}: {detail}".strip())
        self.status, self.title, self.detail = status, title, detail
        self.problem = problem or {}
        self.retry_after = retry_after


class InvalidInput(SurfingError): ...  # 400, 413, 415, 422


class Unauthorized(SurfingError): ...  # 401: no key, or an unknown or revoked one


class Forbidden(SurfingError): ...  # 403: the key's scope is too small


class NotFound(SurfingError): ...  # 404: unknown model or job (or another key's job)


class Conflict(SurfingError): ...  # 409: e.g. canceling a finished job


class Gone(SurfingError): ...  # 410: the job's results were purged


class RateLimited(SurfingError): ...  # 429, after the retries ran out


class Unavailable(SurfingError): ...  # 503 (or no connection), after the retries ran out


class JobFailed(SurfingError):
    """result() of a job that failed or was canceled (`job` holds its document)."""

    def __init__(self, job: dict[str, Any]) -> None:
        status, why = job.get("status"), job.get("error")
        detail = f"job {job.get('job_id')} {status}" + (f": {why}" if why else "")
        super().__init__(None, "Job not succeeded", detail, {})
        self.job = job


_ERRORS: dict[int, type[SurfingError]] = {
    400: InvalidInput, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    410: Gone, 413: InvalidInput, 415: InvalidInput, 422: InvalidInput, 429: RateLimited,
    503: Unavailable,
}


def retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), None if absent or unreadable."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def error_from(response: httpx.Response) -> SurfingError:
    """The exception for an error answer: problem+json fields if present, else the text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    problem = body if isinstance(body, dict) else {}
    title = str(problem.get("title") or response.reason_phrase or "Error")
    detail = str(problem.get("detail") or response.text[:300] or title)
    kind = _ERRORS.get(response.status_code, SurfingError)
    return kind(response.status_code, title, detail, problem, retry_after(response))


# ---- encoding inputs -------------------------------------------------------------------------


def encode_image(image: ImageLike, what: str = "image") -> tuple[str, bytes, str]:
    """(filename, bytes, content type) of an upload: a file path (sent as is), raw bytes, a
    PIL image (as PNG) or a numpy array (as .npy: values in the model's range, exact)."""
    if isinstance(image, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(image, dtype=np.float32), allow_pickle=False)
        return f"{what}.npy", buf.getvalue(), "application/x-npy"
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return f"{what}.png", buf.getvalue(), "image/png"
    if isinstance(image, bytes | bytearray):
        return what, bytes(image), "application/octet-stream"
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return path.name, path.read_bytes(), "application/octet-stream"
    raise TypeError(f"{what}: expected a path, bytes, PIL image or numpy array, not {type(image)}")


def _form_value(value: Any) -> str:
    """A form field as the server parses it: lists as JSON, booleans as true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | np.ndarray):
        return json.dumps(np.asarray(value).tolist())
    return str(value)


def form_fields(options: dict[str, Any]) -> dict[str, str]:
    return {k: _form_value(v) for k, v in options.items() if v is not None}


# ---- server-sent events ----------------------------------------------------------------------


@dataclass
class Event:
    event: str = "message"
    data: str = ""
    id: str | None = None


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Events of a text/event-stream (WHATWG rules: `field: value` lines, a blank line ends an
    event, `:` lines are comments/keep-alives, multi-line data joined with newlines)."""
    ev, data = Event(), []
    for line in lines:
        if not line:
            if data or ev.id is not None or ev.event != "message":
                ev.data = "\n".join(data)
                yield ev
            ev, data = Event(), []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            ev.event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            ev.id = value


# ---- results ---------------------------------------------------------------------------------


def decode_png(png: bytes, shape: list[int], value_range: list[float]) -> np.ndarray | None:
    """The inverse of the server's PNG rendering: 8-bit pixels back to the model's range."""
    with Image.open(io.BytesIO(png)) as im:
        px = np.asarray(im, dtype=np.float32)
    lo, hi = value_range
    arr = lo + (hi - lo) * px / 255.0
    if len(shape) == 3:
        if shape[0] == 3 and arr.ndim == 3:
            return arr.transpose(2, 0, 1)
        return arr[None] if shape[0] == 1 and arr.ndim == 2 else None
    return arr.reshape(shape) if arr.size == int(np.prod(shape)) else None
