"""Finishing touches on the OpenAPI document: what the handlers can answer on any route.

Error responses are declared centrally (problem+json, Retry-After on 429/503) so the document
stays true as routes change, and model ids carry the pattern the models store enforces, so a
client (or Schemathesis) knows which ids are well-formed. Route-specific descriptions already
declared are kept; only their content type is set.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from app.problems import PROBLEM_JSON

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "description": "RFC 9457 problem details; extra members (field, errors, limit) may follow.",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
    },
    "required": ["type", "title", "status", "detail"],
}
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_RETRY_AFTER = {
    "description": "Seconds to wait before trying again.",
    "schema": {"type": "integer"},
}
# Which errors an operation may answer besides its own: by what it takes.
_ALWAYS = {
    "401": "Missing or unknown API key (auth on).",
    "403": "The API key lacks the scope this needs.",
    "422": "Invalid parameters.",
    "503": "The database or the queue is not answering; repeat after Retry-After.",
}
_WITH_PATH = {"404": "No such resource."}
_WITH_BODY = {
    "400": "Malformed body.",
    "404": "Unknown model.",
    "413": "Body over the size cap.",
    "415": "Unsupported body media type.",
    "429": "Over a quota or rate limit; repeat after Retry-After.",
}
_NO_DEPENDENCIES = {"/healthz", "/metrics"}


def document_problems(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare the problem+json error responses of every operation (app.problems can answer
    them on any route: a dependency down is a 503 anywhere)."""
    schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            if method not in ("get", "put", "post", "delete", "patch") or path in _NO_DEPENDENCIES:
                continue
            extra = dict(_ALWAYS)
            names = {p.get("name") for p in op.get("parameters", [])}
            if "{" in path or "model_id" in names:
                extra.update(_WITH_PATH)
            if "requestBody" in op:
                extra.update(_WITH_BODY)
            responses = op.setdefault("responses", {})
            for code, description in extra.items():
                responses.setdefault(code, {"description": description})
            for code, response in responses.items():
                if code[0] in "45":
                    response["content"] = {PROBLEM_JSON: {"schema": _PROBLEM_REF}}
                    if code in ("429", "503"):
                        response.setdefault("headers", {})["Retry-After"] = _RETRY_AFTER
    return schema


# models_store.validate_model_id: ^[a-z0-9][a-z0-9._-]{0,63}$ without "..", here without a
# look-ahead (every "." is followed by a non-dot, or ends the id).
MODEL_ID = {"type": "string", "pattern": r"^[a-z0-9](?:[a-z0-9_-]|\.[a-z0-9_-])*\.?$",
            "minLength": 1, "maxLength": 64}  # fmt: skip


# app.services.admission.idempotency_key: 1-255 visible ASCII characters.
IDEMPOTENCY_KEY = {"type": "string", "pattern": "^[!-~]{1,255}$"}


def document_model_ids(schema: dict[str, Any]) -> dict[str, Any]:
    """Every `model_id` parameter or property gets the store's id pattern (and the
    Idempotency-Key header the one admission checks)."""

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("name") == "model_id" and "schema" in node:
                node["schema"] = {**node["schema"], **MODEL_ID}
            if node.get("name") == "Idempotency-Key" and node.get("in") == "header":
                node["schema"] = dict(IDEMPOTENCY_KEY)
            props = node.get("properties")
            if isinstance(props, dict) and props.get("model_id", {}).get("type") == "string":
                props["model_id"] = {**props["model_id"], **MODEL_ID}
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


_NULL_TYPE = "null"
_STRUCTURED = ("array", "object")


def form_fields(model: type[BaseModel], rename: dict[str, str] | None = None) -> dict[str, Any]:
    """`model`'s properties as multipart form fields, for the routes that take JSON or a form
    and validate both with the same model: the same types, bounds and descriptions, without
    the null branch (an absent field is unset), lists and objects sent as JSON text."""
    fields: dict[str, Any] = {}
    for name, prop in model.model_json_schema()["properties"].items():
        field = {k: v for k, v in prop.items() if k != "anyOf"}
        if "default" in field and field["default"] is None:
            del field["default"]
        branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != _NULL_TYPE]
        if len(branches) == 1 and branches[0].get("type") not in (None, *_STRUCTURED):
            field.update(branches[0])
        else:
            field.update(type="string", contentMediaType="application/json")
            field["description"] = f"{field.get('description', '')} In a form: as JSON text."
        fields[(rename or {}).get(name, name)] = field
    return fields


def document_bodies(schema: dict[str, Any]) -> dict[str, Any]:
    """Raw bodies without a schema (archives) are binary strings. (Form fields need nothing
    here: the routes generate them from their JSON models with `form_fields`.)"""
    for item in schema.get("paths", {}).values():
        for op in item.values():
            content = op.get("requestBody", {}).get("content", {}) if isinstance(op, dict) else {}
            for media in content.values():
                media.setdefault("schema", {"type": "string", "format": "binary", "minLength": 1})
    return schema


def finish_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    return document_bodies(document_model_ids(document_problems(schema)))
