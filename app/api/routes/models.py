"""GET /models, GET /models/{id} (+ samples.png), POST/DELETE /models (administrators) and
GET /measurement-matrix."""

from __future__ import annotations

import io
import shutil
from functools import lru_cache
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app.deps import SessionDep, SettingsDep, StoreDep
from app.problems import Problem
from app.schemas import MeasurementMatrixOut, ModelDetail, ModelSummary
from app.services import jobs as service
from app.services import model_admin as admin
from models_store import Manifest

router = APIRouter(tags=["models"])

NPY_TYPES = ("application/x-npy", "application/octet-stream")


def _summary(m: Manifest) -> dict[str, Any]:
    return {
        "model_id": m.model_id,
        "arch": m.arch,
        "latent_dim": m.latent_dim,
        "output_shape": m.output_shape,
        "value_range": m.value_range,
        "n_pixels": m.n_pixels,
        "training": m.training,
        "dataset": m.dataset,
        "created_at": m.created_at,
        "complete": m.complete,
        "n_checkpoints": len(m.checkpoints),
        "first_step": m.checkpoints[0].step if m.checkpoints else None,
        "last_step": m.checkpoints[-1].step if m.checkpoints else None,
    }


@router.get("/models", response_model=list[ModelSummary], summary="Stored trajectories")
def list_models(store: StoreDep) -> Any:
    return [_summary(m) for m in store.list_models()]


def _detail(m: Manifest) -> dict[str, Any]:
    return {
        **_summary(m),
        "format_version": m.format_version,
        "encoding": m.encoding,
        "latent_prior": m.latent_prior,
        "checkpoints": [
            {"index": i, "step": c.step, "bytes": c.bytes, "sha256": c.sha256}
            for i, c in enumerate(m.checkpoints)
        ],
        "samples_url": f"/models/{m.model_id}/samples.png",
    }


@router.get("/models/{model_id}", response_model=ModelDetail, summary="One trajectory")
def get_model(model_id: str, store: StoreDep) -> Any:
    return _detail(service.load_manifest(store, model_id))


@router.get(
    "/models/{model_id}/samples.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
    summary="G_T on seeded draws from the model's latent prior, as a PNG grid",
)
async def samples(
    model_id: str,
    store: StoreDep,
    n: Annotated[int, Query(ge=16, le=64, description="Samples (fewer for big outputs).")] = 64,
    scale: Annotated[int, Query(ge=1, le=8, description="Nearest-neighbour zoom.")] = 2,
) -> Response:
    png, shown = await run_in_threadpool(admin.samples_png, store, model_id, n, scale)
    headers = {"Cache-Control": "max-age=60", "X-Samples": str(shown)}
    return Response(png, media_type="image/png", headers=headers)


def _admin(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    admin.require_admin(settings, authorization)


AdminDep = Depends(_admin)


@router.post(
    "/models",
    status_code=201,
    response_model=ModelDetail,
    dependencies=[AdminDep],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/x-tar": {}, "application/gzip": {}},
        }
    },
    summary="Upload a trajectory archive (administrators)",
)
async def upload_model(
    request: Request, response: Response, settings: SettingsDep, store: StoreDep
) -> Any:
    """The body is a tar (or tar.gz) of a model folder: `tar -C data/models/ID -cf ID.tar .`.

    It becomes visible only after every check passed; 201 with `Location: /models/{id}`.
    """
    if request.headers.get("content-type", "").lower().startswith("multipart/"):
        raise Problem(
            415,
            "send the archive itself as the request body, not a form: "
            "curl --data-binary @ID.tar -H 'Content-Type: application/x-tar' .../models",
        )
    cap = settings.max_model_upload_bytes
    await run_in_threadpool(admin.sweep_stale_uploads, store.root)
    work = await run_in_threadpool(admin.new_upload_dir, store.root)
    try:
        archive = work / ".archive"
        await admin.save_body(request.stream(), archive, cap, request.headers.get("content-length"))
        manifest = await run_in_threadpool(admin.install_archive, store, archive, work, cap)
    finally:
        await run_in_threadpool(shutil.rmtree, work, True)
    response.headers["Location"] = f"/models/{manifest.model_id}"
    return _detail(manifest)


@router.delete(
    "/models/{model_id}",
    status_code=204,
    response_class=Response,
    dependencies=[AdminDep],
    summary="Delete a trajectory unless jobs for it are queued or running (administrators)",
)
def delete_model(model_id: str, session: SessionDep, store: StoreDep) -> Response:
    admin.delete_model(session, store, model_id)
    return Response(status_code=204)


@lru_cache(maxsize=8)
def _matrix(seed: int, m: int, n: int) -> np.ndarray:
    """The documented generator (torch, CPU); cached because clients fetch it repeatedly."""
    from surfing.measure import gaussian_matrix

    return gaussian_matrix(seed, m, n).numpy()


def _wants_npy(request: Request) -> bool:
    accept = request.headers.get("accept", "*/*").lower()
    types = [part.split(";")[0].strip() for part in accept.split(",")]
    if any(t in NPY_TYPES for t in types):
        return True
    if any(t in ("application/json", "application/*", "*/*", "") for t in types):
        return False
    raise Problem(406, f"cannot produce {accept!r}: ask for application/json or application/x-npy")


@router.get(
    "/measurement-matrix",
    response_model=MeasurementMatrixOut,
    responses={200: {"content": {"application/x-npy": {}}}},
    summary="The Gaussian matrix the server uses for (seed, m)",
)
async def measurement_matrix(
    request: Request,
    store: StoreDep,
    model_id: Annotated[str, Query()],
    m: Annotated[int, Query(description="Number of measurements (1 <= m <= n).")],
    seed: Annotated[int, Query(ge=0, le=2**62)] = 0,
) -> Any:
    """JSON by default; `.npy` (float32, shape (m, n)) for `Accept: application/x-npy`."""
    wants_npy = _wants_npy(request)
    manifest = await run_in_threadpool(service.load_manifest, store, model_id)
    n = manifest.n_pixels
    service.check_m(m, n)
    A = await run_in_threadpool(_matrix, seed, m, n)
    if wants_npy:
        buf = io.BytesIO()
        np.save(buf, A, allow_pickle=False)
        return Response(
            buf.getvalue(),
            media_type="application/x-npy",
            headers={"Content-Disposition": f'attachment; filename="A-seed{seed}-m{m}-n{n}.npy"'},
        )
    return {
        "model_id": model_id,
        "seed": seed,
        "m": m,
        "n": n,
        "generator": service.MATRIX_GENERATOR,
        "matrix": A.tolist(),
    }
