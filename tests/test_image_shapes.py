"""Images of any declared C x H x W through /invert, /cs-recover, the reconstruction PNG and
the CLI; and a worker that lacks a model's architecture (or whose checkpoint misfits it)
fails the job with a message naming it.

The models use a tiny architecture registered by this module ("test-image": Linear + view to
C x H x W + sigmoid or tanh), so they are neither of the built-ins: the embedded runner works
in this process and sees the registration.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from app.arrays import decode_picture
from app.db import session_factory, upgrade_database
from app.main import create_app
from app.models import Job
from app.schemas import SolveOptions
from app.services.jobs import create_invert_job
from app.settings import Settings
from models_store import ModelStore
from surfing import architectures
from surfing.cli import main
from surfing.images import load_image
from surfing.measure import gaussian_matrix
from surfing.trajectory import final_generator
from tests.helpers import FakeQueue
from worker import jobs as wj

ARCH = "test-image"
TERMINAL = ("succeeded", "failed", "canceled")


class TinyImageNet(nn.Module):
    """x -> act(W x + c) viewed as C x H x W: injective in x, so a fitted latent is x*."""

    def __init__(self, latent_dim: int, shape: list[int], act: str) -> None:
        super().__init__()
        self.shape, self.act = tuple(int(s) for s in shape), act
        self.fc = nn.Linear(latent_dim, math.prod(self.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        y = torch.tanh(y) if self.act == "tanh" else torch.sigmoid(y)
        return y.view(-1, *self.shape)


def _factory(arch: dict[str, Any]) -> nn.Module:
    return TinyImageNet(int(arch["latent_dim"]), list(arch["shape"]), str(arch["act"]))


def _write(
    store: ModelStore,
    model_id: str,
    arch: dict[str, Any],
    shape: list[int],
    value_range: list[float],
    nets: list[dict[str, torch.Tensor]],
    prior: str = "uniform",
) -> None:
    with store.create(
        model_id,
        arch=arch,
        latent_dim=int(arch["latent_dim"]),
        output_shape=shape,
        value_range=value_range,
        training={"method": "synthetic"},
        dataset="synthetic",
        latent_prior=prior,
        overwrite=True,
    ) as w:
        for i, tensors in enumerate(nets):
            w.add(10 * i, tensors)


def _path(k: int, shape: list[int], act: str, seed: int, n: int = 3) -> list[dict[str, Any]]:
    """theta_t from a small random net to one whose output depends visibly on x."""
    torch.manual_seed(seed)
    net = TinyImageNet(k, shape, act)
    start = {name: t.detach().clone() * 0.1 for name, t in net.state_dict().items()}
    end = {name: torch.randn(t.shape) * 1.5 for name, t in net.state_dict().items()}
    return [
        {name: start[name] + (end[name] - start[name]) * i / (n - 1) for name in start}
        for i in range(n)
    ]


GRAY = {"kind": ARCH, "latent_dim": 2, "shape": [1, 8, 8], "act": "sigmoid"}
RGB = {"kind": ARCH, "latent_dim": 3, "shape": [3, 16, 16], "act": "tanh"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    architectures.register(ARCH, _factory)
    try:
        path = tmp_path_factory.mktemp("image-models")
        store = ModelStore(path)
        _write(store, "gray8", GRAY, [1, 8, 8], [0.0, 1.0], _path(2, [1, 8, 8], "sigmoid", 0))
        _write(
            store,
            "rgb16",
            RGB,
            [3, 16, 16],
            [-1.0, 1.0],
            _path(3, [3, 16, 16], "tanh", 1),
            "normal",
        )
        relu = {"kind": "relu", "latent_dim": 2, "hidden": [8], "out_dim": 12}
        vec = architectures.build_generator(relu).state_dict()
        _write(store, "vec", relu, [12], [0.0, 1.0], [vec, vec])
        alien = {**GRAY, "kind": "not-installed"}
        _write(store, "alien", alien, [1, 8, 8], [0.0, 1.0], _path(2, [1, 8, 8], "sigmoid", 0))
        # the manifest says k = 2, the checkpoints were recorded from a k = 3 network
        _write(store, "misfit", GRAY, [1, 8, 8], [0.0, 1.0], _path(3, [1, 8, 8], "sigmoid", 2))
        yield path
    finally:
        architectures.unregister(ARCH)


@pytest.fixture(scope="module")
def client(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(
        database_url=None,
        redis_url=None,
        state_dir=tmp_path_factory.mktemp("image-state"),
        models_dir=root,
        progress_interval_s=0.2,
        heartbeat_interval_s=0.5,
        max_attempts=2,
        torch_threads=1,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def png(pixels: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) uint8 -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float32), allow_pickle=False)
    return buf.getvalue()


def to_pixels(image: torch.Tensor, value_range: list[float]) -> np.ndarray:
    """(C, H, W) in the model's range -> uint8 (H, W) or (H, W, 3), as a PNG holds it."""
    lo, hi = value_range
    unit = ((image - lo) / (hi - lo)).clamp(0, 1).numpy()
    pixels = (unit * 255).round().astype(np.uint8)
    return pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)


