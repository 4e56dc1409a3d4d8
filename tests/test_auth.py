"""API keys: 401 without a valid key, 403 for a scope too small, 404 for another key's job,
secrets never stored, revocation, and when SURFING_AUTH=auto turns auth on.

The app is the embedded one (SQLite) with auth forced on and a queue that runs nothing, so
every job stays queued and can be read and canceled on cue.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.auth import auth_mode
from app.db import session_factory
from app.main import create_app
from app.models import ApiKey, Job
from app.services import keys
from app.settings import Settings
from tests.helpers import FakeQueue

BODY = {"model_id": "tiny", "image": np.full((1, 28, 28), 0.5).tolist(), "method": "adam"}


def _settings(tmp: Path, models_dir: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = dict(
        database_url=None, redis_url=None, state_dir=tmp, models_dir=models_dir, auth="on",
        torch_threads=1, rate_limit_per_min=0,
    )
    return Settings(**{**base, **kw})


@pytest.fixture(scope="module")
def app_env(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("auth")
    app = create_app(_settings(tmp, models_dir))
    with TestClient(app, raise_server_exceptions=False) as client:
        app.state.queue = FakeQueue()  # jobs stay queued
        made: dict[str, str] = {}
        with app.state.sessions() as s:
            for name, scope in [("alice", "submit"), ("bob", "submit"), ("reader", "read"),
                                ("root", "admin")]:
                made[name] = keys.create_key(s, name, scope)[1]
        yield {"client": client, "app": app, "keys": made, "tmp": tmp}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def problem(r: Any, status: int, *words: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:400])
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status
    for w in words:
        assert w.lower() in body["detail"].lower(), (w, body["detail"])
    return dict(body)


def submit(client: TestClient, key: str, **extra: Any) -> str:
    r = client.post("/invert", json={**BODY, **extra}, headers=auth(key))
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


def test_no_key_is_401_with_how_to_get_one(app_env: dict[str, Any]) -> None:
    c = app_env["client"]
    for r in (
        c.post("/invert", json=BODY),
        c.get("/jobs/00000000-0000-0000-0000-000000000000"),
        c.delete("/jobs/00000000-0000-0000-0000-000000000000"),
        c.get("/models"),
        c.get("/models/tiny"),
        c.get("/measurement-matrix", params={"model_id": "tiny", "m": 3}),
        c.delete("/models/tiny"),
    ):
        problem(r, 401, "surfing keys create", "Authorization: Bearer")
        assert r.headers["www-authenticate"] == "Bearer"
    assert c.get("/healthz").status_code == 200  # operations stay open
    assert c.get("/openapi.json").status_code == 200


def test_wrong_key_is_401(app_env: dict[str, Any]) -> None:
    c, alice = app_env["client"], app_env["keys"]["alice"]
    _, key_id, secret = alice.split("_", 2)
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    for bad in (
        f"sk_{key_id}_{flipped}",  # right id, wrong secret
        f"sk_{'0' * 16}_{secret}",  # unknown id
        "sk_nonsense",  # malformed
        secret,
    ):
        problem(c.get("/models", headers=auth(bad)), 401, "unknown, malformed or revoked")
    problem(c.get("/models", headers={"Authorization": f"Basic {alice}"}), 401)
    assert c.get("/models", headers=auth(alice)).status_code == 200


def test_a_key_sees_and_cancels_only_its_own_jobs(app_env: dict[str, Any]) -> None:
    c, k = app_env["client"], app_env["keys"]
    mine = submit(c, k["alice"])
    for other in (k["bob"], k["reader"]):
        problem(c.get(f"/jobs/{mine}", headers=auth(other)), 404, mine)
        problem(c.get(f"/jobs/{mine}/reconstruction.png", headers=auth(other)), 404)
    problem(c.delete(f"/jobs/{mine}", headers=auth(k["bob"])), 404, mine)
    with app_env["app"].state.sessions() as s:
        row = s.get(Job, mine)
        assert row is not None and row.status == "queued"  # bob's cancel did nothing
        assert row.owner_key_id == k["alice"].split("_")[1]
    got = c.get(f"/jobs/{mine}", headers=auth(k["alice"]))
    assert got.status_code == 200 and got.json()["job_id"] == mine
    assert c.get(f"/jobs/{mine}", headers=auth(k["root"])).status_code == 200  # admin: all
    r = c.delete(f"/jobs/{mine}", headers=auth(k["alice"]))
    assert r.status_code == 200 and r.json()["status"] == "canceled"


def test_scopes(app_env: dict[str, Any]) -> None:
    c, k = app_env["client"], app_env["keys"]
    # read: may read, may not submit or cancel
    assert c.get("/models", headers=auth(k["reader"])).status_code == 200
    problem(c.post("/invert", json=BODY, headers=auth(k["reader"])), 403, "'submit'")
    payload = {"model_id": "tiny", "measurements": [0.1] * 5, "matrix": {"seed": 0, "m": 5}}
    problem(c.post("/cs-recover", json=payload, headers=auth(k["reader"])), 403, "'submit'")
    job = submit(c, k["alice"])
    problem(c.delete(f"/jobs/{job}", headers=auth(k["reader"])), 403, "'submit'")
    # submit: not model management
    tar = {"Content-Type": "application/x-tar"}
    problem(c.post("/models", content=b"x", headers={**auth(k["alice"]), **tar}), 403, "'admin'")
    problem(c.delete("/models/tiny", headers=auth(k["alice"])), 403, "'admin'")
    # admin: gets past the gate (to the upload's own checks, an unknown model's 404)
    problem(c.post("/models", content=b"", headers={**auth(k["root"]), **tar}), 400, "empty")
    problem(c.delete("/models/no-such-model", headers=auth(k["root"])), 404)
    assert c.get("/models/tiny", headers=auth(k["root"])).status_code == 200


def test_keys_are_stored_hashed(app_env: dict[str, Any]) -> None:
    """The database (file and write-ahead log) holds the SHA-256 of each secret, never the
    secret or the whole key."""
    app, made = app_env["app"], app_env["keys"]
    with app.state.sessions() as s:
        rows = {r.id: r for r in s.query(ApiKey)}
    raw = b"".join(p.read_bytes() for p in Path(app_env["tmp"]).glob("surfing.db*"))
    for key in made.values():
        _, key_id, secret = key.split("_", 2)
        assert rows[key_id].secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
        assert secret.encode() not in raw and key.encode() not in raw
        assert key_id.encode() in raw  # the search itself can find what is there


def test_revoked_key_is_401(app_env: dict[str, Any]) -> None:
    c, app = app_env["client"], app_env["app"]
    with app.state.sessions() as s:
        row, key = keys.create_key(s, "temp", "submit")
    job = submit(c, key)
    with app.state.sessions() as s:
        keys.revoke_key(s, row.id)
    problem(c.get(f"/jobs/{job}", headers=auth(key)), 401, "revoked")
    problem(c.post("/invert", json=BODY, headers=auth(key)), 401)


def test_auth_mode_auto() -> None:
    def mode(**kw: Any) -> bool:
        return auth_mode(Settings(**kw))[0]

    embedded = {"database_url": None, "redis_url": None}
    assert not mode(**embedded)  # bound to 127.0.0.1 by default
    assert not mode(**embedded, bind_host="::1") and not mode(**embedded, bind_host="localhost")
    assert mode(**embedded, bind_host="0.0.0.0") and mode(**embedded, bind_host="192.168.1.5")
    assert mode(database_url="postgresql://u@db/s", redis_url="redis://r:6379/0")
    assert mode(database_url="postgresql://u@db/s", redis_url=None)
    assert mode(**embedded, auth="on") and not mode(redis_url="redis://r/0", auth="off")


def test_serving_on_all_interfaces_needs_a_key(
    models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`surfing serve --host 0.0.0.0` in the embedded mode: auth=auto turns on and says how
    to get a key; on loopback it is off and says so."""
    with caplog.at_level(logging.INFO, logger="surfing.auth"):
        local = create_app(_settings(tmp_path / "a", models_dir, auth="auto"))
        exposed = create_app(_settings(tmp_path / "b", models_dir, auth="auto",
                                       bind_host="0.0.0.0"))
    text = caplog.text
    assert "auth is OFF" in text and "loopback address 127.0.0.1" in text
    assert "auth is ON" in text and "'0.0.0.0'" in text and "surfing keys create" in text
    with TestClient(local) as c:
        assert c.get("/models").status_code == 200
    with TestClient(exposed, raise_server_exceptions=False) as c:
        problem(c.get("/models"), 401, "surfing keys create")


def test_keys_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str]) -> None:
    from app.settings import get_settings
    from surfing.cli import main

    monkeypatch.setenv("SURFING_STATE_DIR", str(tmp_path))
    for var in ("DATABASE_URL", "SURFING_DATABASE_URL", "REDIS_URL", "SURFING_REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    get_settings.cache_clear()
    try:
        main(["keys", "create", "--name", "ci bot", "--scope", "read"])
        out = capsys.readouterr().out
        key = next(w for w in out.split() if w.startswith("sk_"))
        sessions = session_factory(f"sqlite:///{tmp_path / 'surfing.db'}")
        with sessions() as s:
            row = keys.verify_key(s, key)
            assert row is not None and row.scope == "read" and row.name == "ci bot"
        main(["keys", "list"])
        listing = capsys.readouterr().out
        assert row.id in listing and "ci bot" in listing and key.split("_")[2] not in listing
        main(["keys", "revoke", row.id])
        assert "revoked" in capsys.readouterr().out
        with sessions() as s:
            assert keys.verify_key(s, key) is None
        with pytest.raises(SystemExit) as e:
            main(["keys", "revoke", "0" * 16])
        assert e.value.code == 2 and "no key" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()
