"""Invert a held-out digit through the surfing HTTP API: upload it, poll the job, fetch G(x).

    python3 -m surfing_digits.invert --id digits-vae --models-dir data/models --index 0
    python3 -m surfing_digits.invert --id digits-vae --url http://127.0.0.1:8000 --index 0

Without --url the API runs embedded in this process (SQLite and the in-process job runner),
reading the models store at --models-dir; with --url it talks to a running `surfing serve`.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from .data import load_digits_split

TERMINAL = ("succeeded", "failed", "canceled")


class Client(Protocol):
    """What we need of an HTTP client: httpx.Client and FastAPI's TestClient both fit."""

    def get(self, url: str, **kwargs: Any) -> Any: ...

    def post(self, url: str, **kwargs: Any) -> Any: ...


@contextmanager
def embedded_client(models_dir: str | Path, state_dir: str | Path | None = None) -> Iterator[Any]:
    """The API in this process, as `surfing serve` runs it without DATABASE_URL/REDIS_URL."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            models_dir=Path(models_dir),
            state_dir=Path(state_dir or tmp),
            database_url=None,
            redis_url=None,
        )
        with TestClient(create_app(settings)) as client:
            yield client


def to_png(image: np.ndarray) -> bytes:
    """(1, 8, 8) or (8, 8) in [0, 1] -> an 8-bit grayscale PNG, as a user would upload it."""
    pixels = (np.clip(np.asarray(image).reshape(8, 8), 0, 1) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def from_png(data: bytes) -> np.ndarray:
    """An 8-bit grayscale PNG -> (H, W) float in [0, 1]."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float64) / 255.0


def invert(
    client: Client,
    model_id: str,
    image: np.ndarray,
    options: dict[str, Any] | None = None,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """POST /invert with the digit as a PNG upload, then poll GET /jobs/{id} until it ends."""
    fields = {"model_id": model_id, **{k: str(v) for k, v in (options or {}).items()}}
    r = client.post("/invert", data=fields, files={"image": ("digit.png", to_png(image))})
    if r.status_code != 202:
        raise RuntimeError(f"POST /invert answered {r.status_code}: {r.text}")
    location = r.headers["location"]
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(location).json()
        if job["status"] in TERMINAL:
            return dict(job)
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job['job_id']} still {job['status']} after {timeout_s} s")
        time.sleep(0.1)


def reconstruction(client: Client, job: dict[str, Any]) -> np.ndarray:
    """G_T(x) of a finished job, as the API renders it (8-bit PNG), in [0, 1]."""
    r = client.get(job["result"]["reconstruction_url"])
    if r.status_code != 200:
        raise RuntimeError(f"reconstruction answered {r.status_code}: {r.text}")
    return from_png(r.content)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--id", required=True, help="model id (trained by surfing_digits.train)")
    p.add_argument("--models-dir", default="data/models", help="store for the embedded API")
    p.add_argument("--url", help="a running API (default: run it embedded)")
    p.add_argument("--index", type=int, default=0, help="which held-out digit (0..296)")
    p.add_argument("--method", default="surf",
                   help="surf, adam, adam-restarts, hybrid or lm-restarts")
    p.add_argument("--schedule", help="surf schedule, e.g. paper (default: the API's)")
    p.add_argument("--out", help="save target | reconstruction side by side as a PNG here")
    args = p.parse_args(argv)

    train_images, _, test_images, test_labels = load_digits_split()
    target = test_images[args.index, 0].numpy().astype(np.float64)
    if args.url:
        import httpx

        ctx: Any = httpx.Client(base_url=args.url, timeout=60)
    else:
        ctx = embedded_client(args.models_dir)
    with ctx as client:
        options = {"method": args.method}
        if args.schedule:
            options["schedule"] = args.schedule
        job = invert(client, args.id, target, options)
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job['job_id']} {job['status']}: {job['error']}")
        recon = reconstruction(client, job)
    mean = train_images.mean(0)[0].numpy()
    rmse = float(np.sqrt(((recon - target) ** 2).mean()))
    mean_rmse = float(np.sqrt(((mean - target) ** 2).mean()))
    print(
        f"held-out digit {args.index} (label {int(test_labels[args.index])}), job {job['job_id']}"
    )
    print(f"latent x: {np.round(job['result']['latent'][0], 3).tolist()}")
    print(f"RMSE of G_T(x) to the digit: {rmse:.4f}   (mean training digit: {mean_rmse:.4f})")
    if args.out:
        side = np.concatenate([target, np.ones((8, 1)), recon], axis=1)
        pixels = (np.clip(side, 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((17 * 16, 8 * 16), Image.NEAREST).save(args.out)
        print(f"wrote {args.out} (left: digit, right: reconstruction)")


if __name__ == "__main__":
    main()
