"""Shared fixtures for the service tests: tiny trajectories, PostgreSQL and Redis.

PostgreSQL and Redis are tried on 127.0.0.1 first (override with SURFING_TEST_PG_URL, an admin
URL whose server we may create databases on, and SURFING_TEST_REDIS_URL). When they refuse us
(a fresh Debian PostgreSQL does not trust 127.0.0.1), the tests start throwaway servers of their
own (tests/throwaway.py). Only when that fails too are the tests that need them skipped, or
failed under SURFING_REQUIRE_SERVICES=1 (CI).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from app.db import normalize_url, session_factory, upgrade_database
from app.settings import Settings
from models_store import ModelStore
from tests.helpers import FakeQueue
from tests.throwaway import PostgresServer, RedisServer

PG_ADMIN_URL = normalize_url(
    os.environ.get("SURFING_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
)
REDIS_URL = os.environ.get("SURFING_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TINY_ARCH = {"kind": "infogan", "width": 0.05}


def make_tiny_trajectory(
    store_root: str | os.PathLike[str],
    model_id: str,
    k: int = 2,
    n_ckpt: int = 4,
    seed: int = 0,
) -> ModelStore:
    """A tiny InfoGAN-style trajectory (~16 k parameters) without any training.

    Checkpoint i holds (1 - t_i) * theta_0 + t_i * theta_T, t_i = i / (n_ckpt - 1), where
    theta_0 is the generator's own (DCGAN) initialisation and theta_T re-draws the weights with
    a larger spread so that G_T depends visibly on the latent. That is a smooth path from a
    nearly flat surface to a wavy one, like a real training run, in milliseconds.
    """
    from surfing.architectures import build_generator

    arch = {**TINY_ARCH, "latent_dim": k}
    torch.manual_seed(seed)
    start = build_generator(arch).state_dict()
    final_net = build_generator(arch)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in final_net.named_parameters():
            if name.endswith("weight") and p.dim() > 1:
                fan_in = p.shape[1] if p.dim() == 2 else p.shape[0] * p.shape[2] * p.shape[3]
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    final = final_net.state_dict()
    store = ModelStore(store_root)
    with store.create(
        model_id,
        arch=arch,
        latent_dim=k,
        output_shape=[1, 28, 28],
        value_range=[0.0, 1.0],
        training={"method": "synthetic", "every": 10, "seed": seed},
        dataset="synthetic",
        overwrite=True,
    ) as writer:
        for i in range(n_ckpt):
            t = i / max(n_ckpt - 1, 1)
            tensors = {
                name: (1 - t) * start[name] + t * final[name]
                if start[name].is_floating_point()
                else final[name]
                for name in start
            }
            writer.add(i * 10, tag_checkpoint(tensors, i))
    return store


def tag_checkpoint(tensors: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Write i into every batch-norm `num_batches_tracked`: an eval-mode network never reads
    it, so G's output is unchanged, and a test can see which checkpoint a module holds."""
    return {
        name: torch.tensor(i, dtype=t.dtype) if name.endswith("num_batches_tracked") else t
        for name, t in tensors.items()
    }


def checkpoint_tag(G: torch.nn.Module) -> int:
    """The index `tag_checkpoint` wrote into G's weights (-1 if G has no batch norm)."""
    for name, t in G.named_buffers():
        if name.endswith("num_batches_tracked"):
            return int(t)
    return -1


def tiny_target(store: ModelStore, model_id: str, x_star: torch.Tensor) -> torch.Tensor:
    """y = G_T(x*) for a batch of latents, shape (B, 1, 28, 28)."""
    from surfing.trajectory import final_generator

    G = final_generator(store, model_id)
    with torch.no_grad():
        return G(x_star)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding model 'tiny' (k = 2, 4 checkpoints)."""
    root = tmp_path_factory.mktemp("models")
    make_tiny_trajectory(root, "tiny")
    return root


def _unavailable(what: str, why: object) -> None:
    msg = f"{what} not reachable ({why})"
    if os.environ.get("SURFING_REQUIRE_SERVICES") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def _pg_usable(url: str) -> Exception | None:
    """None if we can log in to `url` and create databases there, else why not."""
    import sqlalchemy as sa

    engine = sa.create_engine(
        url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 3}
    )
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            can = conn.execute(
                sa.text("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user")
            ).scalar()
        return None if can else PermissionError("the test role may not create databases")
    except Exception as e:
        return e
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """Admin URL of a PostgreSQL server we may create databases on: the configured one
    (SURFING_TEST_PG_URL, default 127.0.0.1:5432) if it lets us in, else a throwaway cluster of
    our own (initdb in a temp folder, trust auth, free loopback port), removed at the end."""
    why = _pg_usable(PG_ADMIN_URL)
    if why is None:
        yield PG_ADMIN_URL
        return
    try:
        server = PostgresServer().start()
    except Exception as e:
        _unavailable("PostgreSQL", f"{why}; no throwaway cluster either: {e}")
    try:
        yield server.url
    finally:
        server.stop()


def create_pg_database(admin_url: str) -> str:
    """A fresh, empty database surfing_test_<random>; returns its URL."""
    import sqlalchemy as sa

    name = f"surfing_test_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return str(sa.engine.make_url(admin_url).set(database=name).render_as_string(False))


def drop_pg_database(admin_url: str, url: str) -> None:
    import sqlalchemy as sa

    from app.db import dispose_engine

    dispose_engine(url)
    name = sa.engine.make_url(url).database
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture
def pg_database(pg_server: str) -> Iterator[str]:
    """A fresh empty PostgreSQL database for one test, dropped afterwards."""
    url = create_pg_database(pg_server)
    try:
        yield url
    finally:
        drop_pg_database(pg_server, url)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The configured Redis (SURFING_TEST_REDIS_URL) if it answers, else a throwaway one."""
    from redis import Redis

    try:
        Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2).ping()
        yield REDIS_URL
        return
    except Exception as e:
        why = e
    try:
        server = RedisServer().start()
    except Exception as e:
        _unavailable("Redis", f"{why}; no throwaway server either: {e}")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def env(tmp_path: Path, models_dir: Path) -> dict[str, Any]:
    """A SQLite job database and a queue that records enqueues but runs nothing: tests call
    the job function and the reaper themselves, so every transition happens on cue."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'r.db'}",
        redis_url=None,
        state_dir=tmp_path,
        models_dir=models_dir,
        stale_after_s=2.0,
        heartbeat_interval_s=0.5,
        progress_interval_s=0.1,
        max_attempts=2,
        torch_threads=1,
    )
    upgrade_database(settings.sqlalchemy_url)
    return {
        "settings": settings,
        "sessions": session_factory(settings.sqlalchemy_url),
        "queue": FakeQueue(),
        "store": ModelStore(models_dir),
    }
