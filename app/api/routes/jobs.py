"""GET/DELETE /jobs/{id} and the reconstruction PNG."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app.db import utcnow
from app.deps import QueueDep, SessionDep
from app.models import JobStatus
from app.schemas import JobOut
from app.services import jobs as service
from app.services.reaper import reap_stale_jobs

router = APIRouter(tags=["jobs"])


@router.get("/jobs/{job_id}", response_model=JobOut, summary="Job status, progress and result")
def get_job(job_id: str, request: Request, session: SessionDep, queue: QueueDep) -> Any:
    job = service.get_job(session, job_id)
    settings = request.app.state.settings
    if job.status == JobStatus.running.value and job.heartbeat_at is not None:
        age = (utcnow() - job.heartbeat_at).total_seconds()
        if age > settings.stale_after_s:  # its worker is gone: settle it now, not later
            reap_stale_jobs(request.app.state.sessions, queue, settings, job_id=job.id)
            session.expire_all()
            job = service.get_job(session, job_id)
    return service.job_view(job, utcnow())


@router.delete("/jobs/{job_id}", response_model=JobOut, summary="Cancel a queued or running job")
def cancel_job(job_id: str, session: SessionDep, queue: QueueDep) -> Any:
    job = service.cancel_job(session, queue, job_id)
    job = service.get_job(session, job.id)
    return service.job_view(job, utcnow())


@router.get(
    "/jobs/{job_id}/reconstruction.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, 409: {"description": "No result yet."}},
    summary="G_T(x) of a finished job as PNG",
)
async def reconstruction(
    job_id: str,
    session: SessionDep,
    index: Annotated[int, Query(ge=0, description="Which target of a batch job.")] = 0,
    scale: Annotated[int, Query(ge=1, le=16, description="Nearest-neighbour zoom.")] = 1,
) -> Response:
    job = await run_in_threadpool(service.get_job, session, job_id)
    png = await run_in_threadpool(
        service.reconstruction_png, job, service.value_range_of(job), index, scale
    )
    return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})
