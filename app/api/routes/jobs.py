"""GET/DELETE /jobs/{id}, the reconstruction PNG and the latents as .npy.

A key reads (scope read) and cancels (scope submit) only its own jobs: another key's job is a
404, as if it did not exist. Admin keys, and everyone when auth is off, see every job.
"""

from __future__ import annotations

import io
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app.auth import AUTH_RESPONSES
from app.db import utcnow
from app.deps import QueueDep, ReadKey, SessionDep, SubmitKey
from app.lifecycle.retention import is_purged, purged_detail
from app.models import JobStatus
from app.problems import Problem
from app.schemas import JobOut
from app.services import jobs as service
from app.services.reaper import reap_stale_jobs

router = APIRouter(tags=["jobs"])


@router.get(
    "/jobs/{job_id}",
    response_model=JobOut,
    responses={**AUTH_RESPONSES, 404: {"description": "No such job of this key."}},
    summary="Job status, progress and result",
)
def get_job(
    job_id: str, request: Request, session: SessionDep, queue: QueueDep, principal: ReadKey
) -> Any:
    owner = principal.owner_filter
    job = service.get_job(session, job_id, owner=owner)
    settings = request.app.state.settings
    if job.status == JobStatus.running.value and job.heartbeat_at is not None:
        age = (utcnow() - job.heartbeat_at).total_seconds()
        if age > settings.stale_after_s:  # its worker is gone: settle it now, not later
            reap_stale_jobs(request.app.state.sessions, queue, settings, job_id=job.id)
            session.expire_all()
            job = service.get_job(session, job_id, owner=owner)
    return service.job_view(job, utcnow())


@router.delete(
    "/jobs/{job_id}",
    response_model=JobOut,
    responses={**AUTH_RESPONSES, 404: {"description": "No such job of this key."}},
    summary="Cancel a queued or running job",
)
def cancel_job(job_id: str, session: SessionDep, queue: QueueDep, principal: SubmitKey) -> Any:
    job = service.cancel_job(session, queue, job_id, owner=principal.owner_filter)
    job = service.get_job(session, job.id)
    return service.job_view(job, utcnow())


@router.get(
    "/jobs/{job_id}/reconstruction.png",
    response_class=Response,
    responses={
        **AUTH_RESPONSES,
        200: {"content": {"image/png": {}}},
        404: {"description": "No such job of this key."},
        409: {"description": "No result yet."},
        410: {"description": "Purged: the job is older than the retention period."},
    },
    summary="G_T(x) of a finished job as PNG",
)
async def reconstruction(
    job_id: str,
    request: Request,
    session: SessionDep,
    principal: ReadKey,
    index: Annotated[int, Query(ge=0, description="Which target of a batch job.")] = 0,
    scale: Annotated[int, Query(ge=1, le=16, description="Nearest-neighbour zoom.")] = 1,
) -> Response:
    job = await run_in_threadpool(
        service.get_job, session, job_id, True, principal.owner_filter
    )
    if is_purged(job):
        days = request.app.state.settings.retention_days
        raise Problem(410, purged_detail(job, days), title="Gone", purged=True,
                      retention_days=days, finished_at=job.finished_at)
    png = await run_in_threadpool(
        service.reconstruction_png, job, service.value_range_of(job), index, scale
    )
    return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})


@router.get(
    "/jobs/{job_id}/latent.npy",
    response_class=Response,
    responses={
        **AUTH_RESPONSES,
        200: {"content": {"application/x-npy": {}}},
        404: {"description": "No such job of this key."},
        409: {"description": "No result yet."},
        410: {"description": "Purged: the job is older than the retention period."},
    },
    summary="The latents x of a finished job as .npy (float32, B x k)",
)
def latent_npy(job_id: str, request: Request, session: SessionDep, principal: ReadKey) -> Response:
    job = service.get_job(session, job_id, True, principal.owner_filter)
    if is_purged(job):
        days = request.app.state.settings.retention_days
        raise Problem(410, purged_detail(job, days), title="Gone", purged=True,
                      retention_days=days, finished_at=job.finished_at)
    if job.status != JobStatus.succeeded.value or job.result is None:
        raise Problem(409, f"job {job.id} has no latent yet (status {job.status})",
                      status_now=job.status)
    buf = io.BytesIO()
    np.save(buf, np.asarray(job.result.latent, dtype=np.float32), allow_pickle=False)
    return Response(buf.getvalue(), media_type="application/x-npy", headers={
        "Content-Disposition": f'attachment; filename="latent-{job.id}.npy"'})
