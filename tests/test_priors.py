"""Latent priors: starts, restarts and rescue draws follow the manifest's `latent_prior`.

- the uniform default draws exactly what the solvers drew before priors existed;
- normal draws are normal, and a target's rescue start does not depend on its batch;
- the worker and the CLI start from the model's prior; the CLI honours --schedule.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from app.db import session_factory, upgrade_database
from app.models import Job, JobResult
from app.schemas import SolveOptions
from app.services.jobs import create_invert_job
from app.settings import Settings
from models_store import ModelStore
from surfing import restarts, solvers
from surfing.cli import main
from surfing.latents import sample_latents
from surfing.solvers import (
    StageRule,
    direct_restarts,
    hybrid,
    restart_latents,
    surf,
    uniform_latents,
)
from surfing.trajectory import final_generator, generators
from tests.conftest import make_tiny_trajectory
from tests.helpers import FakeQueue
from worker import jobs as wj


def old_restart_latents(x_init: torch.Tensor, round_: int) -> torch.Tensor:
    """restart_latents as it was before priors (commit b73882a)."""
    rows = x_init.detach().to("cpu", torch.float64).contiguous()
    out = torch.empty(rows.shape, dtype=torch.float64)
    for i, row in enumerate(rows):
        key = row.numpy().tobytes() + round_.to_bytes(4, "little")
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        out[i] = torch.rand(
            rows.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
    return (out * 2 - 1).to(x_init)


def test_uniform_restarts_are_bit_identical_to_before() -> None:
    x_init = uniform_latents(50, 5, 3)
    for round_ in (1, 2):
        assert torch.equal(restart_latents(x_init, round_), old_restart_latents(x_init, round_))
        assert torch.equal(
            restart_latents(x_init, round_, "uniform"), old_restart_latents(x_init, round_)
        )
    assert torch.equal(sample_latents(7, 3, 11), uniform_latents(7, 3, 11))


def test_normal_rescue_draws_are_normal_and_per_target() -> None:
    x_init = uniform_latents(4000, 4, 0)
    draws = restart_latents(x_init, 1, "normal")
    assert draws.shape == (4000, 4) and draws.dtype == x_init.dtype
    assert float(draws.abs().max()) > 2.5  # far outside the uniform box
    assert (draws.abs() > 1).float().mean() > 0.25  # P(|z| > 1) = 0.317
    assert abs(float(draws.mean())) < 0.05 and abs(float(draws.std()) - 1) < 0.05
    assert not torch.equal(draws, restart_latents(x_init, 2, "normal"))  # rounds differ
    # coalescing: a target draws the same start whichever batch it sits in, and wherever
    perm = torch.randperm(4000, generator=torch.Generator().manual_seed(1))[:300]
    assert torch.equal(restart_latents(x_init[perm], 1, "normal"), draws[perm])
    with pytest.raises(ValueError, match="unknown latent prior"):
        restart_latents(x_init[:2], 1, "cauchy")


class NoLatentDim(nn.Module):
    """A user's generator: no `latent_dim` attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


def test_direct_restarts_draws_starts_from_the_prior(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    G = NoLatentDim().eval()
    b = torch.rand(5, 6)
    seen: list[torch.Tensor] = []
    real = restarts.direct

    def spy(G: nn.Module, b: torch.Tensor, x_init: torch.Tensor, *a: Any) -> Any:
        seen.append(x_init.clone())
        return real(G, b, x_init, *a)

    monkeypatch.setattr(restarts, "direct", spy)
    direct_restarts(G, b, 3, seed=4, steps=2, latent_dim=3)
    assert torch.equal(seen[-1], uniform_latents(15, 3, 4))  # the formula before priors
    res = direct_restarts(G, b, 3, seed=4, steps=2, latent_dim=3, prior="normal")
    assert torch.equal(seen[-1], sample_latents(15, 3, 4, "normal"))
    assert res.x.shape == (5, 3)
    x0 = torch.zeros(5, 3)
    direct_restarts(G, b, 2, seed=4, x_init=x0, steps=2, prior="normal")  # k from x_init
    assert torch.equal(seen[-1][:5], x0) and torch.equal(
        seen[-1][5:], sample_latents(10, 3, 4, "normal")[5:]
    )
    with pytest.raises(ValueError, match="latent_dim"):
        direct_restarts(G, b, 2, seed=4, steps=2)


@pytest.fixture(scope="module")
def normal_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """'tiny-normal': the tiny InfoGAN trajectory (k = 2) with latent_prior = "normal"."""
    root = tmp_path_factory.mktemp("prior-models")
    src = make_tiny_trajectory(root / "src", "src", k=2, n_ckpt=4)
    m = src.manifest("src")
    store = ModelStore(root)
    with store.create(
        "tiny-normal",
        arch=m.arch,
        latent_dim=m.latent_dim,
        output_shape=m.output_shape,
        value_range=m.value_range,
        training=m.training,
        dataset=m.dataset,
        latent_prior="normal",
    ) as w:
        for i, c in enumerate(m.checkpoints):
            w.add(c.step, src.load("src", i))
    return root


def test_surf_and_hybrid_rescue_and_restart_from_the_prior(
    normal_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(normal_root)
    G = final_generator(store, "tiny-normal")
    with torch.no_grad():
        b = G(torch.tensor([[0.5, -0.5], [1.5, 0.2], [-0.3, 0.9]])).flatten(1)
    x0 = sample_latents(3, 2, 7, "normal")
    starts: list[torch.Tensor] = []
    real = solvers._surf_pass

    def spy(stages: Any, b: torch.Tensor, x: torch.Tensor, *a: Any) -> Any:
        starts.append(x.clone())
        return real(stages, b, x, *a)

    monkeypatch.setattr(solvers, "_surf_pass", spy)
    everyone = StageRule(rescue_rtol=-1.0)  # every target counts as not fitted: all rescued
    stream = generators(store, "tiny-normal")
    surf(stream, b, x0, schedule="lm", rule=everyone, prior="normal")
    assert len(starts) == 2 and torch.equal(starts[0], x0)
    assert torch.equal(starts[1], restart_latents(x0, 1, "normal"))
    surf(stream, b, x0, schedule="lm", rule=everyone)  # default: uniform, as before
    assert torch.equal(starts[3], old_restart_latents(x0, 1))

    seen: list[tuple[str, int | None]] = []
    real_restarts = restarts.direct_restarts

    def spy_restarts(*a: Any, **kw: Any) -> Any:
        seen.append((kw.get("prior", a[9] if len(a) > 9 else None), kw.get("latent_dim")))
        return real_restarts(*a, **kw)

    monkeypatch.setattr(restarts, "direct_restarts", spy_restarts)
    hybrid(stream, b, x0, 2, seed=1, steps=2, final_steps=5, direct_steps=5, prior="normal")
    assert seen == [("normal", 2)]


# ---- the worker and the API ----------------------------------------------------------------


@pytest.fixture
def env(normal_root: Path, tmp_path: Path) -> dict[str, Any]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'r.db'}",
        redis_url=None,
        state_dir=tmp_path,
        models_dir=normal_root,
        progress_interval_s=0.1,
        heartbeat_interval_s=0.5,
        torch_threads=1,
    )
    upgrade_database(settings.sqlalchemy_url)
    return {
        "settings": settings,
        "sessions": session_factory(settings.sqlalchemy_url),
        "store": ModelStore(normal_root),
    }


