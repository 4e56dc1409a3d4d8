"""The page at `/` (and `/ui/jobs/{id}`, the same page opened on one job) and the few JSON and
PNG helpers it uses under /ui/api.

The HTML carries no data, so it needs no key; everything the page shows comes from the API
with the key the page keeps in the browser (app/web/static/api.js), and the helpers here
follow the rules of the routes beside them (a key sees only its own jobs). They are left out
of the OpenAPI document: they serve the page and are not a public contract.
"""

from __future__ import annotations

import html
import uuid
from functools import lru_cache
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app import arrays
from app.api.parsing import read_body, validate
from app.deps import ReadKey, SessionDep, SettingsDep, StoreDep, SubmitKey
from app.lifecycle.retention import is_purged, purged_detail
from app.models import Job, JobInput
from app.problems import InvalidInput, NotFound, Problem
from app.services import jobs as service
from app.web import TEMPLATES_DIR
from app.web.examples import examples_for

router = APIRouter(include_in_schema=False)
PNG = "image/png"


@lru_cache(maxsize=1)
def _template() -> str:
    return (TEMPLATES_DIR / "index.html").read_text(encoding="utf-8")


def _page(request: Request, job_id: str = "") -> HTMLResponse:
    root = html.escape(request.scope.get("root_path", ""), quote=True)
    body = _template().replace("{{ root }}", root).replace("{{ job_id }}", job_id)
    return HTMLResponse(body, headers={"Cache-Control": "no-cache"})


@router.get("/", response_class=HTMLResponse)
def index(request: Request) -> HTMLResponse:
    return _page(request)


@router.get("/ui/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str) -> HTMLResponse:
    """A job's stable address: the page, opened on that job (its data needs the key)."""
    try:
        canonical = str(uuid.UUID(job_id))
    except ValueError:
        raise NotFound(f"no job {job_id!r} (job ids are UUIDs)") from None
    return _page(request, canonical)


@router.get("/ui/api/jobs")
def recent_jobs(
    session: SessionDep,
    principal: ReadKey,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> list[dict[str, Any]]:
    """The caller's most recent jobs, newest first (every job for admins and with auth off)."""
    stmt = select(Job).order_by(Job.created_at.desc(), Job.id).limit(limit)
    if principal.owner_filter is not None:
        stmt = stmt.where(Job.owner_key_id == principal.owner_filter)
    return [
        {
            "job_id": job.id,
            "kind": job.kind,
            "model_id": job.model_id,
            "method": job.method,
            "status": job.status,
            "n_targets": job.n_targets,
            "created_at": job.created_at,
            "finished_at": job.finished_at,
        }
        for job in session.scalars(stmt)
    ]


def _png(data: bytes, max_age: int = 3600) -> Response:
    return Response(data, media_type=PNG, headers={"Cache-Control": f"private, max-age={max_age}"})


@router.get("/ui/api/jobs/{job_id}/target.png")
def target_png(
    job_id: str,
    request: Request,
    session: SessionDep,
    principal: ReadKey,
    index: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    """The target as the solver saw it (converted to the model's shape and range): the image
    of /invert, or the true image of /cs-recover when one was given."""
    job = service.get_job(session, job_id, True, principal.owner_filter)
    if is_purged(job):
        days = request.app.state.settings.retention_days
        raise Problem(410, purged_detail(job, days), title="Gone", purged=True)
    raw = session.scalar(select(JobInput.target).where(JobInput.job_id == job.id))
    if raw is None:
        raise NotFound(f"job {job.id} has no target image (a /cs-recover job without true_image)")
    target = arrays.from_npy(raw)
    if not 0 <= index < target.shape[0]:
        raise InvalidInput(f"index {index} is out of range: the job has {target.shape[0]} targets")
    return _png(arrays.to_png(target[index], service.value_range_of(job)))


ExampleIndex = Annotated[int, Path(ge=0, le=99)]


@router.get("/ui/api/models/{model_id}/examples")
def examples(model_id: str, store: StoreDep, principal: ReadKey) -> list[dict[str, Any]]:
    """Held-out test images of the model's dataset (app.web.examples); [] when none."""
    manifest = service.load_manifest(store, model_id)
    return [
        {"index": i, "label": ex.label, "url": f"/ui/api/models/{model_id}/examples/{i}.png"}
        for i, ex in enumerate(examples_for(manifest, store.root))
    ]


@router.get("/ui/api/models/{model_id}/examples/{index}.png")
def example_png(model_id: str, index: ExampleIndex, store: StoreDep, principal: ReadKey) -> Any:
    manifest = service.load_manifest(store, model_id)
    shown = examples_for(manifest, store.root)
    if index >= len(shown):
        raise NotFound(f"model {model_id!r} has {len(shown)} example images")
    return _png(shown[index].png, max_age=86400)


class _MeasureForm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: str
    m: int = Field(..., ge=1)
    seed: int = Field(0, ge=0, le=2**62)


@router.post("/ui/api/measure")
async def measure(
    request: Request, settings: SettingsDep, store: StoreDep, principal: SubmitKey
) -> dict[str, Any]:
    """b = A·y for an uploaded picture `image` and the seeded Gaussian matrix (seed, m): what
    the page sends to /cs-recover, with the same picture as its true image. Computed here so
    the picture is converted exactly as /invert would (size, channels, value range)."""
    fields, files = await read_body(request, settings)
    image = files.pop("image", None)
    if image is None or files:
        raise InvalidInput("upload exactly one file, `image` (PNG, JPEG or .npy)", field="image")
    form = validate(_MeasureForm, fields)
    manifest = await run_in_threadpool(service.load_manifest, store, form.model_id)
    n = manifest.n_pixels
    service.check_m(form.m, n)
    y = arrays.decode_image(
        image, "image", manifest.output_shape, manifest.value_range, settings.max_image_pixels, 1
    )

    def project() -> np.ndarray:
        from surfing.measure import gaussian_matrix

        A = gaussian_matrix(form.seed, form.m, n).numpy()
        return A @ y.reshape(-1).astype(np.float32)

    b = await run_in_threadpool(project)
    return {"model_id": form.model_id, "seed": form.seed, "m": form.m, "n": n,
            "measurements": b.astype(np.float32).tolist()}  # fmt: skip
