"""Every bad input gets its 4xx with an RFC 9457 problem body that says what is wrong.

These run on the embedded app (validation happens in the API before anything is queued, so
the backend does not matter) with small caps so the size limits are cheap to hit.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings

N = 784
MAX_UPLOAD = 300_000


@pytest.fixture(scope="module")
def client(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("api-errors")
    settings = Settings(
        database_url=None,
        redis_url=None,
        state_dir=tmp,
        models_dir=models_dir,
        max_upload_bytes=MAX_UPLOAD,
        max_image_pixels=1_000_000,
        max_batch=4,
        torch_threads=1,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def problem(r: Any, status: int, *words: str) -> dict[str, Any]:
    """Assert a problem+json response with `status` whose detail mentions `words`."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"] == "application/problem+json", r.headers
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    for w in words:
        assert w.lower() in body["detail"].lower(), (w, body["detail"])
    return dict(body)


def img(shape: tuple[int, ...] = (1, 28, 28), value: float = 0.5) -> list[Any]:
    return np.full(shape, value).tolist()


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=isinstance(arr, np.ndarray) and arr.dtype == object)
    return buf.getvalue()


def png(size: tuple[int, int], mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def invert(client: TestClient, **body: Any) -> Any:
    return client.post("/invert", json={"model_id": "tiny", "image": img(), **body})


def cs(client: TestClient, **body: Any) -> Any:
    payload = {"model_id": "tiny", "measurements": [0.1] * 10, "matrix": {"seed": 0, "m": 10}}
    payload.update(body)
    return client.post("/cs-recover", json=payload)


# ---- models ----------------------------------------------------------------------------------


def test_unknown_model_is_404(client: TestClient) -> None:
    problem(invert(client, model_id="nope"), 404, "unknown model", "nope")
    problem(cs(client, model_id="nope"), 404, "unknown model")
    problem(client.get("/models/nope"), 404, "unknown model")
    problem(client.get("/measurement-matrix?model_id=nope&m=3"), 404, "unknown model")


def test_invalid_model_id_is_422(client: TestClient) -> None:
    problem(invert(client, model_id="../etc"), 422, "invalid model id")
    problem(client.get("/models/Bad..Id"), 422, "invalid model id")


def test_models_listing(client: TestClient) -> None:
    models = client.get("/models").json()
    assert [m["model_id"] for m in models] == ["tiny"]
    assert models[0]["n_checkpoints"] == 4 and models[0]["n_pixels"] == N
    detail = client.get("/models/tiny").json()
    assert [c["step"] for c in detail["checkpoints"]] == [0, 10, 20, 30]


# ---- images ----------------------------------------------------------------------------------


def test_image_wrong_shape(client: TestClient) -> None:
    problem(invert(client, image=img((1, 27, 28))), 422, "shape [1, 27, 28]", "[1, 28, 28]")
    problem(invert(client, image=[[1.0, 2.0], [3.0]]), 422, "rectangular")
    problem(invert(client, image=[["a"] * 28] * 28), 422, "only numbers")
    problem(invert(client, image=img((5, 1, 28, 28))), 422, "5 targets", "limit")
    r = client.post(
        "/invert",
        data={"model_id": "tiny"},
        files={"image": ("x.npy", npy(np.zeros((3, 3), np.float32)))},
    )
    problem(r, 422, "shape [3, 3]")


def test_image_undecodable(client: TestClient) -> None:
    r = client.post(
        "/invert", data={"model_id": "tiny"}, files={"image": ("x.png", b"hello, not an image")}
    )
    problem(r, 422, "neither png, jpeg nor .npy")
    truncated = png((28, 28))[:40]
    r = client.post("/invert", data={"model_id": "tiny"}, files={"image": ("x.png", truncated)})
    problem(r, 422, "image")
    problem(invert(client, image="%%% not base64 %%%"), 422, "base64")
    problem(invert(client, image=base64.b64encode(b"GIF89a....").decode()), 422, "neither")
    gif = io.BytesIO()
    Image.new("L", (28, 28)).save(gif, format="GIF")
    r = client.post(
        "/invert", data={"model_id": "tiny"}, files={"image": ("x.gif", gif.getvalue())}
    )
    problem(r, 422, "neither png, jpeg nor .npy")


def test_npy_uploads_are_checked_before_loading(client: TestClient) -> None:
    def up(data: bytes) -> Any:
        return client.post("/invert", data={"model_id": "tiny"}, files={"image": ("x.npy", data)})

    problem(up(npy(np.array([{"a": 1}], dtype=object))), 422, "float .npy", "object")
    problem(up(npy(np.zeros((1, 28, 28), np.int64))), 422, "float .npy")
    problem(up(npy(np.zeros((1, 28, 28), np.float32))[:-100]), 422, "truncated")
    problem(up(npy(np.zeros((100, 28, 28), np.float16))), 422, "elements", "limit")
    problem(up(b"\x93NUMPY\x09\x00garbage"), 422, ".npy")


def test_image_too_large(client: TestClient) -> None:
    # A 2000 x 2000 black PNG is a few kB on the wire but 4 M pixels decoded: refused from
    # its header, before any pixel is decompressed.
    bomb = png((2000, 2000))
    assert len(bomb) < 50_000
    r = client.post("/invert", data={"model_id": "tiny"}, files={"image": ("b.png", bomb)})
    problem(r, 422, "2000x2000", "limit")
    b64 = base64.b64encode(bomb).decode()
    problem(invert(client, image=b64), 422, "limit")
    # Over the upload cap: 413 from the Content-Length alone.
    big = np.zeros((1, 28, 28 * 100), np.float32)
    r = client.post("/invert", data={"model_id": "tiny"}, files={"image": ("x.npy", npy(big))})
    problem(r, 413, "upload limit")
    r = client.post(
        "/invert",
        content=b"{" + b" " * MAX_UPLOAD + b"}",
        headers={"content-type": "application/json"},
    )
    problem(r, 413, "upload limit")


def test_picture_is_converted(client: TestClient) -> None:
    # RGB and a different size are fine: converted to the model's 1x28x28 in [0, 1].
    r = client.post(
        "/invert",
        data={"model_id": "tiny", "direct_steps": "1", "method": "adam"},
        files={"image": ("x.png", png((40, 30), "RGB"))},
    )
    assert r.status_code == 202, r.text


def test_nan_and_inf_anywhere(client: TestClient) -> None:
    bad = np.full((1, 28, 28), 0.5)
    bad[0, 3, 4] = np.nan
    body = json.dumps({"model_id": "tiny", "image": bad.tolist()})  # NaN literal in JSON
    r = client.post("/invert", content=body, headers={"content-type": "application/json"})
    problem(r, 422, "nan or inf", "[0, 3, 4]")
    r = client.post(
        "/invert",
        data={"model_id": "tiny"},
        files={"image": ("x.npy", npy(bad.astype(np.float32)))},
    )
    problem(r, 422, "nan or inf")
    big = np.full((1, 28, 28), 1e300)  # finite in float64, Inf once float32
    problem(invert(client, image=big.tolist()), 422, "nan or inf")
    meas = json.dumps(
        {
            "model_id": "tiny",
            "measurements": [0.1] * 9 + [float("inf")],
            "matrix": {"seed": 0, "m": 10},
        }
    )
    r = client.post("/cs-recover", content=meas, headers={"content-type": "application/json"})
    problem(r, 422, "measurements contains nan or inf")
    A = np.zeros((10, N))
    A[2, 5] = np.nan
    body = json.dumps({"model_id": "tiny", "measurements": [0.1] * 10, "matrix": A.tolist()})
    r = client.post("/cs-recover", content=body, headers={"content-type": "application/json"})
    problem(r, 422, "matrix contains nan or inf")
    x0 = json.dumps({"model_id": "tiny", "image": img(), "x_init": [0.0, float("nan")]})
    r = client.post("/invert", content=x0, headers={"content-type": "application/json"})
    problem(r, 422, "x_init")


# ---- compressed sensing ----------------------------------------------------------------------


def test_measurement_length_must_equal_m(client: TestClient) -> None:
    problem(cs(client, measurements=[0.1] * 9), 422, "length 9", "m = 10")
    A = np.zeros((12, N)).tolist()
    problem(cs(client, matrix=A), 422, "length 10", "m = 12")


def test_matrix_shape_must_be_m_by_n(client: TestClient) -> None:
    problem(cs(client, matrix=np.zeros((10, 100)).tolist()), 422, "shape [10, 100]", "n = 784")
    r = client.post(
        "/cs-recover",
        data={"model_id": "tiny", "measurements": json.dumps([0.1] * 10)},
        files={"matrix": ("A.npy", npy(np.zeros((10, 783), np.float32)))},
    )
    problem(r, 422, "shape [10, 783]")
    problem(cs(client, matrix=[1.0, 2.0]), 422, "matrix")


def test_m_out_of_range(client: TestClient) -> None:
    problem(
        cs(client, matrix={"seed": 0, "m": N + 1}, measurements=[0.0] * (N + 1)),
        422,
        "out of range",
        "784",
    )
    problem(cs(client, matrix={"seed": 0, "m": 0}), 422, "matrix.m")
    problem(client.get("/measurement-matrix?model_id=tiny&m=0"), 422, "out of range")
    problem(client.get(f"/measurement-matrix?model_id=tiny&m={N + 1}"), 422, "out of range")
    problem(client.get("/measurement-matrix?model_id=tiny&m=3&seed=-1"), 422, "seed")
    r = client.post("/cs-recover", data={"model_id": "tiny", "measurements": "[1, 2]"})
    problem(r, 422, "matrix_seed and m")


def test_measurement_matrix_endpoint(client: TestClient) -> None:
    js = client.get("/measurement-matrix?model_id=tiny&m=3&seed=5").json()
    assert js["n"] == N and len(js["matrix"]) == 3 and len(js["matrix"][0]) == N
    raw = client.get(
        "/measurement-matrix?model_id=tiny&m=3&seed=5", headers={"accept": "application/x-npy"}
    )
    A = np.load(io.BytesIO(raw.content))
    assert np.array_equal(A, np.asarray(js["matrix"], dtype=np.float32))
    from surfing.measure import gaussian_matrix

    assert np.array_equal(A, gaussian_matrix(5, 3, N).numpy())
    problem(
        client.get("/measurement-matrix?model_id=tiny&m=3", headers={"accept": "text/csv"}),
        406,
        "application/x-npy",
    )


# ---- options and encodings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "word"),
    [
        ({"method": "sgd"}, "method"),
        ({"steps": 0}, "steps"),
        ({"lr": -1}, "lr"),
        ({"lr": 0}, "lr"),
        ({"stride": 0}, "stride"),
        ({"restarts": 0}, "restarts"),
        ({"tol": -1e-3}, "tol"),
        ({"seed": -1}, "seed"),
        ({"final_steps": 10**9}, "final_steps"),
        ({"colour": "red"}, "colour"),
        ({"schedule": "fast"}, "schedule"),
        ({"method": "adam", "schedule": "lm"}, "schedule applies to method 'surf' only"),
        ({"method": "adam", "rescue": False}, "rescue applies to method 'surf' only"),
        ({"rescue": "maybe"}, "rescue"),
        ({"x_init": [0.1, 0.2, 0.3]}, "latent dimension is k = 2"),
        ({"x_init": "zeros"}, "x_init"),
    ],
)
def test_bad_options(client: TestClient, option: dict[str, Any], word: str) -> None:
    problem(invert(client, **option), 422, word)


