"""The page's server side without a browser: the HTML and its assets, offline /docs and
/redoc, the latent .npy route, and the /ui/api helpers (target PNG, example images,
b = A·y, recent jobs) with their access rules. tests/test_browser.py drives the page itself.
"""

from __future__ import annotations

import gzip
import io
import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import tomllib
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.services import keys
from app.settings import Settings
from app.web import STATIC_DIR, TEMPLATES_DIR
from app.web.examples import examples_for
from surfing.measure import gaussian_matrix

REPO = Path(__file__).resolve().parents[1]
FAST = {"steps": 10, "final_steps": 150, "lr": 0.1}
UUID = "0f8fad5b-d9cb-469f-a165-70867728950e"


def _settings(tmp: Path, models_dir: Path, **kw: Any) -> Settings:
    return Settings(database_url=None, redis_url=None, state_dir=tmp, models_dir=models_dir,
                    torch_threads=1, rate_limit_per_min=0, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def client(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app = create_app(_settings(tmp_path_factory.mktemp("web"), models_dir, auth="off"))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def pixels_of(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def wait_done(c: TestClient, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        job = c.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return dict(job)
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


# ---- the page ---------------------------------------------------------------------------------


def test_page_and_its_assets_are_served_locally(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "http://" not in r.text and "https://" not in r.text  # nothing from a CDN
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', r.text)
    assert {"/static/app.css", "/static/api.js", "/static/app.js"} <= set(assets)
    for path in assets:
        a = client.get(path)
        assert a.status_code == 200 and a.content == (STATIC_DIR / path[8:]).read_bytes()
    page = client.get(f"/ui/jobs/{UUID.upper()}")
    assert page.status_code == 200 and f'data-job-id="{UUID}"' in page.text
    assert client.get("/ui/jobs/not-a-uuid").status_code == 404
    assert client.get('/ui/jobs/"><script>').status_code == 404


def test_the_page_offers_every_schedule_and_names_the_default(client: TestClient) -> None:
    """The page's form is static HTML: its schedule choices must be the API's (app.schemas
    Schedule = surfing.solvers.SCHEDULES), the empty one the server's default."""
    from typing import get_args

    from app.schemas import Schedule
    from surfing.solvers import DEFAULT_SCHEDULE, SCHEDULES

    page = client.get("/").text
    select = re.search(r'<select id="schedule"[^>]*>(.*?)</select>', page, re.S)
    assert select is not None
    options = re.findall(r"<option( value=\"[^\"]*\")?>([^<]*)</option>", select.group(1))
    assert options[0] == (' value=""', f"{DEFAULT_SCHEDULE} (default)")
    named = [label for value, label in options[1:] if not value]
    assert sorted([DEFAULT_SCHEDULE, *named]) == sorted(get_args(Schedule)) == sorted(SCHEDULES)
    schema = client.get("/openapi.json").json()["components"]["schemas"]["InvertRequest"]
    enum = next(a["enum"] for a in schema["properties"]["schedule"]["anyOf"] if "enum" in a)
    assert set(enum) == set(SCHEDULES) and "portfolio" in enum


def test_docs_and_redoc_use_installed_assets(client: TestClient) -> None:
    for path, assets in [("/docs", ["swagger-ui-bundle.js", "swagger-ui.css"]),
                         ("/redoc", ["redoc.standalone.js"])]:
        html = client.get(path).text
        assert "https://" not in html and "http://" not in html, path
        for name in assets:
            assert f"/static/docs/{name}" in html
            r = client.get(f"/static/docs/{name}")
            assert r.status_code == 200 and len(r.content) > 100_000, name
    assert client.get("/docs/oauth2-redirect").status_code == 404  # not offered: keys only


def test_page_files_are_package_data() -> None:
    """A non-editable install ships every file the page needs (pyproject package-data)."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = data["tool"]["setuptools"]["package-data"]["app.web"]
    web = STATIC_DIR.parent
    files = [p for d in (STATIC_DIR, TEMPLATES_DIR) for p in d.iterdir() if p.is_file()]
    assert len(files) >= 6
    for f in files:
        assert any(f.relative_to(web).match(g) for g in globs), f


# ---- results of a job -------------------------------------------------------------------------


def test_latent_npy_and_target_png_of_a_finished_job(client: TestClient) -> None:
    rng = np.random.default_rng(3)
    picture = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    r = client.post("/invert", data={"model_id": "tiny", **FAST},
                    files={"image": ("t.png", png_bytes(picture), "image/png")})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    job = wait_done(client, job_id)
    assert job["status"] == "succeeded", job
    latent = client.get(f"/jobs/{job_id}/latent.npy")
    assert latent.status_code == 200 and latent.headers["content-type"] == "application/x-npy"
    x = np.load(io.BytesIO(latent.content), allow_pickle=False)
    assert x.dtype == np.float32 and x.shape == (1, 2)
    np.testing.assert_array_equal(x, np.asarray(job["result"]["latent"], dtype=np.float32))
    # the target as the solver saw it renders back to the uploaded 8-bit picture
    target = client.get(f"/ui/api/jobs/{job_id}/target.png")
    assert target.status_code == 200
    np.testing.assert_array_equal(pixels_of(target.content), picture)
    assert client.get(f"/ui/api/jobs/{job_id}/target.png?index=1").status_code == 422
    assert client.get(f"/jobs/{UUID}/latent.npy").status_code == 404


def test_latent_npy_before_the_result_is_409(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.helpers import FakeQueue

    app = create_app(_settings(tmp_path_factory.mktemp("web-queued"), models_dir, auth="off"))
    with TestClient(app, raise_server_exceptions=False) as c:
        app.state.queue = FakeQueue()
        r = c.post("/invert", json={"model_id": "tiny", "image": np.zeros((28, 28)).tolist()})
        job_id = r.json()["job_id"]
        answer = c.get(f"/jobs/{job_id}/latent.npy")
        assert answer.status_code == 409 and "queued" in answer.json()["detail"]


def test_measure_is_the_seeded_matrix_times_the_converted_picture(client: TestClient) -> None:
    picture = np.random.default_rng(5).integers(0, 256, (28, 28), dtype=np.uint8)
    r = client.post("/ui/api/measure", data={"model_id": "tiny", "m": "50", "seed": "9"},
                    files={"image": ("t.png", png_bytes(picture), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    y = picture.astype(np.float32).reshape(-1) / np.float32(255)
    expected = gaussian_matrix(9, 50, 784).numpy() @ y
    assert (body["m"], body["n"], body["seed"]) == (50, 784, 9)
    np.testing.assert_allclose(body["measurements"], expected, rtol=1e-5, atol=1e-5)
    bad = client.post("/ui/api/measure", data={"model_id": "tiny", "m": "785"},
                      files={"image": ("t.png", png_bytes(picture), "image/png")})
    assert bad.status_code == 422 and "785" in bad.json()["detail"]
    assert client.post("/ui/api/measure", data={"model_id": "tiny", "m": "5"}).status_code == 422


# ---- example images ---------------------------------------------------------------------------


def _idx(path: Path, arr: np.ndarray, code: int) -> None:
    header = struct.pack(">I", code) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def test_fashion_mnist_examples_one_per_class_from_the_test_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = np.array([9, 2, 1, 1, 6, 1, 4, 6, 5, 7, 4, 5, 7, 3, 4, 1, 2, 4, 8, 0] + [0] * 10)
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 0x803)
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, 0x801)
    monkeypatch.setenv("SURFING_DATA_DIR", str(tmp_path))
    got = examples_for(SimpleNamespace(dataset="fashion-mnist"), tmp_path / "models")
    assert [e.label for e in got][:3] == ["T-shirt", "trouser", "pullover"] and len(got) == 10
    for cls, example in enumerate(got):
        first = int(np.flatnonzero(labels == cls)[0])
        np.testing.assert_array_equal(pixels_of(example.png), images[first])


def test_digits_examples_are_held_out(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    held = digits.images[-297:]
    got = examples_for(SimpleNamespace(dataset="sklearn-digits"), tmp_path)
    assert [e.label for e in got] == [f"digit {d}" for d in range(10)]
    first_three = int(np.flatnonzero(digits.target[-297:] == 3)[0])
    expected = np.round(held[first_three] / 16 * 255).astype(np.uint8)
    np.testing.assert_array_equal(pixels_of(got[3].png), expected)


def test_npy_examples_come_from_test_npy_beside_the_store(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    (tmp_path / "crops").mkdir()
    np.save(tmp_path / "crops" / "test.npy", arr)
    got = examples_for(SimpleNamespace(dataset="npy:crops/train"), tmp_path / "models")
    assert len(got) == 10
    np.testing.assert_array_equal(pixels_of(got[4].png), arr[4])
    for dataset in ("npy:../crops/train", "npy:crops/test", "folder:crops", "synthetic"):
        assert examples_for(SimpleNamespace(dataset=dataset), tmp_path / "models") == ()


def test_example_routes(client: TestClient) -> None:
    assert client.get("/ui/api/models/tiny/examples").json() == []  # synthetic: none
    assert client.get("/ui/api/models/tiny/examples/0.png").status_code == 404
    assert client.get("/ui/api/models/nope/examples").status_code == 404


# ---- access -----------------------------------------------------------------------------------


def test_helpers_follow_the_api_key_rules(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    app = create_app(_settings(tmp_path_factory.mktemp("web-auth"), models_dir, auth="on"))
    with TestClient(app, raise_server_exceptions=False) as c:
        with app.state.sessions() as s:
            alice, bob = (keys.create_key(s, n, "submit")[1] for n in ("alice", "bob"))
            reader = keys.create_key(s, "reader", "read")[1]

        def h(key: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {key}"}

        assert c.get("/").status_code == 200  # the page itself carries no data
        assert c.get("/docs").status_code == 200
        assert c.get("/ui/api/jobs").status_code == 401
        body = {"model_id": "tiny", "image": np.zeros((28, 28)).tolist(), **FAST}
        made = [c.post("/invert", json=body, headers=h(k)).json()["job_id"]
                for k in (alice, bob, alice)]
        mine = [j["job_id"] for j in c.get("/ui/api/jobs", headers=h(alice)).json()]
        assert mine == [made[2], made[0]]  # own jobs only, newest first
        assert c.get("/ui/api/jobs?limit=1", headers=h(bob)).json()[0]["job_id"] == made[1]
        assert c.get(f"/ui/api/jobs/{made[0]}/target.png", headers=h(bob)).status_code == 404
        assert c.get(f"/ui/api/jobs/{made[0]}/target.png", headers=h(alice)).status_code == 200
        assert c.get(f"/jobs/{made[0]}/latent.npy", headers=h(bob)).status_code == 404
        files = {"image": ("t.png", png_bytes(np.zeros((28, 28), np.uint8)), "image/png")}
        form = {"model_id": "tiny", "m": "3"}
        assert c.post("/ui/api/measure", data=form, files=files, headers=h(reader)).status_code \
            == 403
        assert c.post("/ui/api/measure", data=form, files=files, headers=h(bob)).status_code \
            == 200
