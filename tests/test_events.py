"""Live progress: passes whose stage counters never go back (worker.progress), the event
stream GET /jobs/{id}/events (app.services.events) and the preview PNG.

The tracker tests record every progress row the worker writes (the jobs run on cue, as in
tests/test_coalesce.py). The stream tests run the embedded app (SQLite, in-process runner,
auth on) on a loopback uvicorn and read the stream with httpx, as a browser would.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from app.main import create_app
from app.models import Job
from app.schemas import SolveOptions
from app.services import keys
from app.services.jobs import create_invert_job, progress_view
from app.settings import Settings
from models_store import ModelStore
from surfing.latents import sample_latents
from surfing.trajectory import final_generator
from worker import jobs as wj
from worker import progress as wp

FLAT = np.full((1, 28, 28), 0.5).tolist()  # off the tiny model's range: surf rescues it
LONG = {"method": "adam", "direct_steps": 1_000_000, "lr": 1e-9}  # runs until canceled
PASS_KEYS = {"pass", "pass_index", "pass_round", "stage", "stages", "step", "objective",
             "updated_at"}  # fmt: skip


# ---- the tracker: what the worker writes -----------------------------------------------------


def _recorded(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, image: Any = FLAT, **options: Any
) -> list[dict]:
    """Run one job on `image` (every progress write kept: interval 0) and return its written
    rows."""
    rows: list[dict[str, Any]] = []
    real = wp.touch

    def spy(sessions: Any, members: Any, by_job: dict[str, dict[str, Any]]) -> None:
        rows.extend(dict(r) for r in by_job.values())
        real(sessions, members, by_job)

    monkeypatch.setattr(wp, "touch", spy)
    opts = SolveOptions.model_validate(options)
    with env["sessions"]() as s:
        job_id = create_invert_job(
            s, env["store"], env["settings"], env["queue"], "tiny", opts, image, "test"
        ).id
    settings = env["settings"].model_copy(update={"progress_interval_s": 0.0})
    wj.run_job(job_id, settings)
    with env["sessions"]() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "succeeded", job and job.error
        view = {"progress": progress_view(job)}
    rows.append({"final": view["progress"]})
    return rows


def _passes(rows: list[dict[str, Any]]) -> list[tuple[str, int | None, int]]:
    """Check the progress semantics on every write; return the passes (name, round, stages)."""
    progress = [r for r in rows if "pass_name" in r]
    assert progress, "no progress was written"
    seen: dict[int, tuple[str, int | None, int]] = {}
    last_index, last_stage, last_step = -1, 0, None
    for r in progress:
        index = r["pass_index"]
        assert index >= last_index, "pass_index went back"
        if index != last_index:
            assert index == last_index + 1, "a pass was skipped"
            last_stage, last_step = 0, None
            seen[index] = (r["pass_name"], r["pass_round"], r["pass_stages"])
        assert (r["pass_name"], r["pass_round"], r["pass_stages"]) == seen[index]
        assert 1 <= r["pass_stage"] <= r["pass_stages"]
        assert r["pass_stage"] >= last_stage, f"stage went back in pass {seen[index]}"
        if r["pass_step"] is not None and last_step is not None:
            assert r["pass_step"] >= last_step
        last_index, last_stage, last_step = index, r["pass_stage"], r["pass_step"]
        assert r["stages"] == progress[0]["stages"], "the job's stages grew mid-run"
    return [seen[i] for i in range(len(seen))]


def test_a_rescue_is_its_own_pass_and_no_counter_goes_back(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = _recorded(env, monkeypatch, method="surf", schedule="lm", steps=3, final_steps=6)
    n = len(env["store"].manifest("tiny").checkpoints)
    assert _passes(rows) == [("surf", None, n), ("rescue", 1, n)]
    steps = [c.step for c in env["store"].manifest("tiny").checkpoints]
    for name in ("surf", "rescue"):
        mine = [r for r in rows if r.get("pass_name") == name]
        shown = [r["pass_step"] for r in mine]
        known = shown[shown.index(steps[0]):]  # null only until the stream starts
        assert set(shown[: len(shown) - len(known)]) <= {None} and set(known) == set(steps)
        assert max(r["pass_stage"] for r in mine) == n  # each pass reaches its last stage
    final = rows[-1]["final"]
    assert final["pass"] == "rescue" and final["pass_index"] == 1 and final["pass_round"] == 1
    assert final["stage"] == final["stages"] == n


def test_hybrid_and_restarts_report_their_passes(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    n = len(env["store"].manifest("tiny").checkpoints)
    hybrid = _recorded(env, monkeypatch, method="hybrid", restarts=2, direct_steps=30, lr=0.05,
                       steps=3, final_steps=6)  # fmt: skip
    assert _passes(hybrid) == [("surf", None, n), ("restart", None, 30), ("final", None, 1)]
    restart = [r for r in hybrid if r.get("pass_name") == "restart"]
    assert restart[-1]["pass_stage"] == 30 and all(r["pass_step"] is None for r in restart)
    surfed = [r["pass_step"] for r in hybrid if r.get("pass_name") == "surf"]
    assert None not in surfed[1:]  # known once the stream starts (the first write is before)
    assert hybrid[-1]["final"]["pass"] == "final"

    monkeypatch.undo()
    alone = _recorded(env, monkeypatch, method="adam-restarts", restarts=3, direct_steps=20)
    assert _passes(alone) == [("restart", None, 20)]
    assert [r["pass_stage"] for r in alone if "pass_stage" in r][-1] == 20
    monkeypatch.undo()
    assert _passes(_recorded(env, monkeypatch, method="adam", direct_steps=25)) == [
        ("adam", None, 25)
    ]


# ---- the stream: a live server ---------------------------------------------------------------


@dataclass
class Live:
    url: str
    app: Any
    keys: dict[str, str]
    store: ModelStore

    def client(self, key: str | None = "alice") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def submit(self, **body: Any) -> str:
        with self.client() as c:
            r = c.post("/invert", json={"model_id": "tiny", "image": FLAT, **body})
        assert r.status_code == 202, r.text
        return str(r.json()["job_id"])

    def cancel(self, job_id: str) -> None:
        with self.client() as c:
            assert c.delete(f"/jobs/{job_id}").status_code == 200


@pytest.fixture(scope="module")
def live(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("events")
    settings = Settings(
        database_url=None, redis_url=None, state_dir=tmp, models_dir=models_dir, auth="on",
        torch_threads=1, rate_limit_per_min=0, progress_interval_s=0.1,
    )  # fmt: skip
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    made = {}
    with app.state.sessions() as s:
        for name in ("alice", "bob"):
            made[name] = keys.create_key(s, name, "submit")[1]
    try:
        yield Live(f"http://127.0.0.1:{port}", app, made, ModelStore(models_dir))
    finally:
        server.should_exit = True
        thread.join(15)


@dataclass
class Event:
    id: int
    name: str
    data: dict[str, Any]


def read(lines: Iterator[str], until: Any = None, limit_s: float = 60) -> list[Event]:
    """Events from an open stream's lines, until `until(events)` holds or the server closes
    it (pass the same iterator again to read on)."""
    events: list[Event] = []
    fields: dict[str, str] = {}
    deadline = time.monotonic() + limit_s
    for line in lines:
        assert time.monotonic() < deadline, f"stream ran too long: {[e.name for e in events]}"
        if line.startswith(":"):
            continue
        if line:
            key, _, value = line.partition(":")
            fields[key] = value[1:] if value.startswith(" ") else value
            continue
        if fields:
            events.append(Event(int(fields["id"]), fields["event"], json.loads(fields["data"])))
            fields = {}
            if until is not None and until(events):
                break
    return events


def progress_events(events: list[Event]) -> list[dict[str, Any]]:
    return [e.data for e in events if e.name == "progress"]


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_stream_order_preview_and_cancel(live: Live) -> None:
    """snapshot first, progress with previews while it runs, then status and end; ids increase
    and the server closes the stream. The preview is G_T at the (barely moving) latent."""
    job_id = live.submit(**LONG)
    with live.client() as c, c.stream("GET", f"/jobs/{job_id}/events") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        head = read(lines, until=lambda ev: any(p["preview"] for p in progress_events(ev))
                    and len(progress_events(ev)) >= 3)  # fmt: skip
        polled = c.get(f"/jobs/{job_id}").json()
        live.cancel(job_id)
        tail = read(lines)  # to the end: the server closes the stream
    events = head + tail
    names = [e.name for e in events]
    assert names[0] == "snapshot" and names[-1] == "end" and names.count("end") == 1
    assert events[0].data["job_id"] == job_id
    ids = [e.id for e in events]
    assert ids == sorted(set(ids)) and ids[0] == 1
    status = [e.data for e in events if e.name == "status"]
    assert status[-1] == {"status": "canceled", "attempt": 1, "error": "canceled by client"}
    assert names.index("status", names.index("snapshot")) < len(names) - 1

    progress = progress_events(events)
    assert all(p["pass"] == "adam" and p["stages"] == 1_000_000 for p in progress)
    assert all(p["step"] is None and p["pass_index"] == 0 for p in progress)
    stages = [p["stage"] for p in progress]
    assert stages == sorted(stages) and stages[-1] > stages[0]
    # GET shows the same fields (the stream adds only the preview).
    assert set(polled["progress"]) == PASS_KEYS and set(progress[0]) == PASS_KEYS | {"preview"}
    assert events[-1].data["status"] == "canceled"
    assert {k: v for k, v in progress[-1].items() if k != "preview"} == events[-1].data[
        "progress"
    ]

    # lr = 1e-9: the latent stays at its seeded start, so the preview is G_T(x0) in 8 bits.
    x0 = sample_latents(1, 2, 0, "uniform")
    with torch.no_grad():
        expected = (final_generator(live.store, "tiny")(x0)[0, 0].clamp(0, 1) * 255).numpy()
    shown = [p["preview"] for p in progress if p["preview"]]
    for data in (base64.b64decode(shown[-1]), _get_preview(live, job_id)):
        pixels = png_pixels(data)
        assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
        assert np.abs(pixels.astype(float) - expected).max() <= 1.0


def _get_preview(live: Live, job_id: str) -> bytes:
    with live.client() as c:
        r = c.get(f"/jobs/{job_id}/preview.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    return r.content


def test_a_rescued_surf_job_streams_monotone_passes(live: Live) -> None:
    job_id = live.submit(method="surf", schedule="lm", steps=3, final_steps=6)
    with live.client() as c, c.stream("GET", f"/jobs/{job_id}/events") as r:
        events = read(r.iter_lines())
    assert events[0].name == "snapshot" and events[-1].name == "end"
    final = events[-1].data
    assert final["status"] == "succeeded" and final["progress"]["pass"] == "rescue"
    assert final["progress"]["stage"] == final["progress"]["stages"]
    seen = [(p["pass_index"], p["stage"]) for p in progress_events(events)]
    assert seen == sorted(seen)  # by pass, then stage: never back
    for p in progress_events(events):
        assert p["pass"] == ("surf", "rescue")[p["pass_index"]]
    with live.client() as c:
        assert c.get(f"/jobs/{job_id}").json()["progress"] == final["progress"]


def test_reconnect_gets_a_snapshot_and_ids_go_on(live: Live) -> None:
    job_id = live.submit(**LONG)
    try:
        with live.client() as c:
            with c.stream("GET", f"/jobs/{job_id}/events") as r:
                first = read(r.iter_lines(), until=lambda ev: len(ev) >= 2)
            last = first[-1].id
            headers = {"Last-Event-ID": str(last)}
            with c.stream("GET", f"/jobs/{job_id}/events", headers=headers) as r:
                again = read(r.iter_lines(), until=lambda ev: len(ev) >= 2)
    finally:
        live.cancel(job_id)
    assert [e.name for e in first][0] == "snapshot"
    assert again[0].name == "snapshot" and again[0].id == last + 1
    assert again[1].id == last + 2 and again[0].data["status"] == "running"


def test_a_finished_job_streams_snapshot_then_end(live: Live) -> None:
    job_id = live.submit(method="adam", direct_steps=5)
    with live.client() as c:
        deadline = time.monotonic() + 60
        while c.get(f"/jobs/{job_id}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with c.stream("GET", f"/jobs/{job_id}/events") as r:
            events = read(r.iter_lines())
    assert [e.name for e in events] == ["snapshot", "end"]
    assert events[1].data["result"]["latent"] == events[0].data["result"]["latent"]


def test_the_stream_times_out(live: Live) -> None:
    job_id = live.submit(**LONG)
    settings = live.app.state.settings
    live.app.state.settings = settings.model_copy(update={"events_max_s": 1.0})
    try:
        with live.client() as c, c.stream("GET", f"/jobs/{job_id}/events") as r:
            events = read(r.iter_lines())
    finally:
        live.app.state.settings = settings
        live.cancel(job_id)
    assert events[0].name == "snapshot" and events[-1].name == "timeout"
    assert events[-1].data == {"after_s": 1.0, "status": "running"}


def test_auth_same_as_get_and_access_token_only_here(live: Live) -> None:
    job_id = live.submit(method="adam", direct_steps=5)
    alice = live.keys["alice"]
    with live.client(None) as anon, live.client("bob") as bob:
        assert anon.get(f"/jobs/{job_id}/events").status_code == 401
        r = anon.get(f"/jobs/{job_id}/events", params={"access_token": "sk_nonsense"})
        assert r.status_code == 401
        assert bob.get(f"/jobs/{job_id}/events").status_code == 404  # another key's job
        assert bob.get(f"/jobs/{job_id}/preview.png").status_code == 404
        r = bob.get(f"/jobs/{job_id}/events", params={"access_token": alice})
        assert r.status_code == 404  # the header wins
        # the query parameter is for EventSource on this route only
        assert anon.get(f"/jobs/{job_id}", params={"access_token": alice}).status_code == 401
        with anon.stream(
            "GET", f"/jobs/{job_id}/events", params={"access_token": alice}
        ) as r:
            assert r.status_code == 200
            events = read(r.iter_lines())
    assert events[0].name == "snapshot" and events[-1].name == "end"
    assert events[-1].data["status"] == "succeeded"