def target(root: Path, model_id: str, x_star: list[float]) -> torch.Tensor:
    with torch.no_grad():
        return final_generator(ModelStore(root), model_id)(torch.tensor([x_star]))[0]


def problem(r: Any, status: int, *words: str) -> str:
    assert r.status_code == status, (r.status_code, r.text[:500])
    detail = str(r.json()["detail"])
    for w in words:
        assert w.lower() in detail.lower(), (w, detail)
    return detail


def wait(client: TestClient, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            return dict(job)
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def submit(client: TestClient, path: str, **kwargs: Any) -> str:
    r = client.post(path, **kwargs)
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


# ---- decoding pictures for a model's shape ------------------------------------------------


def test_pictures_are_converted_to_the_models_channels_size_and_range() -> None:
    # 40 wide, 20 high: left half red, right half blue (a swapped H/W or RGB order shows)
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20, 0] = 255
    pixels[:, 20:, 2] = 255
    rgb = decode_picture(png(pixels), "image", [3, 16, 16], [-1.0, 1.0], 10_000)
    assert rgb.shape == (1, 3, 16, 16)
    assert rgb[0, :, 5, 0].tolist() == [1.0, -1.0, -1.0]  # red, in [-1, 1]
    assert rgb[0, :, 5, 15].tolist() == [-1.0, -1.0, 1.0]  # blue
    gray = decode_picture(png(pixels), "image", [1, 8, 8], [0.0, 1.0], 10_000)
    assert gray.shape == (1, 1, 8, 8)
    assert abs(gray[0, 0, 3, 0] - 0.299) < 3e-3 and abs(gray[0, 0, 3, 7] - 0.114) < 3e-3
    # a grayscale picture for a colour model fills all three channels
    flat = decode_picture(png(np.full((9, 9), 51, np.uint8)), "im", [3, 8, 8], [0.0, 1.0], 10_000)
    assert np.allclose(flat, 0.2)
    # 16-bit grayscale keeps its depth
    deep = Image.fromarray(np.full((8, 8), 30000, np.uint16))
    buf = io.BytesIO()
    deep.save(buf, format="PNG")
    wide = decode_picture(buf.getvalue(), "im", [1, 8, 8], [0.0, 1.0], 10_000)
    assert np.allclose(wide, 30000 / 65535)


def test_load_image_for_the_cli_reads_colour_and_gray(tmp_path: Path) -> None:
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20, 1] = 255  # left green
    Image.fromarray(pixels).save(tmp_path / "g.png")
    rgb = load_image(tmp_path / "g.png", [3, 10, 12])
    assert rgb.shape == (3, 10, 12) and rgb.dtype == torch.float32
    assert rgb[:, 4, 0].tolist() == [0.0, 1.0, 0.0] and rgb[:, 4, 11].tolist() == [0.0] * 3
    gray = load_image(tmp_path / "g.png", [1, 5, 6])
    assert gray.shape == (1, 5, 6) and abs(float(gray[0, 2, 0]) - 150 / 255) < 2e-3
    with pytest.raises(ValueError, match="not a 1- or 3-channel image"):
        load_image(tmp_path / "g.png", [12])


# ---- through the API -----------------------------------------------------------------------


