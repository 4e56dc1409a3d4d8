"""surfing.client and `surfing submit` against a live server, plus the wire logic on stubs.

The live server is the embedded API (SQLite + in-process runner, auth on with created keys)
under uvicorn in a background thread on a free loopback port, serving the tiny trajectory.
Retry/Retry-After, idempotency keys, the SSE parser and stream reconnection run against
httpx.MockTransport stubs, where each answer is scripted.
"""

from __future__ import annotations

import email.utils
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from app.main import create_app
from app.services import keys
from app.settings import Settings
from models_store import ModelStore
from surfing.cli import main as cli_main
from surfing.client import (
    Client,
    Conflict,
    Forbidden,
    InvalidInput,
    JobFailed,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from surfing.client_wire import decode_png, encode_image, parse_sse, retry_after
from surfing.measure import gaussian_matrix
from surfing.trajectory import final_generator
from tests.conftest import tiny_target
from tests.throwaway import free_port

FAST = {"steps": 10, "final_steps": 150, "lr": 0.1}  # converges on the tiny model in < 1 s
X_STAR = [[-0.29, 0.43]]  # a latent the tiny model's surfing recovers from seed 0
HALF_LEVEL = 1 / 510 + 1e-6  # a PNG pixel is within half an 8-bit level of the float


@pytest.fixture(scope="module")
def live(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("client")
    settings = Settings(
        database_url=None, redis_url=None, state_dir=tmp, models_dir=models_dir, auth="on",
        torch_threads=1, rate_limit_per_min=0, progress_interval_s=0.1,
        heartbeat_interval_s=0.5,
    )
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    for _ in range(300):  # bounded: 30 s
        if server.started:
            break
        assert thread.is_alive(), "uvicorn exited during start-up"
        time.sleep(0.1)
    assert server.started, "uvicorn did not start"
    with app.state.sessions() as s:
        made = {name: keys.create_key(s, name, scope)[1]
                for name, scope in [("alice", "submit"), ("reader", "read")]}
    store = ModelStore(models_dir)
    y = tiny_target(store, "tiny", torch.tensor(X_STAR)).numpy()  # (1, 1, 28, 28)
    url = f"http://127.0.0.1:{port}"
    paths = httpx.get(f"{url}/openapi.json", timeout=10).json()["paths"]
    try:
        yield {"url": url, "keys": made, "store": store, "y": y, "tmp": tmp,
               "has_events": "/jobs/{job_id}/events" in paths}
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture
def client(live: dict[str, Any]) -> Iterator[Client]:
    with Client(live["url"], api_key=live["keys"]["alice"], timeout=30) as c:
        yield c


def _G(live: dict[str, Any], latent: np.ndarray) -> np.ndarray:
    G = final_generator(live["store"], "tiny")
    with torch.no_grad():
        return G(torch.from_numpy(np.asarray(latent, dtype=np.float32))).numpy()


def _check_events(live: dict[str, Any], events: list[tuple[str, dict[str, Any]]]) -> None:
    """The stream when the server has one (snapshot first, end last, stages never going back
    within a pass), else the polled documents."""
    kinds = [k for k, _ in events]
    if live["has_events"]:
        assert kinds[0] == "snapshot" and kinds[-1] == "end", kinds
        seen: dict[Any, int] = {}
        for kind, data in events:
            if kind == "progress" and data.get("stage") is not None:
                key = data.get("pass_index")
                assert data["stage"] >= seen.get(key, 0), events
                seen[key] = data["stage"]
    else:
        assert set(kinds) == {"poll"} and events[-1][1]["status"] == "succeeded", kinds


# ---- live server ----------------------------------------------------------------------------


def test_invert_wait_result_match_the_job_and_the_model(
    live: dict[str, Any], client: Client
) -> None:
    y = live["y"]
    job_id = client.invert(y[0], model="tiny", method="surf", **FAST)
    events: list[tuple[str, dict[str, Any]]] = []
    doc = client.wait(job_id, progress=True, timeout=120,
                      on_event=lambda k, d: events.append((k, d)))
    assert doc["status"] == "succeeded", doc
    _check_events(live, events)
    res = client.result(job_id)
    assert res.latent.shape == (1, 2) and res.reconstruction is not None
    assert res.reconstruction.shape == (1, 1, 28, 28)
    np.testing.assert_array_equal(res.latent, np.asarray(doc["result"]["latent"], np.float32))
    recon = _G(live, res.latent)
    assert np.abs(res.reconstruction - recon).max() <= HALF_LEVEL
    objective = 0.5 * ((recon - y) ** 2).reshape(1, -1).sum(1)
    np.testing.assert_allclose(res.objective, objective, rtol=1e-3, atol=1e-7)
    assert res.pixel_error is not None
    np.testing.assert_allclose(res.pixel_error, 2 * objective / y[0].size, rtol=1e-3, atol=1e-9)
    assert res.pixel_error[0] < 1e-4  # surfing found x* (the target lies on G_T's range)
    assert res.evals == doc["result"]["evals"] > 0


def test_cs_recover_with_a_seeded_matrix(live: dict[str, Any], client: Client) -> None:
    y = live["y"]
    seed, m = 3, 60
    A = gaussian_matrix(seed, m, y[0].size).numpy()
    b = y.reshape(1, -1) @ A.T  # (1, m)
    job_id = client.cs_recover(b, model="tiny", seed=seed, m=m, true_image=y[0], **FAST)
    doc = client.wait(job_id, progress=False, timeout=120)
    assert doc["status"] == "succeeded", doc
    assert doc["kind"] == "cs" and doc["params"]["matrix"] == {"seed": seed, "m": m}
    res = client.result(job_id)
    recon = _G(live, res.latent).reshape(1, -1)
    residual = recon @ A.T - b
    np.testing.assert_allclose(res.objective, 0.5 * (residual**2).sum(1), rtol=1e-3, atol=1e-7)
    assert res.measurement_residual is not None and res.pixel_error is not None
    np.testing.assert_allclose(res.measurement_residual, (residual**2).sum(1) / m,
                               rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(res.pixel_error, ((recon - y.reshape(1, -1)) ** 2).mean(1),
                               rtol=1e-3, atol=1e-9)


def test_cancel_a_running_job(live: dict[str, Any], client: Client) -> None:
    long_job = {"method": "adam", "direct_steps": 1_000_000, "lr": 1e-6}
    job_id = client.invert(live["y"][0], model="tiny", **long_job)
    for _ in range(600):  # bounded: 60 s
        if client.job(job_id)["status"] == "running":
            break
        time.sleep(0.1)
    assert client.job(job_id)["status"] == "running"
    assert client.cancel(job_id)["status"] == "canceled"
    assert client.wait(job_id, progress=False, timeout=30)["status"] == "canceled"
    with pytest.raises(JobFailed) as failed:
        client.result(job_id)
    assert failed.value.job["status"] == "canceled"
    with pytest.raises(Conflict) as again:
        client.cancel(job_id)
    assert again.value.status == 409 and "already canceled" in again.value.detail


def test_errors_carry_the_servers_problem(live: dict[str, Any], client: Client) -> None:
    with pytest.raises(NotFound) as nf:
        client.invert(live["y"][0], model="nope")
    assert nf.value.status == 404 and nf.value.problem["model_id"] == "nope"
    assert "unknown model 'nope'" in nf.value.detail and "GET /models" in nf.value.detail
    with pytest.raises(NotFound):
        client.job("00000000-0000-0000-0000-000000000000")
    with pytest.raises(InvalidInput) as bad:
        client.invert(live["y"][0], model="tiny", steps=0)
    assert bad.value.status == 422 and "steps" in bad.value.detail
    with Client(live["url"], api_key="sk_0000000000000000_wrong") as wrong:
        with pytest.raises(Unauthorized) as unauth:
            wrong.models()
    assert unauth.value.status == 401 and "revoked" in unauth.value.detail
    with Client(live["url"], api_key=live["keys"]["reader"]) as reader:
        assert [m["model_id"] for m in reader.models()] == ["tiny"]
        with pytest.raises(Forbidden):
            reader.invert(live["y"][0], model="tiny")


def test_idempotency_key_replays_the_first_job(live: dict[str, Any], client: Client) -> None:
    quick = {"method": "adam", "direct_steps": 5}
    first = client.invert(live["y"][0], model="tiny", idempotency_key="client-test-1", **quick)
    again = client.invert(live["y"][0], model="tiny", idempotency_key="client-test-1", **quick)
    assert again == first
    with pytest.raises(InvalidInput) as reused:  # same key, another body
        client.invert(live["y"][0], model="tiny", idempotency_key="client-test-1",
                      method="adam", direct_steps=6)
    assert "Idempotency-Key" in reused.value.detail
    assert client.wait(first, progress=False, timeout=60)["status"] == "succeeded"


def test_submit_cli_writes_the_reconstruction(
    live: dict[str, Any], client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "target.png"
    Image.fromarray((live["y"][0, 0] * 255).round().astype(np.uint8)).save(png)
    out = tmp_path / "out" / "recon.png"
    common = ["--server", live["url"], "--api-key", live["keys"]["alice"], "--model", "tiny",
              "--steps", "10", "--final-steps", "150", "--lr", "0.1", "--timeout", "120"]
    cli_main(["submit", str(png), *common, "--out", str(out)])
    report = json.loads(capsys.readouterr().out)
    assert out.read_bytes() == client.reconstruction_png(report["job_id"])
    recon = decode_png(out.read_bytes(), [1, 28, 28], [0.0, 1.0])
    latent = np.asarray([report["latent"]], np.float32)
    assert recon is not None and np.abs(recon - _G(live, latent)[0]).max() <= HALF_LEVEL
    assert report["pixel_error"] < 1e-3  # vs the 8-bit PNG the server was sent

    cli_main(["submit", str(png), *common, "--measurements", "50", "--seed", "7", "--quiet",
              "--out", str(tmp_path / "cs.png")])
    report = json.loads(capsys.readouterr().out)
    job = client.job(report["job_id"])
    assert job["kind"] == "cs" and job["params"]["matrix"] == {"seed": 7, "m": 50}
    assert report["measurement_residual"] is not None and (tmp_path / "cs.png").stat().st_size

    with pytest.raises(SystemExit) as exit_:
        cli_main(["submit", str(png), *["nope" if a == "tiny" else a for a in common]])
    assert exit_.value.code == 1 and "unknown model 'nope'" in capsys.readouterr().err


# ---- stubs: retries, idempotency, the event stream -------------------------------------------


def _stub(handler: Any, sleeps: list[float], **kw: Any) -> Client:
    return Client("http://stub", transport=httpx.MockTransport(handler), sleep=sleeps.append,
                  **kw)


def _problem(status: int, detail: str, **headers: str) -> httpx.Response:
    body = {"type": "about:blank", "title": "T", "status": status, "detail": detail}
    return httpx.Response(status, json=body, headers=headers)


def test_retries_honour_retry_after_with_one_idempotency_key() -> None:
    answers = [_problem(503, "db down", **{"Retry-After": "2"}),
               _problem(429, "slow down", **{"Retry-After": "1"}),
               httpx.Response(202, json={"job_id": "j1", "status": "queued", "links": {}})]
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers[len(seen) - 1]

    sleeps: list[float] = []
    with _stub(handler, sleeps) as c:
        assert c.invert(np.zeros((1, 28, 28)), model="tiny", steps=3) == "j1"
    assert sleeps == [2.0, 1.0]
    assert len({r.headers["Idempotency-Key"] for r in seen}) == 1
    bodies = {r.content.replace(r.headers["content-type"].split("boundary=")[1].encode(), b"B")
              for r in seen}
    assert len(bodies) == 1  # the same request each time (only the multipart boundary differs)


def test_retries_are_bounded() -> None:
    calls: list[int] = []

    def always(status: int, after: str) -> Any:
        def handler(request: httpx.Request) -> httpx.Response:
            calls.append(status)
            return _problem(status, f"busy {status}", **{"Retry-After": after})
        return handler

    sleeps: list[float] = []
    with _stub(always(503, "1"), sleeps, retries=3) as c, pytest.raises(Unavailable) as e:
        c.models()
    assert calls == [503] * 4 and sleeps == [1.0] * 3 and e.value.detail == "busy 503"
    calls.clear()
    sleeps.clear()
    with _stub(always(429, "1000"), sleeps, retry_budget=60) as c, pytest.raises(RateLimited) as r:
        c.models()  # the server asks for more than the budget: give up at once
    assert calls == [429] and sleeps == [] and r.value.retry_after == 1000
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    after = retry_after(httpx.Response(503, headers={"Retry-After": future}))
    assert after is not None and 20 < after <= 31


def _sse(*events: tuple[str, int, dict[str, Any]], drop: bool = False) -> Iterator[bytes]:
    yield b": keep-alive\r\n\r\n"
    for name, eid, data in events:  # multi-line data (joined with newlines: still JSON)
        lines = "".join(f"data: {line}\n" for line in json.dumps(data, indent=1).split("\n"))
        yield f"event: {name}\nid: {eid}\n{lines}\n".encode()
    if drop:
        raise httpx.ReadError("connection reset")


def _doc(status: str, stage: int | None = None, **extra: Any) -> dict[str, Any]:
    progress = None if stage is None else {"pass": "surf", "pass_index": 0, "stage": stage,
                                           "stages": 3}
    return {"job_id": "J", "status": status, "progress": progress, **extra}


def test_wait_follows_the_stream_and_reconnects_with_last_event_id() -> None:
    connects: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/jobs/J/events"
        connects.append(request.headers.get("last-event-id"))
        if len(connects) == 1:
            body = _sse(("snapshot", 1, _doc("running", 1)),
                        ("progress", 2, {"pass": "surf", "pass_index": 0, "stage": 2,
                                         "stages": 3, "objective": 0.5}), drop=True)
        elif len(connects) == 2:
            body = _sse(("snapshot", 3, _doc("running", 3)), ("timeout", 4, {}))
        else:
            body = _sse(("snapshot", 5, _doc("running", 3)),
                        ("progress", 6, {"pass": "rescue", "pass_index": 1, "pass_round": 1,
                                         "stage": 1, "stages": 2, "objective": 0.1}),
                        ("status", 7, {"status": "succeeded", "attempt": 1}),
                        ("end", 8, _doc("succeeded", None, result={"latent": [[0.1, 0.2]]})))
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    events: list[tuple[str, dict[str, Any]]] = []
    sleeps: list[float] = []
    with _stub(handler, sleeps) as c:
        doc = c.wait("J", progress=True, timeout=30, on_event=lambda k, d: events.append((k, d)))
    assert doc["status"] == "succeeded" and doc["result"]["latent"] == [[0.1, 0.2]]
    assert connects == [None, "2", "4"]  # resumed after the last event each stream delivered
    assert [k for k, _ in events] == ["snapshot", "progress", "snapshot", "snapshot",
                                      "progress", "status", "end"]
    assert events[1][1]["objective"] == 0.5 and sleeps == []


def test_wait_polls_a_server_without_the_stream() -> None:
    # the first GET /jobs/J only checks that the job exists (the events route answered 404)
    docs = iter([_doc("queued"), _doc("queued"), _doc("running", 2), _doc("succeeded", 3)])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return _problem(404, "Not Found")
        if request.url.path == "/jobs/J":
            return httpx.Response(200, json=next(docs))
        return _problem(404, f"no job {request.url.path[6:]!r}")

    events: list[tuple[str, dict[str, Any]]] = []
    sleeps: list[float] = []
    with _stub(handler, sleeps) as c:
        doc = c.wait("J", progress=False, timeout=30, on_event=lambda k, d: events.append((k, d)))
        assert doc["status"] == "succeeded"
        assert [d["status"] for _, d in events] == ["queued", "running", "succeeded"]
        with pytest.raises(NotFound):  # an unknown job is not mistaken for a missing route
            c.wait("K", progress=False, timeout=5)
    assert len(sleeps) == 2


def test_wire_encodings_and_sse_parser(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).random((1, 28, 28)).astype(np.float32)
    name, data, _ = encode_image(arr)
    assert name.endswith(".npy")
    np.testing.assert_array_equal(np.load(io.BytesIO(data), allow_pickle=False), arr)
    im = Image.fromarray((arr[0] * 255).astype(np.uint8))
    png = encode_image(im)[1]
    (tmp_path / "t.png").write_bytes(png)
    assert encode_image(tmp_path / "t.png")[1] == encode_image(png)[1] == png
    decoded = decode_png(png, [1, 28, 28], [-1.0, 1.0])
    assert decoded is not None
    np.testing.assert_allclose(decoded, -1 + 2 * np.floor(arr * 255) / 255, atol=1e-6)
    assert decode_png(png, [4, 14, 14], [0.0, 1.0]) is None  # 4 channels: not recoverable
    lines = [": ping", "event: a", "id: 1", "data: x", "data:  y", "", "", "data: z", "",
             "event: timeout", ""]
    got = [(e.event, e.id, e.data) for e in parse_sse(iter(lines))]
    assert got == [("a", "1", "x\n y"), ("message", None, "z"), ("timeout", None, "")]