def invert_job(env: dict[str, Any], n: int, **options: Any) -> str:
    with env["sessions"]() as s:
        return create_invert_job(
            s,
            env["store"],
            env["settings"],
            FakeQueue(),
            "tiny-normal",
            SolveOptions.model_validate(options),
            np.full((n, 1, 28, 28), 0.4).tolist(),
            "test",
        ).id


def test_worker_starts_from_the_manifest_prior_per_job_seed(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    real = wj.surf

    def spy(stages: Any, b: torch.Tensor, x_init: torch.Tensor, *a: Any, **kw: Any) -> Any:
        calls.append({"x_init": x_init.clone(), **kw})
        return real(stages, b, x_init, *a, **kw)

    monkeypatch.setattr(wj, "surf", spy)
    opts = {"method": "surf", "schedule": "lm", "steps": 2}
    first, second = invert_job(env, 2, seed=3, **opts), invert_job(env, 3, seed=8, **opts)
    out = wj.run_job(first, env["settings"])
    assert out["coalesced"] == [second]  # one pass, each job with its own seeded starts
    (call,) = calls
    expected = torch.cat([sample_latents(2, 2, 3, "normal"), sample_latents(3, 2, 8, "normal")])
    assert torch.equal(call["x_init"], expected) and call["prior"] == "normal"
    assert float(expected.abs().max()) > 1  # a uniform start could not be this
    with env["sessions"]() as s:
        job = s.get(Job, first)
        assert job is not None and job.status == "succeeded"
        assert job.params["x_init"] == "normal(seed)" and job.params["latent_prior"] == "normal"


def test_restart_methods_draw_from_the_prior(env: dict[str, Any]) -> None:
    """adam-restarts with one tiny Adam step ends next to its best start: one of the normal
    draws sample_latents(R * B, k, seed, "normal") gives, never one of the uniform ones."""
    job_id = invert_job(env, 2, method="adam-restarts", restarts=3, seed=5, lr=1e-6, direct_steps=1)
    wj.run_job(job_id, env["settings"])
    with env["sessions"]() as s:
        res = s.get(JobResult, job_id)
        assert res is not None
        latent = torch.tensor(res.latent)
    normal = sample_latents(6, 2, 5, "normal").view(3, 2, 2)
    uniform = uniform_latents(6, 2, 5).view(3, 2, 2)
    for i in range(2):
        assert (normal[:, i] - latent[i]).norm(dim=1).min() < 1e-4
        assert (uniform[:, i] - latent[i]).norm(dim=1).min() > 1e-2


# ---- the CLI -------------------------------------------------------------------------------


def test_cli_starts_from_the_prior_and_honours_schedule(
    normal_root: Path, tmp_path: Path, capsys: Any
) -> None:
    from surfing.images import to_png

    G = final_generator(ModelStore(normal_root), "tiny-normal")
    with torch.no_grad():
        to_png(G(torch.tensor([[0.3, -0.4]]))[0], tmp_path / "t.png")
    base = ["--models-dir", str(normal_root), "invert", str(tmp_path / "t.png")]
    base += ["--model", "tiny-normal", "--seed", "2", "--out", str(tmp_path / "r.png")]

    main([*base, "--method", "adam", "--direct-steps", "1", "--lr", "1e-6"])
    latent = torch.tensor(json.loads(capsys.readouterr().out)["latent"])
    assert (latent - sample_latents(1, 2, 2, "normal")[0]).abs().max() < 1e-4

    runs = {}
    for schedule in ("paper", "lm"):
        main([*base, "--schedule", schedule, "--steps", "3", "--final-steps", "7"])
        runs[schedule] = json.loads(capsys.readouterr().out)["stages"]
    # the paper schedule spends exactly `steps` Adam steps per stage and `final_steps` last
    assert [s["steps_used"] for s in runs["paper"]] == [3, 3, 3, 7]
    assert [s["steps_used"] for s in runs["lm"]] != [3, 3, 3, 7]
    assert [s["objective"] for s in runs["lm"]] != [s["objective"] for s in runs["paper"]]