def test_shapes_that_do_not_fit_are_refused_with_both_shapes(client: TestClient) -> None:
    picture = png(np.zeros((8, 8), np.uint8))
    r = client.post("/invert", data={"model_id": "vec"}, files={"image": ("a.png", picture)})
    problem(r, 422, "[12]", "not a 1- or 3-channel picture", ".npy")
    r = client.post(
        "/invert", data={"model_id": "rgb16"}, files={"image": ("a.npy", npy(np.zeros((1, 8, 8))))}
    )
    problem(r, 422, "[1, 8, 8]", "[3, 16, 16]")
    r = client.post(
        "/invert",
        data={"model_id": "rgb16"},
        files={"image": ("a.npy", npy(np.zeros((16, 16, 3))))},
    )
    problem(r, 422, "[16, 16, 3]", "[3, 16, 16]", "channels go first")
    measurements = [0.0] * 10
    r = client.post(
        "/cs-recover",
        json={
            "model_id": "rgb16",
            "measurements": measurements,
            "matrix": {"seed": 0, "m": 10},
            "true_image": np.zeros((1, 16, 16)).tolist(),
        },
    )
    problem(r, 422, "true_image", "[1, 16, 16]", "[3, 16, 16]")


@pytest.mark.parametrize(
    ("model_id", "x_star", "mode"),
    [("gray8", [0.4, -0.3], "L"), ("rgb16", [0.2, -0.5, 0.7], "RGB")],
)
def test_invert_a_png_and_get_the_reconstruction_png(
    client: TestClient, root: Path, model_id: str, x_star: list[float], mode: str
) -> None:
    vr = ModelStore(root).manifest(model_id).value_range
    y = target(root, model_id, x_star)
    sent = to_pixels(y, vr)
    job_id = submit(
        client,
        "/invert",
        data={"model_id": model_id, "method": "surf"},
        files={"image": ("t.png", png(sent))},
    )
    job = wait(client, job_id)
    assert job["status"] == "succeeded", job
    latent = np.array(job["result"]["latent"][0])
    assert np.linalg.norm(latent - np.array(x_star)) < 0.05, latent  # 8-bit rounding aside
    r = client.get(f"/jobs/{job_id}/reconstruction.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    back = Image.open(io.BytesIO(r.content))
    assert back.mode == mode and back.size == (y.shape[2], y.shape[1])
    diff = np.abs(np.asarray(back).astype(int) - sent.astype(int))
    assert diff.max() <= 3, diff.max()


def test_cs_recover_a_colour_image_with_its_true_image_as_png(
    client: TestClient, root: Path
) -> None:
    x_star = [-0.6, 0.1, 0.5]
    y = target(root, "rgb16", x_star)
    n = y.numel()
    m = n // 4
    b = gaussian_matrix(3, m, n) @ y.flatten()
    job_id = submit(
        client,
        "/cs-recover",
        data={"model_id": "rgb16", "matrix_seed": "3", "m": str(m)},
        files={
            "measurements": ("b.npy", npy(b.numpy())),
            "true_image": ("t.png", png(to_pixels(y, [-1.0, 1.0]))),
        },
    )
    job = wait(client, job_id)
    assert job["status"] == "succeeded", job
    assert job["params"]["output_shape"] == [3, 16, 16] and job["params"]["m"] == m
    assert job["result"]["pixel_error"][0] < 1e-4  # against the 8-bit true image
    assert np.linalg.norm(np.array(job["result"]["latent"][0]) - np.array(x_star)) < 1e-3
    back = Image.open(io.BytesIO(client.get(f"/jobs/{job_id}/reconstruction.png").content))
    assert back.mode == "RGB" and back.size == (16, 16)


# ---- a worker without the architecture, a checkpoint that misfits ----------------------------


def test_a_worker_without_the_architecture_fails_the_job_naming_it(client: TestClient) -> None:
    # the API may accept it (workers can have more packages installed); the listing still works
    ids = [m["model_id"] for m in client.get("/models").json()]
    assert "alien" in ids
    assert client.get("/models/alien").json()["arch"]["kind"] == "not-installed"
    job_id = submit(
        client, "/invert", json={"model_id": "alien", "image": np.zeros((1, 8, 8)).tolist()}
    )
    job = wait(client, job_id)
    assert job["status"] == "failed" and job["attempt"] == 1, job
    error = job["error"]
    assert error.startswith("unknown generator architecture 'not-installed'"), error
    assert ARCH in error and "infogan" in error  # what this process has
    assert "Traceback" not in error


def test_the_refusal_is_permanent_not_a_crash(root: Path, tmp_path: Path) -> None:
    """run_job records the failure and returns (no exception for RQ to log as a crash); the
    failed row is not claimable again, so no attempt repeats it."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'r.db'}",
        redis_url=None,
        state_dir=tmp_path,
        models_dir=root,
        max_attempts=3,
        torch_threads=1,
    )
    upgrade_database(settings.sqlalchemy_url)
    sessions = session_factory(settings.sqlalchemy_url)
    with sessions() as s:
        job = create_invert_job(
            s,
            ModelStore(root),
            settings,
            FakeQueue(),
            "alien",
            SolveOptions(),
            np.zeros((1, 8, 8)).tolist(),
            "test",
        )
        job_id = job.id
    out = wj.run_job(job_id, settings)
    assert "not-installed" in out["failed"]
    assert wj.run_job(job_id, settings) == {"job_id": job_id, "skipped": True}
    with sessions() as s:
        row = s.get(Job, job_id)
        assert row is not None and row.status == "failed" and row.attempt == 1


def test_a_checkpoint_that_misfits_the_architecture_fails_with_both_shapes(
    client: TestClient,
) -> None:
    job_id = submit(
        client, "/invert", json={"model_id": "misfit", "image": np.zeros((1, 8, 8)).tolist()}
    )
    job = wait(client, job_id)
    assert job["status"] == "failed" and job["attempt"] == 1, job
    assert "'fc.weight'" in job["error"] and "[64, 3]" in job["error"], job["error"]
    assert "[64, 2]" in job["error"] and "Traceback" not in job["error"]


# ---- the CLI -------------------------------------------------------------------------------


def test_cli_inverts_a_colour_png(root: Path, tmp_path: Path, capsys: Any) -> None:
    x_star = [0.3, 0.3, -0.4]
    sent = to_pixels(target(root, "rgb16", x_star), [-1.0, 1.0])
    Image.fromarray(sent).save(tmp_path / "t.png")
    out = tmp_path / "recon.png"
    main(
        [
            "--models-dir",
            str(root),
            "invert",
            str(tmp_path / "t.png"),
            "--model",
            "rgb16",
            "--out",
            str(out),
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert report["pixel_error"] < 1e-4  # 8-bit rounding of the [-1, 1] target aside
    assert np.linalg.norm(np.array(report["latent"]) - np.array(x_star)) < 0.05
    back = Image.open(out)
    assert back.mode == "RGB" and back.size == (16, 16)
    assert np.abs(np.asarray(back).astype(int) - sent.astype(int)).max() <= 3


def test_cli_inverts_a_npy_and_refuses_a_picture_for_a_vector_model(
    root: Path, tmp_path: Path, capsys: Any
) -> None:
    x_star = [-0.2, 0.6]
    y = target(root, "gray8", x_star)
    np.save(tmp_path / "t.npy", y.numpy())
    main(["--models-dir", str(root), "invert", str(tmp_path / "t.npy"), "--model", "gray8"])
    report = json.loads(capsys.readouterr().out)
    assert report["pixel_error"] < 1e-8 and report["reconstruction"].endswith(".recon.png")
    assert np.allclose(report["latent"], x_star, atol=1e-3)
    assert Image.open(report["reconstruction"]).size == (8, 8)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "v.png")
    with pytest.raises(SystemExit) as exc:
        main(["--models-dir", str(root), "invert", str(tmp_path / "v.png"), "--model", "vec"])
    assert exc.value.code == 2 and "not a 1- or 3-channel image" in capsys.readouterr().err
    np.save(tmp_path / "w.npy", np.zeros((3, 8, 8), np.float32))
    with pytest.raises(SystemExit):
        main(["--models-dir", str(root), "invert", str(tmp_path / "w.npy"), "--model", "gray8"])
    err = capsys.readouterr().err
    assert "[3, 8, 8]" in err and "[1, 8, 8]" in err
