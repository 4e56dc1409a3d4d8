"""POST /invert and POST /cs-recover: validate, create a job row, enqueue, answer 202."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from app.api.parsing import MULTIPART, is_form, json_field, media_type, read_body, validate
from app.deps import QueueDep, SessionDep, SettingsDep, StoreDep
from app.problems import InvalidInput
from app.schemas import (
    CSRecoverRequest,
    InvertRequest,
    JobAccepted,
    MatrixSeed,
    SolveOptions,
)
from app.services import jobs as service

router = APIRouter(tags=["jobs"])

_OPTION_FIELDS = {
    "method": {"type": "string", "enum": ["surf", "adam", "adam-restarts", "hybrid"]},
    "steps": {"type": "integer"},
    "final_steps": {"type": "integer"},
    "direct_steps": {"type": "integer"},
    "tol": {"type": "number"},
    "lr": {"type": "number"},
    "stride": {"type": "integer"},
    "restarts": {"type": "integer"},
    "seed": {"type": "integer"},
    "x_init": {"type": "string", "description": "JSON list of k floats"},
}


def _openapi(json_model: type, multipart: dict[str, Any]) -> dict[str, Any]:
    """Document both accepted encodings (the route reads the body itself)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}
                },
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["model_id"],
                        "properties": {
                            "model_id": {"type": "string"},
                            **multipart,
                            **_OPTION_FIELDS,
                        },
                    }
                },
            },
        },
        "responses": {
            "202": {"description": "Job accepted; poll the Location header."},
            "404": {"description": "Unknown model (problem+json)."},
            "413": {"description": "Upload over the size cap (problem+json)."},
            "422": {"description": "Invalid input (problem+json)."},
        },
    }


_BINARY = {"type": "string", "format": "binary"}
INVERT_DOC = _openapi(
    InvertRequest,
    {
        "image": {
            **_BINARY,
            "description": "PNG/JPEG (converted to the model's channels and size; 1- or "
            "3-channel models) or a .npy float array of the model's output shape",
        }
    },
)
CS_DOC = _openapi(
    CSRecoverRequest,
    {
        "measurements": {**_BINARY, "description": ".npy (m,) or (B, m), or a JSON list"},
        "matrix": {**_BINARY, "description": ".npy (m, n); or give matrix_seed and m"},
        "matrix_seed": {"type": "integer"},
        "m": {"type": "integer"},
        "true_image": {
            **_BINARY,
            "description": "optional true image: PNG/JPEG (converted as for /invert) or .npy",
        },
    },
)


class _FormOptions(SolveOptions):
    model_id: str


def _form_kind(request: Request) -> str:
    return "multipart" if media_type(request) == MULTIPART else "form"


def _accepted(response: Response, job_id: str, status: str) -> JobAccepted:
    response.status_code = 202
    response.headers["Location"] = f"/jobs/{job_id}"
    return JobAccepted(
        job_id=job_id,
        status=status,  # type: ignore[arg-type]
        links={"self": f"/jobs/{job_id}", "reconstruction": f"/jobs/{job_id}/reconstruction.png"},
    )


def _options_of(req: SolveOptions) -> SolveOptions:
    return SolveOptions.model_validate(req.model_dump(include=set(SolveOptions.model_fields)))


@router.post(
    "/invert",
    status_code=202,
    response_model=JobAccepted,
    summary="Invert an image: find x with G(x) close to it",
    openapi_extra=INVERT_DOC,
)
async def invert(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    queue: QueueDep,
) -> JobAccepted:
    fields, files = await read_body(request, settings)
    image: Any
    if is_form(request):
        unexpected = set(files) - {"image"}
        if unexpected:
            raise InvalidInput(f"unexpected upload(s): {', '.join(sorted(unexpected))}")
        json_field(fields, "x_init")
        json_field(fields, "image")
        image = files.get("image", fields.pop("image", None))
        if image is None:
            raise InvalidInput("image is required (upload a PNG, JPEG or .npy file)", field="image")
        form = validate(_FormOptions, fields)
        model_id, options, source = form.model_id, _options_of(form), _form_kind(request)
    else:
        req = validate(InvertRequest, fields)
        model_id, options, image, source = req.model_id, _options_of(req), req.image, "json"
    job = await run_in_threadpool(
        service.create_invert_job,
        session,
        store,
        settings,
        queue,
        model_id,
        options,
        image,
        source,
    )
    return _accepted(response, job.id, job.status)


@router.post(
    "/cs-recover",
    status_code=202,
    response_model=JobAccepted,
    summary="Compressed sensing: recover y from A·y",
    openapi_extra=CS_DOC,
)
async def cs_recover(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    queue: QueueDep,
) -> JobAccepted:
    fields, files = await read_body(request, settings)
    matrix: Any
    if is_form(request):
        unexpected = set(files) - {"measurements", "matrix", "true_image"}
        if unexpected:
            raise InvalidInput(f"unexpected upload(s): {', '.join(sorted(unexpected))}")
        for name in ("x_init", "measurements", "matrix", "true_image"):
            json_field(fields, name)
        measurements = files.get("measurements", fields.pop("measurements", None))
        if measurements is None:
            raise InvalidInput("measurements is required", field="measurements")
        matrix = files.get("matrix", fields.pop("matrix", None))
        seed, m = fields.pop("matrix_seed", None), fields.pop("m", None)
        if matrix is None:
            if seed is None or m is None:
                raise InvalidInput(
                    "give the matrix as an upload (.npy), or as matrix_seed and m",
                    field="matrix",
                )
            matrix = validate(MatrixSeed, {"seed": seed, "m": m})
        elif isinstance(matrix, dict):
            matrix = validate(MatrixSeed, matrix)
        true_image = files.get("true_image", fields.pop("true_image", None))
        form = validate(_FormOptions, fields)
        model_id, options, source = form.model_id, _options_of(form), _form_kind(request)
    else:
        req = validate(CSRecoverRequest, fields)
        model_id, options, source = req.model_id, _options_of(req), "json"
        measurements, matrix, true_image = req.measurements, req.matrix, req.true_image
    job = await run_in_threadpool(
        service.create_cs_job,
        session,
        store,
        settings,
        queue,
        model_id,
        options,
        measurements,
        matrix,
        true_image,
        source,
    )
    return _accepted(response, job.id, job.status)
