"""POST /models, DELETE /models/{id} and the samples grid: administrators bring a trajectory
archive (the store's own folder as a tar) and the server installs it only when all of it checks.

Every refused upload must leave the models root exactly as it was: no model folder, no
`.upload-*` work folder, no temp file.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from starlette.requests import ClientDisconnect
from torch import nn

from app.db import upgrade_database
from app.main import create_app
from app.models import Job
from app.problems import Problem, TooLarge
from app.services import model_admin
from app.settings import Settings
from conftest import make_tiny_trajectory, tiny_target
from models_store import ModelStore
from surfing import architectures
from surfing.latents import sample_latents
from surfing.trajectory import final_generator

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-tar"}
FAST = {"steps": 10, "final_steps": 150, "lr": 0.1}
X_STAR = [[-0.29, 0.43]]  # a latent the tiny model's surfing recovers from seed 0


def _settings(tmp: Path, models: Path, **kw: Any) -> Settings:
    # auth off: these tests exercise the no-key admin switch and token (also on PostgreSQL +
    # Redis, where auth would be on); admin-scope keys are tests/test_auth.py's
    base: dict[str, Any] = dict(
        database_url=None, redis_url=None, state_dir=tmp, models_dir=models, auth="off",
        model_admin=True, admin_token=TOKEN, torch_threads=1, progress_interval_s=0.2,
    )
    return Settings(**{**base, **kw})


@contextmanager
def client_for(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model folders to archive (ids up-*): tiny trajectories like conftest's 'tiny'."""
    root = tmp_path_factory.mktemp("sources")
    for model_id in ("up-good", "up-gz", "up-dup", "up-del", "up-bad"):
        make_tiny_trajectory(root, model_id)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("served")