def test_bad_form_options(client: TestClient) -> None:
    r = client.post(
        "/invert",
        data={"model_id": "tiny", "steps": "many"},
        files={"image": ("x.npy", npy(np.zeros((1, 28, 28), np.float32)))},
    )
    problem(r, 422, "steps")
    r = client.post(
        "/invert",
        data={"model_id": "tiny", "x_init": "[0.1, "},
        files={"image": ("x.npy", npy(np.zeros((1, 28, 28), np.float32)))},
    )
    problem(r, 422, "x_init", "json")
    r = client.post("/invert", data={"model_id": "tiny"})
    problem(r, 422, "image is required")
    r = client.post(
        "/invert",
        data={"model_id": "tiny"},
        files={"image": ("x.npy", b"\x93NUMPY"), "other": ("o", b"1")},
    )
    problem(r, 422, "unexpected upload")


def test_bad_bodies(client: TestClient) -> None:
    js = {"content-type": "application/json"}
    problem(client.post("/invert", content=b"{not json", headers=js), 422, "not valid json")
    problem(client.post("/invert", content=b"[1, 2]", headers=js), 422, "must be an object")
    deep = b"[" * 100_000 + b"]" * 100_000
    problem(client.post("/invert", content=deep, headers=js), 422, "json")
    problem(
        client.post("/invert", content=b"x", headers={"content-type": "text/plain"}),
        415,
        "application/json",
    )
    problem(client.post("/invert", json={"image": img()}), 422, "model_id")
    problem(client.post("/invert", json={"model_id": "tiny"}), 422, "image")
    problem(client.post("/cs-recover", json={"model_id": "tiny"}), 422, "measurements")


def test_unknown_jobs(client: TestClient) -> None:
    problem(client.get("/jobs/not-a-uuid"), 404, "no job")
    problem(client.get("/jobs/00000000-0000-4000-8000-000000000000"), 404, "no job")
    problem(client.delete("/jobs/00000000-0000-4000-8000-000000000000"), 404, "no job")
    problem(client.get("/jobs/00000000-0000-4000-8000-000000000000/reconstruction.png"), 404)
    problem(client.get("/nowhere"), 404)
    problem(client.put("/invert"), 405)


def test_junk_never_500s(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    for i in range(30):
        junk = rng.bytes(int(rng.integers(1, 2000)))
        prefix = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\x93NUMPY\x01\x00"][i % 4]
        r = client.post("/invert", data={"model_id": "tiny"}, files={"image": ("j", prefix + junk)})
        assert 400 <= r.status_code < 500, (i, r.status_code, r.text[:300])
        r = client.post(
            "/invert", content=prefix + junk, headers={"content-type": "application/json"}
        )
        assert 400 <= r.status_code < 500, (i, r.status_code, r.text[:300])


def test_openapi_documents_both_encodings(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/invert"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    assert "InvertRequest" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200
