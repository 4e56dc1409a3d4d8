"""Bounded time and hostile images, without a full stack (tests/test_faults_db.py has that).

- an unreachable PostgreSQL or Redis is a 503 problem+json with Retry-After, never a 500;
- a frozen PostgreSQL (SIGSTOP) makes calls give up instead of waiting (app.dbwait);
- /healthz touches nothing and runs on the event loop;
- decompression bombs (PNG/JPEG headers declaring 10^8 to 4*10^9 pixels) are a 422.
"""

from __future__ import annotations

import base64
import inspect
import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from PIL import Image

from app.arrays import decode_picture
from app.main import create_app
from app.problems import InvalidInput, dependency_down
from app.settings import Settings
from tests.throwaway import PostgresServer, free_port

# ---- decompression bombs ---------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header (correct CRCs) declaring width x height gray pixels, ~60 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    chunks = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def bomb_jpeg(width: int, height: int) -> bytes:
    """A real 8x8 JPEG whose SOF0 frame header is rewritten to declare width x height."""
    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)  # after marker, length, precision
    return bytes(data)


BOMBS = [
    ("png 10^8", bomb_png(10_000, 10_000)),
    ("png 4*10^8", bomb_png(20_000, 20_000)),
    ("png 4*10^9", bomb_png(65_535, 65_535)),
    ("jpeg 4.2*10^9", bomb_jpeg(65_000, 65_000)),
    ("jpeg 10^8", bomb_jpeg(10_000, 10_000)),
]


@pytest.mark.parametrize("name,data", BOMBS, ids=[b[0] for b in BOMBS])
def test_bomb_headers_are_refused_before_decoding(name: str, data: bytes) -> None:
    with Image.open(io.BytesIO(BOMBS[0][1])) as im:
        assert im.size == (10_000, 10_000)  # the crafted header is what PIL reads
    with pytest.raises(InvalidInput) as err:
        decode_picture(data, "image", [1, 28, 28], [0.0, 1.0], max_pixels=4_000_000)
    assert err.value.status == 422 and "pixels" in err.value.detail


@pytest.fixture
def embedded(tmp_path: Path, models_dir: Path) -> Settings:
    return Settings(
        database_url=None, redis_url=None, state_dir=tmp_path, models_dir=models_dir
    )


def test_bomb_uploads_get_422_not_500(embedded: Settings) -> None:
    with TestClient(create_app(embedded)) as client:
        for name, data in BOMBS:
            r = client.post("/invert", files={"image": ("x", data)}, data={"model_id": "tiny"})
            assert r.status_code == 422, (name, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert "pixels" in r.json()["detail"]
            image = base64.b64encode(data).decode()
            r = client.post("/invert", json={"model_id": "tiny", "image": image})
            assert r.status_code == 422 and "pixels" in r.json()["detail"], (name, r.text)


# ---- dependencies down -----------------------------------------------------------------------


def test_healthz_needs_nothing_and_runs_on_the_event_loop() -> None:
    from app.api.routes import health

    assert inspect.iscoroutinefunction(health.healthz)
    # Nothing listens on these ports: the app still starts answering /healthz.
    settings = Settings(
        database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/none",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        auth="off",
    )
    client = TestClient(create_app(settings))  # no lifespan: it would need the database
    assert client.get("/healthz").json() == {"status": "ok"}


def test_database_down_is_503_with_retry_after(tmp_path: Path, models_dir: Path) -> None:
    settings = Settings(
        database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/none",
        redis_url=None,
        auth="off",
        models_dir=models_dir,
        retry_after_s=7,
    )
    client = TestClient(create_app(settings), raise_server_exceptions=False)
    for method, path, body in (
        ("GET", "/jobs/0123456789abcdef0123456789abcdef", None),
        ("DELETE", "/jobs/0123456789abcdef0123456789abcdef", None),
        ("POST", "/invert", {"model_id": "tiny", "image": np.full((28, 28), 0.5).tolist()}),
    ):
        r = client.request(method, path, json=body)
        assert r.status_code == 503, (path, r.status_code, r.text)
        assert r.headers["retry-after"] == "7"
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["status"] == 503


def test_redis_down_is_bounded(tmp_path: Path, models_dir: Path) -> None:
    """The API's Redis client neither waits long nor retries timeouts (redis-py's default
    retries 10x with backoff); a submit is accepted (outbox) or a 503 with Retry-After."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from app.queue import QueueUnavailable, RQJobQueue

    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'r.db'}",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        auth="off",
        models_dir=models_dir,
        state_dir=tmp_path,
        auto_migrate=True,
    )
    queue = RQJobQueue(settings)
    kwargs = queue.redis.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == settings.redis_socket_timeout_s
    assert kwargs["socket_connect_timeout"] == settings.redis_connect_timeout_s
    retry = queue.redis.get_retry()
    assert retry is not None and retry._retries <= 1
    assert retry._supported_errors == (RedisConnectionError,)
    with pytest.raises(QueueUnavailable):
        queue.ping()
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        image = np.full((28, 28), 0.5).tolist()
        r = client.post("/invert", json={"model_id": "tiny", "image": image})
        assert r.status_code in (202, 503), r.text
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1


def test_frozen_postgres_calls_give_up(tmp_path: Path) -> None:
    """SIGSTOP: the kernel still accepts connections and data, so only the client-side waits
    of app.dbwait end a call; while the server is frozen, calls then fail at once."""
    from app.db import make_engine

    pg = PostgresServer().start()
    try:
        settings = Settings(db_probe_timeout_s=0.5, db_statement_timeout_s=30)
        engine = make_engine(pg.url, settings)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 41 + 1")).scalar() == 42
        pg.freeze()
        try:
            for _ in range(3):  # the pooled connection, then fresh ones
                with pytest.raises(sa.exc.OperationalError) as err:
                    with engine.connect() as conn:
                        conn.execute(sa.text("SELECT 1"))
                assert dependency_down(err.value)
                assert "not answering" in str(err.value) or "within" in str(err.value)
        finally:
            pg.thaw()
        for _ in range(100):  # recovery without a restart (the next probe clears the mark)
            try:
                with engine.connect() as conn:
                    assert conn.execute(sa.text("SELECT 2")).scalar() == 2
                break
            except sa.exc.OperationalError:
                time.sleep(0.1)
        else:
            raise AssertionError("no recovery after thaw")
        engine.dispose()
        # A request's session closes after its response was sent: a server that went away
        # meanwhile must not make close() raise (that reset the client's connection).
        from app.db import dispose_engine, session_factory

        session = session_factory(pg.url)()
        assert session.execute(sa.text("SELECT 3")).scalar() == 3  # a transaction is open
        pg.halt()
        session.close()
        dispose_engine(pg.url)
    finally:
        pg.stop()