@pytest.fixture(scope="module")
def client(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    # The request cap of the other routes is below an archive's size: it must not apply here.
    settings = _settings(tmp_path_factory.mktemp("state"), models, max_upload_bytes=64 * 1024)
    with client_for(settings) as c:
        yield c


def tar_of(folder: Path, gz: bool = False, edit: Callable[[tarfile.TarFile], None] | None = None,
           files: dict[str, bytes] | None = None, skip: str | None = None) -> bytes:
    """`tar -C folder -cf - .` in Python; `files` replaces or adds members, `skip` leaves one
    out, `edit` adds more."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        tf.add(folder, arcname=".", recursive=False)
        files = files or {}
        for path in sorted(folder.iterdir()):
            if path.name not in files and path.name != skip:
                tf.add(path, arcname=f"./{path.name}")
        for name, data in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if edit is not None:
            edit(tf)
    return buf.getvalue()


def manifest_of(folder: Path, **changes: Any) -> bytes:
    d = json.loads((folder / "manifest.json").read_bytes())
    d.update(changes)
    return json.dumps(d).encode()


def root_state(root: Path) -> list[str]:
    return sorted(os.listdir(root)) if root.exists() else []


def problem(r: Any, status: int, *words: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    for w in words:
        assert w.lower() in body["detail"].lower(), (w, body["detail"])
    return dict(body)


def wait(client: TestClient, job_id: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return dict(job)
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def invert_tiny(client: TestClient, store: ModelStore, model_id: str) -> dict[str, Any]:
    y = tiny_target(store, model_id, torch.tensor(X_STAR)).numpy()
    r = client.post("/invert", json={"model_id": model_id, "image": y[0].tolist(), **FAST})
    assert r.status_code == 202, r.text
    return wait(client, r.json()["job_id"])


# ---- access ----------------------------------------------------------------------------------


def test_admin_endpoints_are_off_by_default(tmp_path: Path, sources: Path) -> None:
    settings = _settings(tmp_path, tmp_path / "m", model_admin=False, admin_token=None)
    with client_for(settings) as c:
        problem(c.post("/models", content=tar_of(sources / "up-good")), 403, "SURFING_MODEL_ADMIN")
        problem(c.delete("/models/up-good"), 403, "SURFING_MODEL_ADMIN")
    assert root_state(tmp_path / "m") == []


def test_a_wrong_or_missing_token_is_401(client: TestClient, models: Path, sources: Path) -> None:
    before = root_state(models)
    body = tar_of(sources / "up-good")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
        r = client.post("/models", content=body, headers=headers)
        problem(r, 401, "Bearer")
        assert r.headers["www-authenticate"] == "Bearer"
    problem(client.delete("/models/up-good", headers={"Authorization": "Bearer x"}), 401)
    assert root_state(models) == before


# ---- a good upload ---------------------------------------------------------------------------


def test_a_good_upload_is_listed_and_inverts(
    client: TestClient, models: Path, sources: Path
) -> None:
    src = sources / "up-good"
    if shutil.which("tar"):  # the command the docs tell users to run
        body = subprocess.run(["tar", "-C", str(src), "-cf", "-", "."], check=True,
                              capture_output=True).stdout
    else:
        body = tar_of(src)
    assert len(body) > client.app.state.settings.max_upload_bytes
    r = client.post("/models", content=body, headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/models/up-good"
    detail = r.json()
    assert detail["model_id"] == "up-good" and detail["n_checkpoints"] == 4
    assert detail["samples_url"] == "/models/up-good/samples.png"
    assert "up-good" in [m["model_id"] for m in client.get("/models").json()]
    for name in os.listdir(src):  # stored byte for byte
        assert (models / "up-good" / name).read_bytes() == (src / name).read_bytes()
    assert [n for n in root_state(models) if n.startswith(".")] == []
    job = invert_tiny(client, ModelStore(models), "up-good")
    assert job["status"] == "succeeded", job
    assert np.allclose(job["result"]["latent"][0], X_STAR[0], atol=1e-3)
    assert job["result"]["pixel_error"][0] < 1e-8
    # The same id again is a conflict, and the installed model is untouched.
    problem(client.post("/models", content=body, headers=AUTH), 409, "already exists")
    assert (models / "up-good" / "manifest.json").read_bytes() == (
        src / "manifest.json").read_bytes()


def test_a_gzipped_upload_works(client: TestClient, models: Path, sources: Path) -> None:
    body = tar_of(sources / "up-gz", gz=True)
    assert gzip.decompress(body)[:512] == tar_of(sources / "up-gz")[:512]  # really gzip
    r = client.post("/models", content=body, headers=AUTH)
    assert r.status_code == 201, r.text
    assert ModelStore(models).manifest("up-gz").checkpoints == ModelStore(sources).manifest(
        "up-gz").checkpoints


# ---- refused uploads leave nothing -----------------------------------------------------------


def _symlink(tf: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("./evil")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tf.addfile(info)


def _traversal(tf: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("../x")
    info.size = 3
    tf.addfile(info, io.BytesIO(b"abc"))


def _flip_byte(folder: Path) -> dict[str, bytes]:
    data = bytearray((folder / "ckpt-000002.safetensors").read_bytes())
    data[-1] ^= 0xFF
    return {"ckpt-000002.safetensors": bytes(data)}


BAD: dict[str, tuple[Callable[[Path], bytes], int, tuple[str, ...]]] = {
    "truncated": (lambda f: tar_of(f)[: len(tar_of(f)) // 2], 400, ("not a complete tar",)),
    "not-a-tar": (lambda f: b"hello world" * 100, 400, ("tar",)),
    "hash-mismatch": (lambda f: tar_of(f, files=_flip_byte(f)), 422,
                      ("ckpt-000002.safetensors", "SHA-256")),
    "manifest-not-json": (lambda f: tar_of(f, files={"manifest.json": b"{nope"}), 422,
                          ("manifest.json", "JSON")),
    "manifest-missing-field": (
        lambda f: tar_of(f, files={"manifest.json": manifest_of(f, latent_dim="two")}), 422,
        ("latent_dim",)),
    "manifest-incomplete": (
        lambda f: tar_of(f, files={"manifest.json": manifest_of(f, complete=False)}), 422,
        ("complete",)),
    "unknown-architecture": (
        lambda f: tar_of(f, files={"manifest.json": manifest_of(
            f, arch={"kind": "mystery-net", "latent_dim": 2})}), 422, ("mystery-net",)),
    "weights-do-not-fit": (
        lambda f: tar_of(f, files={"manifest.json": manifest_of(
            f, arch={"kind": "infogan", "latent_dim": 2, "width": 0.1})}), 422,
        ("checkpoint 0", "fc.0.weight", "[51, 2]", "[102, 2]")),
    "path-traversal": (lambda f: tar_of(f, edit=_traversal), 422, ("../x", "plain file name")),
    "symlink": (lambda f: tar_of(f, edit=_symlink), 422, ("evil", "symbolic link")),
    "extra-member": (lambda f: tar_of(f, files={"notes.txt": b"hi"}), 422,
                     ("notes.txt", "not listed")),
    "missing-member": (lambda f: tar_of(f, skip="ckpt-000003.safetensors"), 422,
                       ("ckpt-000003.safetensors", "missing")),
    "no-manifest": (lambda f: tar_of(f, skip="manifest.json"), 422, ("no manifest.json",)),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_archive_is_refused_and_leaves_nothing(
    case: str, client: TestClient, models: Path, sources: Path
) -> None:
    make, status, words = BAD[case]
    before = root_state(models)
    r = client.post("/models", content=make(sources / "up-bad"), headers=AUTH)
    problem(r, status, *words)
    assert root_state(models) == before
    assert "up-bad" not in [m["model_id"] for m in client.get("/models").json()]


def test_oversize_uploads_are_413_and_leave_nothing(tmp_path: Path, sources: Path) -> None:
    models = tmp_path / "m"
    body = tar_of(sources / "up-bad")
    with client_for(_settings(tmp_path, models, max_model_upload_bytes=len(body) - 1)) as c:
        problem(c.post("/models", content=body, headers=AUTH), 413, "SURFING_MAX_MODEL_UPLOAD")
        chunks = (body[i : i + 4096] for i in range(0, len(body), 4096))  # no Content-Length
        problem(c.post("/models", content=chunks, headers=AUTH), 413, "exceeds")
        # Compressed below the cap, but it unpacks to more than the cap allows.
        zipped = tar_of(sources / "up-bad", gz=True, files={"pad": bytes(len(body))})
        assert len(zipped) < len(body) - 1
        problem(c.post("/models", content=zipped, headers=AUTH), 413, "exceeds")
    assert root_state(models) == []


async def _count_chunks(n: int, size: int, pulled: list[int]) -> Any:
    for _ in range(n):
        pulled.append(1)
        yield b"x" * size


def test_the_cap_is_checked_while_streaming(tmp_path: Path) -> None:
    """The body is refused at the chunk that passes the cap, not after reading all of it."""
    import asyncio

    pulled: list[int] = []
    with pytest.raises(TooLarge):
        asyncio.run(model_admin.save_body(
            _count_chunks(1000, 1024, pulled), tmp_path / "a", 10 * 1024, None))
    assert len(pulled) == 11 and (tmp_path / "a").stat().st_size == 10 * 1024
    with pytest.raises(TooLarge):  # a declared length over the cap: nothing is read
        asyncio.run(model_admin.save_body(
            _count_chunks(1000, 1024, pulled), tmp_path / "b", 10 * 1024, str(10**6)))
    assert len(pulled) == 11


async def _disconnecting() -> Any:
    yield b"x" * 1024
    raise ClientDisconnect


def test_an_interrupted_upload_is_a_400(tmp_path: Path) -> None:
    """(The route's `finally` then removes the work folder, as for every other failure.)"""
    import asyncio

    with pytest.raises(Problem) as err:
        asyncio.run(model_admin.save_body(_disconnecting(), tmp_path / "a", 10**6, None))
    assert err.value.status == 400 and "interrupted" in err.value.detail


def test_openapi_documents_the_archive_body(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/models"]["post"]["requestBody"]["content"]
    assert {"application/x-tar", "application/gzip"} <= set(content)
    assert "samples_url" in spec["components"]["schemas"]["ModelDetail"]["properties"]


def test_stale_upload_folders_are_swept(client: TestClient, models: Path) -> None:
    old, fresh = models / ".upload-old", models / ".upload-fresh"
    for folder in (old, fresh):
        folder.mkdir()
        (folder / ".archive").write_bytes(b"partial")
    hours_ago = time.time() - 2 * model_admin.STALE_UPLOAD_S
    os.utime(old / ".archive", (hours_ago, hours_ago))
    os.utime(old, (hours_ago, hours_ago))
    problem(client.post("/models", content=b"junk", headers=AUTH), 400)  # any upload sweeps
    assert not old.exists() and fresh.exists()  # a live upload may still own the fresh one
    shutil.rmtree(fresh)


# ---- delete ----------------------------------------------------------------------------------


def test_delete_refuses_while_a_job_is_queued(
    client: TestClient, models: Path, sources: Path
) -> None:
    r = client.post("/models", content=tar_of(sources / "up-del"), headers=AUTH)
    assert r.status_code == 201, r.text
    job_id = str(uuid.uuid4())
    with client.app.state.sessions() as s:
        s.add(Job(id=job_id, kind="invert", model_id="up-del", method="surf", params={},
                  n_targets=1, status="queued", max_attempts=1))
        s.commit()
    problem(client.delete("/models/up-del", headers=AUTH), 409, "1 queued or running")
    assert (models / "up-del").is_dir()
    with client.app.state.sessions() as s:
        s.get(Job, job_id).status = "running"
        s.commit()
    problem(client.delete("/models/up-del", headers=AUTH), 409, "queued or running")
    with client.app.state.sessions() as s:
        s.get(Job, job_id).status = "canceled"
        s.commit()
    r = client.delete("/models/up-del", headers=AUTH)
    assert r.status_code == 204 and r.content == b""
    assert not (models / "up-del").exists()
    problem(client.get("/models/up-del"), 404)
    problem(client.delete("/models/up-del", headers=AUTH), 404)
    problem(client.delete("/models/Bad_Id", headers=AUTH), 422, "invalid model id")


# ---- samples ---------------------------------------------------------------------------------


def _tile(grid: np.ndarray, i: int, h: int, w: int) -> np.ndarray:
    pad, cols = model_admin.SAMPLE_PAD, model_admin.SAMPLE_COLUMNS
    r, c = divmod(i, cols)
    top, left = pad + r * (h + pad), pad + c * (w + pad)
    return grid[top : top + h, left : left + w]


def test_samples_png_shows_g_t_on_prior_draws(client: TestClient, models: Path) -> None:
    make_tiny_trajectory(models, "samples-gray")
    detail = client.get("/models/samples-gray").json()
    r = client.get(detail["samples_url"], params={"scale": 1})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(r.content))
    assert im.mode == "L" and im.size == (8 * 30 + 2, 8 * 30 + 2)  # 64 tiles of 28 + 2 pad
    store = ModelStore(models)
    z = sample_latents(64, 2, model_admin.SAMPLE_SEED, "uniform")
    with torch.no_grad():
        want = (final_generator(store, "samples-gray")(z).numpy() * 255).round()
    grid = np.asarray(im, dtype=np.float64)
    for i in (0, 9, 63):
        assert np.abs(_tile(grid, i, 28, 28) - want[i, 0]).max() <= 1
    assert np.ptp(want[:, 0, 14, 14]) > 10  # the draws differ, so the tiles check the latents
    big = Image.open(io.BytesIO(client.get(detail["samples_url"]).content))
    assert big.size == (2 * (8 * 30 + 2),) * 2  # default zoom 2
    assert r.content == client.get(detail["samples_url"], params={"scale": 1}).content  # cached
    problem(client.get("/models/nope/samples.png"), 404)


class _RGB(nn.Module):
    """A 3 x 4 x 4 colour generator registered in-process (an installed package would use an
    entry point)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.fc = nn.Linear(k, 48)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(z)).view(-1, 3, 4, 4)


def test_samples_png_in_colour_with_a_normal_prior(client: TestClient, models: Path) -> None:
    architectures.register("test-rgb", lambda arch: _RGB(int(arch["latent_dim"])), replace=True)
    try:
        torch.manual_seed(3)
        G = _RGB(5)
        with ModelStore(models).create(
            "samples-rgb", arch={"kind": "test-rgb", "latent_dim": 5}, latent_dim=5,
            output_shape=[3, 4, 4], value_range=[-1.0, 1.0], training={}, dataset="x",
            latent_prior="normal",
        ) as w:
            w.add(0, G.state_dict())
        r = client.get("/models/samples-rgb/samples.png", params={"scale": 1, "n": 16})
        assert r.status_code == 200, r.text
        im = Image.open(io.BytesIO(r.content))
        assert im.mode == "RGB" and im.size == (8 * 6 + 2, 2 * 6 + 2)  # 16 tiles of 4 + 2 pad
        z = sample_latents(16, 5, model_admin.SAMPLE_SEED, "normal")
        with torch.no_grad():
            want = ((G(z).numpy() + 1) / 2 * 255).round()
        grid = np.asarray(im, dtype=np.float64)
        for i in (0, 15):
            assert np.abs(_tile(grid, i, 4, 4) - want[i].transpose(1, 2, 0)).max() <= 1
    finally:
        architectures.unregister("test-rgb")


# ---- PostgreSQL + Redis + RQ -----------------------------------------------------------------


def test_an_upload_inverts_on_postgres_redis_rq(
    pg_database: str, redis_url: str, sources: Path, tmp_path: Path
) -> None:
    from test_service_e2e import WorkerProcess, _clean_redis, _test_env

    models = tmp_path / "m"
    queue = f"surfing-test-{uuid.uuid4().hex[:8]}"
    settings = _settings(tmp_path, models, database_url=pg_database, redis_url=redis_url,
                         queue_name=queue, heartbeat_interval_s=0.5, stale_after_s=3.0)
    upgrade_database(pg_database)
    models.mkdir()
    env = {**os.environ, **_test_env(settings), "DATABASE_URL": pg_database, "REDIS_URL": redis_url}
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        with client_for(settings) as c:
            deadline = time.monotonic() + 90
            while c.get("/readyz").status_code != 200:
                assert worker.proc.poll() is None and time.monotonic() < deadline, (
                    (tmp_path / "worker.log").read_text())
                time.sleep(0.2)
            r = c.post("/models", content=tar_of(sources / "up-good", gz=True), headers=AUTH)
            assert r.status_code == 201, r.text
            job = invert_tiny(c, ModelStore(models), "up-good")
            assert job["status"] == "succeeded", (job, (tmp_path / "worker.log").read_text())
            assert np.allclose(job["result"]["latent"][0], X_STAR[0], atol=1e-3)
    finally:
        worker.stop()
        _clean_redis(redis_url, queue, pg_database, [worker.proc.pid])

