"""Deployment files: docker-compose.yml validates and wires the services as documented; the
Dockerfile installs pinned CPU torch first. (No docker engine needed: `docker-compose config`
only parses and interpolates.)"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = shutil.which("docker-compose")


def compose(*args: str, password: str | None = "test-secret", tmp: Path) -> Any:
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"}
    if password is not None:
        env["POSTGRES_PASSWORD"] = password
    empty_env_file = tmp / "empty.env"  # ignore a developer's .env
    empty_env_file.write_text("")
    assert COMPOSE is not None
    return subprocess.run(
        [COMPOSE, "--env-file", str(empty_env_file), "-f", str(REPO / "docker-compose.yml"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose binary not installed")
def test_compose_config(tmp_path: Path) -> None:
    r = compose("config", tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    services = cfg["services"]
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services)
    # compose v1 lists profiled services in `config`, compose v2 only the active ones.
    assert set(services) - {"postgres", "redis", "migrate", "api", "worker"} <= {"worker-gpu"}
    if "worker-gpu" in services:
        assert services["worker-gpu"]["profiles"] == ["gpu"]
    assert services["postgres"]["healthcheck"]["test"]
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        svc = services[name]
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert svc["environment"]["DATABASE_URL"].startswith("postgresql://surfing:test-secret@")
        assert svc["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert any("/data/models" in str(v) for v in svc["volumes"])
    assert services["worker"]["command"] == ["python", "-m", "worker"]
    assert "models" in cfg["volumes"]

    gpu = compose("--profile", "gpu", "config", tmp=tmp_path)
    assert gpu.returncode == 0, gpu.stderr
    worker_gpu = yaml.safe_load(gpu.stdout)["services"]["worker-gpu"]
    devices = worker_gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert worker_gpu["environment"]["SURFING_DEVICE"] == "cuda"
    assert "cu" in worker_gpu["build"]["args"]["TORCH_INDEX_URL"].rsplit("/", 1)[-1]

    # The database password is a secret: it comes from the environment or nothing starts.
    unset = compose("config", password=None, tmp=tmp_path)
    assert unset.returncode != 0 and "POSTGRES_PASSWORD" in unset.stderr


def test_dockerfile_pins_cpu_torch_first() -> None:
    text = (REPO / "Dockerfile").read_text()
    runs = [line for line in text.splitlines() if line.startswith("RUN ")]
    assert 'pip install "torch==${TORCH_VERSION}"' in runs[0]
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert any("pip install -e ." in r for r in runs[1:])
    for path in ("alembic.ini", "migrations", "app", "worker", "surfing", "models_store"):
        assert f"COPY {path} " in text or f"COPY {path}\n" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"data", ".git", ".env"} <= set(ignored)
