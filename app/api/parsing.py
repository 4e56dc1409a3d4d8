"""Turn a JSON or multipart request into plain fields and uploaded files.

/invert and /cs-recover accept both encodings on one URL (uploads are natural for images and
.npy files; JSON is natural for scripts), so the routes read the body themselves instead of
declaring a FastAPI body model, and validate with the same pydantic models either way.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from app.problems import InvalidInput, Problem, TooLarge, validation_problem
from app.settings import Settings

M = TypeVar("M", bound=BaseModel)

JSON_TYPES = ("application/json",)
MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"
FORMS = (MULTIPART, URLENCODED)


def is_form(request: Request) -> bool:
    """Multipart or URL-encoded: both arrive as form fields (only multipart carries files)."""
    return media_type(request) in FORMS


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(
    request: Request, settings: Settings
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(fields, files) from a JSON object body or a multipart form."""
    ctype = media_type(request)
    if ctype in JSON_TYPES or ctype.endswith("+json"):
        body = await request.body()
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise InvalidInput(f"request body is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise InvalidInput("the JSON body must be an object")
        return data, {}
    if ctype in FORMS:
        try:
            form = await request.form(
                max_files=8, max_fields=64, max_part_size=settings.max_upload_bytes
            )
        except MultiPartException as e:
            raise InvalidInput(f"malformed multipart body: {e}") from None
        fields: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        for key, value in form.multi_items():
            if key in fields or key in files:
                raise InvalidInput(f"form field {key!r} is given more than once", field=key)
            if isinstance(value, UploadFile):
                data = await value.read(settings.max_upload_bytes + 1)
                if len(data) > settings.max_upload_bytes:
                    raise TooLarge(f"upload {key!r} exceeds {settings.max_upload_bytes} bytes")
                files[key] = data
            elif value != "":  # `curl -F steps=` means "not set"
                fields[key] = value
        await form.close()
        return fields, files
    raise Problem(
        415,
        f"unsupported content type {ctype or '(none)'}: send application/json or "
        "multipart/form-data (or application/x-www-form-urlencoded without files)",
    )


def json_field(fields: dict[str, Any], name: str) -> None:
    """Decode a form field that carries JSON (lists, objects) in place."""
    value = fields.get(name)
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            fields[name] = json.loads(value)
        except (ValueError, RecursionError) as e:
            raise InvalidInput(f"form field {name!r} is not valid JSON ({e})", field=name) from None


def validate(model: type[M], data: dict[str, Any]) -> M:
    """pydantic validation with errors reported as a 422 problem."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_problem(e.errors(include_input=False)) from None  # type: ignore[arg-type]
