"""The multipart form of POST /invert and /cs-recover is the JSON body's model: every option the
JSON body takes is a documented form field with the same type, bounds and description, and a
form is validated by the same model (schedule and rescue reach the job; bounds hold alike)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.schemas import CSRecoverRequest, InvertRequest, MatrixSeed
from app.settings import Settings

# Keys whose values must agree between a JSON property and its form field.
SAME = ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
        "minLength", "maxLength", "pattern", "description", "default")  # fmt: skip
UPLOADS = {"image", "measurements", "matrix", "true_image"}  # files in a form, data in JSON


@pytest.fixture(scope="module")
def client(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(
        database_url=None,
        redis_url=None,
        state_dir=tmp_path_factory.mktemp("forms"),
        models_dir=models_dir,
        auth="off",
        torch_threads=1,
    )
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def spec(client: TestClient) -> dict[str, Any]:
    return dict(client.get("/openapi.json").json())


def form_of(spec: dict[str, Any], path: str) -> dict[str, Any]:
    body = spec["paths"][path]["post"]["requestBody"]["content"]
    return dict(body["multipart/form-data"]["schema"])


def non_null(prop: dict[str, Any]) -> list[dict[str, Any]]:
    """The branches of a JSON property a value can take (a form has no null: absent = unset)."""
    return [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]


@pytest.mark.parametrize("path,model", [("/invert", InvertRequest),
                                        ("/cs-recover", CSRecoverRequest)])  # fmt: skip
def test_every_json_option_is_a_form_field_with_the_same_constraints(
    spec: dict[str, Any], path: str, model: type
) -> None:
    json_props = spec["components"]["schemas"][model.__name__]["properties"]
    form = form_of(spec, path)["properties"]
    options = [name for name in model.model_fields if name not in UPLOADS]
    assert {"schedule", "rescue", "callback_url", "model_id", "x_init"} <= set(options)
    for name in options:
        assert name in form, f"{path}: form lacks {name}"
        prop, field = json_props[name], form[name]
        branches = non_null(prop)
        if len(branches) == 1 and branches[0].get("type") not in ("array", "object"):
            expected = {**prop, **branches[0]}
            for key in SAME:
                if key == "default" and expected.get(key) is None:
                    assert "default" not in field, (name, field)
                    continue
                assert field.get(key) == expected.get(key), (path, name, key, field, expected)
        else:  # lists: JSON text in a form field, decoded and validated like the JSON body
            assert field["type"] == "string" and field["contentMediaType"] == "application/json"
            assert field["description"].startswith(prop["description"])
    # the bounds are really there (not two empty schemas agreeing)
    assert form["steps"]["minimum"] == 1 and form["steps"]["maximum"] == 100_000
    assert form["lr"]["exclusiveMinimum"] == 0
    assert form["schedule"]["enum"] == non_null(json_props["schedule"])[0]["enum"]
    assert "lm-stride" in form["schedule"]["enum"] and form["rescue"]["type"] == "boolean"


def test_the_uploads_and_matrix_seed_fields_are_documented(spec: dict[str, Any]) -> None:
    inv, cs = form_of(spec, "/invert"), form_of(spec, "/cs-recover")
    assert set(inv["required"]) == {"model_id", "image"}
    assert inv["properties"]["image"]["format"] == "binary"
    assert set(cs["required"]) == {"model_id", "measurements"}  # or matrix_seed + m
    seed_bounds = MatrixSeed.model_json_schema()["properties"]
    for form_name, name in (("matrix_seed", "seed"), ("m", "m")):
        for key in ("type", "minimum", "maximum"):
            assert cs["properties"][form_name].get(key) == seed_bounds[name].get(key)
    for name in ("measurements", "matrix", "true_image"):
        assert cs["properties"][name]["format"] == "binary"


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float32))
    return buf.getvalue()


def wait(client: TestClient, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        doc = client.get(f"/jobs/{job_id}").json()
        if doc["status"] in ("succeeded", "failed", "canceled") or time.monotonic() > end:
            return dict(doc)
        time.sleep(0.05)


def test_form_schedule_and_rescue_reach_the_job(client: TestClient) -> None:
    image = npy(np.full((1, 28, 28), 0.5))
    r = client.post(
        "/invert",
        data={"model_id": "tiny", "schedule": "paper", "rescue": "false", "steps": "3",
              "final_steps": "4", "seed": "5"},  # fmt: skip
        files={"image": ("t.npy", image)},
    )
    assert r.status_code == 202, r.text
    doc = wait(client, r.json()["job_id"])
    assert doc["status"] == "succeeded", doc
    params = doc["params"]
    assert (params["schedule"], params["rescue"]) == ("paper", False)
    assert (params["steps"], params["final_steps"], params["seed"]) == (3, 4, 5)
    # the paper schedule ran: exactly `steps` Adam steps on every stage (4 checkpoints)
    trace = doc["result"]["trace"]
    assert [t["steps_used"] for t in trace[:-1]] == [3] * (len(trace) - 1), trace
    assert trace[-1]["steps_used"] == 4

    r = client.post(
        "/cs-recover",
        data={"model_id": "tiny", "matrix_seed": "1", "m": "20", "schedule": "lm",
              "rescue": "true", "stride": "2"},  # fmt: skip
        files={"measurements": ("b.npy", npy(np.zeros(20)))},
    )
    assert r.status_code == 202, r.text
    params = wait(client, r.json()["job_id"])["params"]
    assert (params["schedule"], params["rescue"], params["stride"]) == ("lm", True, 2)
    assert params["matrix"] == {"seed": 1, "m": 20}


@pytest.mark.parametrize(
    "fields,word",
    [
        ({"schedule": "paper", "method": "adam"}, "schedule"),  # the model's cross-field rule
        ({"rescue": "maybe"}, "rescue"),
        ({"schedule": "fastest"}, "schedule"),
        ({"steps": "0"}, "steps"),  # the JSON bound, ge=1
        ({"lr": "0"}, "lr"),  # gt=0
        ({"unknown_option": "1"}, "unknown_option"),  # extra="forbid"
    ],
)
def test_form_and_json_refuse_the_same_values(
    client: TestClient, fields: dict[str, str], word: str
) -> None:
    image = npy(np.full((1, 28, 28), 0.5))
    r = client.post("/invert", data={"model_id": "tiny", **fields},
                    files={"image": ("t.npy", image)})  # fmt: skip
    assert r.status_code == 422 and word in r.text, r.text
    body = {k: v for k, v in fields.items()}
    r = client.post("/invert", json={"model_id": "tiny", "image": [[[0.5] * 28] * 28], **body})
    assert r.status_code == 422 and word in r.text, r.text
