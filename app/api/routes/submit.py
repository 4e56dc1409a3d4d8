"""POST /invert and POST /cs-recover: validate, admit, create a job row, enqueue, answer 202.

Both need a key with scope submit (app.auth). An `Idempotency-Key` header makes a retry safe:
the same key with the same body answers with the job the first request created. A form is
validated with `JobRequest`, the base of both JSON models, and documented from it too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.parsing import MULTIPART, is_form, json_field, media_type, read_body, validate
from app.auth import Principal
from app.deps import QueueDep, SessionDep, SettingsDep, StoreDep, SubmitKey
from app.lifecycle import webhooks
from app.models import Job
from app.openapi_docs import form_fields
from app.problems import InvalidInput
from app.schemas import (
    CSRecoverRequest,
    InvertRequest,
    JobAccepted,
    JobRequest,
    MatrixSeed,
    SolveOptions,
)
from app.services import admission
from app.services import jobs as service
from app.settings import Settings

router = APIRouter(tags=["jobs"])


def _openapi(json_model: type, form: dict[str, Any]) -> dict[str, Any]:
    """Document both accepted encodings (the route reads the body itself)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}
                },
                "multipart/form-data": {"schema": form},
            },
        },
        "responses": {
            "202": {"description": "Job accepted (or, for a repeated Idempotency-Key, the job "
                    "the first request created); poll the Location header."},
            "401": {"description": "No valid API key (problem+json)."},
            "403": {"description": "The key's scope does not allow submitting (problem+json)."},
            "404": {"description": "Unknown model (problem+json)."},
            "413": {"description": "Upload over the size cap (problem+json)."},
            "422": {"description": "Invalid input, or an Idempotency-Key reused for a "
                    "different request (problem+json)."},
            "429": {"description": "Over a rate, quota, queue or compute limit; see "
                    "Retry-After (problem+json)."},
        },
    }


_BINARY = {"type": "string", "format": "binary"}


def _form(required: list[str], **fields: dict[str, Any]) -> dict[str, Any]:
    """The multipart fields: JobRequest's (model, options, callback_url: the JSON body's, with
    the same validator) plus this route's uploads."""
    return {"type": "object", "required": required,
            "properties": {**form_fields(JobRequest), **fields}}  # fmt: skip


INVERT_DOC = _openapi(
    InvertRequest,
    _form(
        ["image", "model_id"],
        image={
            **_BINARY,
            "description": "PNG/JPEG (converted to the model's channels and size; 1- or "
            "3-channel models) or a .npy float array of the model's output shape",
        },
    ),
)
CS_DOC = _openapi(
    CSRecoverRequest,
    _form(
        ["measurements", "model_id"],
        measurements={**_BINARY, "description": ".npy (m,) or (B, m), or a JSON list"},
        matrix={**_BINARY, "description": ".npy (m, n); or give matrix_seed and m"},
        **form_fields(MatrixSeed, rename={"seed": "matrix_seed"}),
        true_image={
            **_BINARY,
            "description": "optional true image: PNG/JPEG (converted as for /invert) or .npy",
        },
    ),
)


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


def _admit_with_callback(
    settings: Settings, url: str | None, admit: admission.Gate
) -> service.Admit:
    """The gate, plus the webhook columns on the row when a callback_url was given (checked
    here, before any work: scheme, no credentials, host allowed)."""
    if url is None:
        return admit
    try:
        webhooks.check_callback_url(url, settings)
    except webhooks.WebhookRefused as e:
        raise InvalidInput(str(e), field="callback_url") from None

    def admit_with_callback(session: Session, job: Job) -> None:
        job.callback_url, job.webhook_status, job.webhook_attempts = url, webhooks.PENDING, 0
        admit(session, job)

    return admit_with_callback


IdempotencyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="A unique string per request (a UUID): a retry with the same key and body "
        "answers with the job the first request created; a different body is a 422.",
    ),
]


class _Admission:
    """One POST's Idempotency-Key and body hash, and the admission steps that use them."""

    def __init__(
        self, settings: Settings, principal: Principal, header: str | None, path: str,
        fields: dict[str, Any], files: dict[str, bytes],
    ) -> None:
        self.settings, self.principal = settings, principal
        self.key = admission.idempotency_key(header)
        # hashed before the route decodes fields in place
        self.digest = None if self.key is None else admission.request_hash(path, fields, files)

    def earlier(self, session: Session) -> Job | None:
        """The job this request already created (a retry), or None; 422 for a reused key."""
        if self.key is None or self.digest is None:
            return None
        job_id = admission.find_replay(session, self.principal.key_id, self.key, self.digest)
        return None if job_id is None else service.get_job(session, job_id, with_result=False)

    def create(self, session: Session, make: Callable[[admission.Gate], Job]) -> tuple[Job, bool]:
        """(job, replayed): `make` builds the job, the gate admits it just before it commits."""
        try:
            with admission.Gate(self.settings, self.principal, self.key, self.digest) as gate:
                return make(gate), False
        except admission.Replay as r:  # a concurrent retry committed first
            session.rollback()
            return service.get_job(session, r.job_id, with_result=False), True
        except IntegrityError:  # the same, from another API process (the unique index)
            session.rollback()
            earlier = self.earlier(session)
            if earlier is None:
                raise
            return earlier, True


def _answer(response: Response, job: Job, replayed: bool) -> JobAccepted:
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return _accepted(response, job.id, job.status)


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
    principal: SubmitKey,
    idempotency_key: IdempotencyHeader = None,
) -> JobAccepted:
    fields, files = await read_body(request, settings)
    entry = _Admission(settings, principal, idempotency_key, request.url.path, fields, files)
    earlier = await run_in_threadpool(entry.earlier, session)
    if earlier is not None:
        return _answer(response, earlier, True)
    admission.check_rate(settings, principal)
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
        form = validate(JobRequest, fields)
        model_id, options, source = form.model_id, _options_of(form), _form_kind(request)
        callback = form.callback_url
    else:
        req = validate(InvertRequest, fields)
        model_id, options, image, source = req.model_id, _options_of(req), req.image, "json"
        callback = req.callback_url

    def make(admit: admission.Gate) -> Job:
        gate = _admit_with_callback(settings, callback, admit)
        return service.create_invert_job(
            session, store, settings, queue, model_id, options, image, source, gate
        )

    job, replayed = await run_in_threadpool(entry.create, session, make)
    return _answer(response, job, replayed)


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
    principal: SubmitKey,
    idempotency_key: IdempotencyHeader = None,
) -> JobAccepted:
    fields, files = await read_body(request, settings)
    entry = _Admission(settings, principal, idempotency_key, request.url.path, fields, files)
    earlier = await run_in_threadpool(entry.earlier, session)
    if earlier is not None:
        return _answer(response, earlier, True)
    admission.check_rate(settings, principal)
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
        form = validate(JobRequest, fields)
        model_id, options, source = form.model_id, _options_of(form), _form_kind(request)
        callback = form.callback_url
    else:
        req = validate(CSRecoverRequest, fields)
        model_id, options, source = req.model_id, _options_of(req), "json"
        measurements, matrix, true_image = req.measurements, req.matrix, req.true_image
        callback = req.callback_url

    def make(admit: admission.Gate) -> Job:
        gate = _admit_with_callback(settings, callback, admit)
        return service.create_cs_job(
            session, store, settings, queue, model_id, options, measurements, matrix,
            true_image, source, gate,
        )

    job, replayed = await run_in_threadpool(entry.create, session, make)
    return _answer(response, job, replayed)
