"""The lm-restarts baseline (surfing.solvers.lm_restarts) and its service method.

On the two-basin toy of tests/test_perf_solvers.py Levenberg–Marquardt from x < ~1/4 ends in
the wrong basin; a restart fixes a target exactly when LM from that restart's start (computed
here independently) reaches x*. Then: never a higher objective, per-seed determinism, batch
independence (so jobs may coalesce), rounds = 0 is plain LM, and a job end to end.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.services import admission
from app.settings import Settings
from models_store import ModelStore
from surfing.architectures import build_generator
from surfing.latents import sample_latents
from surfing.lm import LMResult, levenberg_marquardt
from surfing.measure import gaussian_matrix
from surfing.solvers import (
    LM_RESTART_ROUNDS,
    MISS_RTOL,
    RESCUE_MARGIN,
    StageRule,
    fit_line,
    lm_restarts,
    not_fitted,
    restart_latents,
    split_result,
)
from surfing.trajectory import final_generator
from tests.helpers import RELU_ARCH
from tests.test_coalesce import invert_job, key, outcome
from tests.test_events import FLAT, _passes, _recorded
from tests.test_perf_solvers import TwoBasins
from worker import jobs as wj

X_STAR = 0.5  # TwoBasins' planted optimum


def two_basins(n: int = 24) -> tuple[TwoBasins, torch.Tensor, torch.Tensor]:
    G = TwoBasins()
    x_init = torch.linspace(-0.95, 0.95, n).unsqueeze(1)
    return G, G(torch.full((n, 1), X_STAR)), x_init


def plain_lm(G: torch.nn.Module, x: torch.Tensor, b: torch.Tensor, A=None) -> LMResult:
    """LM as lm_restarts runs it (StageRule's iterations, tolerance, latent radius and stall
    stop against lm_restarts' default miss test)."""
    rule = StageRule()
    return levenberg_marquardt(
        G, x, b, A, max_iters=rule.lm_iters, xtol=rule.lm_xtol, radius=rule.radius(x.shape[1]),
        stall=rule.lm_stall, stall_above=fit_line(b, MISS_RTOL),
    )


def at_x_star(x: torch.Tensor) -> torch.Tensor:
    return (x - X_STAR).abs().squeeze(1) < 1e-3


@pytest.mark.parametrize("seed", [0, 7])
def test_restarts_fix_exactly_the_targets_whose_restart_reaches_x_stars_basin(seed: int) -> None:
    G, b, x_init = two_basins()
    first = plain_lm(G, x_init, b)
    stuck = ~at_x_star(first.x)
    assert stuck.any() and (~stuck).any()
    assert torch.equal(stuck, not_fitted(first.objective, b, 1e-4))  # the miss test sees it
    # where LM from each round's start lands, every target run from it on its own
    starts = [restart_latents(x_init[i : i + 1], r, "uniform", seed) for r in (1, 2, 3)
              for i in range(len(x_init))]  # fmt: skip
    lands = torch.stack([at_x_star(plain_lm(G, s, b[:1]).x) for s in starts]).view(3, -1)
    for rounds in (1, 3):
        res = lm_restarts(G, b, x_init, rounds=rounds, seed=seed)
        expected = ~stuck | lands[:rounds].any(dim=0)
        assert torch.equal(at_x_star(res.x), expected)
        assert (stuck & ~expected).any() or rounds == 3  # one round leaves some stuck
    fixed_once = stuck & lands[0]
    assert fixed_once.any()
    once = lm_restarts(G, b, x_init, rounds=1, seed=seed)
    again = plain_lm(G, restart_latents(x_init, 1, "uniform", seed)[fixed_once], b[fixed_once])
    assert torch.allclose(once.x[fixed_once], again.x, atol=1e-6)
    # fitted targets keep their first solve; the others pay for every round they took
    assert once.target_evals is not None
    assert torch.equal(once.x[~stuck], first.x[~stuck])
    assert torch.equal(once.target_evals[~stuck], first.evals[~stuck].double())
    assert torch.all(once.target_evals[stuck] > first.evals[stuck].double())
    assert once.evals == round(float(once.target_evals.mean()))


def test_never_raises_an_objective_and_keeps_the_lowest() -> None:
    G, b, x_init = two_basins()
    b = b + torch.tensor([0.05, -0.03])  # off the range: no target is ever fitted
    first = plain_lm(G, x_init, b)
    res = lm_restarts(G, b, x_init, rounds=3, seed=3)
    assert torch.all(res.objective <= first.objective)
    tries = torch.stack(
        [first.objective] + [plain_lm(G, restart_latents(x_init, r, seed=3), b).objective
                             for r in (1, 2, 3)]  # fmt: skip
    )
    assert torch.all(res.objective <= tries.min(0).values / (1 - RESCUE_MARGIN) + 1e-7)
    assert torch.all((tries - res.objective).abs().min(0).values < 1e-6)  # one of its solves
    assert res.target_evals is not None and torch.all(res.target_evals > first.evals.double())
    # one trace stage per pass; restart stages mark the targets they worked on
    assert [(t.pass_name, t.pass_round) for t in res.trace] == [
        ("final", None), ("restart", 1), ("restart", 2), ("restart", 3)
    ]
    assert all(t.moved is not None and bool(t.moved.all()) for t in res.trace[1:])
    assert torch.equal(res.trace[0].objective, first.objective)
    assert torch.equal(res.trace[-1].objective, res.objective)
    pairs = zip(res.trace, res.trace[1:], strict=False)
    assert all(torch.all(a.objective >= c.objective) for a, c in pairs)


def test_with_a_measurement_matrix_the_objective_never_rises() -> None:
    torch.manual_seed(0)
    G = build_generator(RELU_ARCH).eval()
    A = gaussian_matrix(1, 3, RELU_ARCH["out_dim"])
    b = G(sample_latents(16, 2, 5)) @ A.T
    x_init = sample_latents(16, 2, 6)
    first = plain_lm(G, x_init, b, A)
    res = lm_restarts(G, b, x_init, A, rounds=2, seed=1)
    assert torch.all(res.objective <= first.objective)
    plain = lm_restarts(G, b, x_init, A, rounds=0)
    assert torch.equal(plain.x, first.x) and torch.equal(plain.objective, first.objective)


def test_deterministic_per_seed_and_independent_of_batch_position() -> None:
    G, b, x_init = two_basins()
    a = lm_restarts(G, b, x_init, seed=7)
    again = lm_restarts(G, b, x_init, seed=7)
    assert torch.equal(a.x, again.x) and torch.equal(a.objective, again.objective)
    assert a.target_evals is not None and again.target_evals is not None
    assert torch.equal(a.target_evals, again.target_evals)
    perm = torch.randperm(len(x_init), generator=torch.Generator().manual_seed(0))
    shuffled = lm_restarts(G, b[perm], x_init[perm], seed=7)
    assert torch.allclose(shuffled.x, a.x[perm], atol=1e-6)
    assert shuffled.target_evals is not None
    assert torch.equal(shuffled.target_evals, a.target_evals[perm])
    other = lm_restarts(G, b, x_init, seed=8)  # another seed: other restarts, other fixes
    assert not torch.equal(restart_latents(x_init, 1, seed=8), restart_latents(x_init, 1, seed=7))
    assert not torch.equal(at_x_star(other.x), at_x_star(a.x))


def test_rounds_zero_is_plain_lm() -> None:
    G, b, x_init = two_basins()
    first = plain_lm(G, x_init, b)
    res = lm_restarts(G, b, x_init, rounds=0)
    assert torch.equal(res.x, first.x) and torch.equal(res.objective, first.objective)
    assert res.target_evals is not None
    assert torch.equal(res.target_evals, first.evals.double())
    assert [t.pass_name for t in res.trace] == ["final"]
    with pytest.raises(ValueError, match="rounds"):
        lm_restarts(G, b, x_init, rounds=-1)
    fitted = at_x_star(first.x)  # all fitted at once: no restart round runs
    assert len(lm_restarts(G, b[fitted], x_init[fitted]).trace) == 1


def test_a_coalesced_batch_splits_into_the_solo_results() -> None:
    G, b, x_init = two_basins()
    together = lm_restarts(G, b, x_init, seed=7)
    cut = [10, 14]  # the first job: 10 targets from the left, all stuck at first
    for (lo, hi), part in zip(((0, 10), (10, 24)), split_result(together, cut), strict=True):
        alone = lm_restarts(G, b[lo:hi], x_init[lo:hi], seed=7)
        assert torch.allclose(part.x, alone.x, atol=1e-6)
        assert part.evals == alone.evals
        assert [(t.pass_name, t.pass_round) for t in part.trace] == [
            (t.pass_name, t.pass_round) for t in alone.trace
        ]


# ---- the service -----------------------------------------------------------------------------


def test_compute_cap_bounds_what_the_solver_spends() -> None:
    assert (admission.LM_ROUNDS, admission.LM_ITERS) == (LM_RESTART_ROUNDS, StageRule().lm_iters)
    k, rounds = 2, 2
    params = {"latent_dim": k, "restarts": rounds}
    bound = (1 + rounds) * StageRule().lm_iters * (k + 2) // 2
    assert admission.estimate_evals("lm-restarts", params, 3) == 3 * bound
    assert admission.estimate_evals("lm-restarts", {"latent_dim": k}, 1) == 4 * 40 * 2
    torch.manual_seed(0)
    G = build_generator(RELU_ARCH).eval()
    b = torch.rand(8, RELU_ARCH["out_dim"])  # off the range: every target takes every round
    res = lm_restarts(G, b, sample_latents(8, k, 1), rounds=rounds)
    assert res.target_evals is not None and len(res.trace) == 1 + rounds
    assert float(res.target_evals.max()) <= bound


def test_jobs_coalesce_only_with_the_same_seed_and_get_their_solo_results(
    env: dict[str, Any],
) -> None:
    opts = {"method": "lm-restarts", "restarts": 2}
    a = key(env, invert_job(env, 0.2, seed=1, **opts))
    assert a is not None
    assert key(env, invert_job(env, 0.7, seed=1, **opts)) == a  # other target: same pass
    assert key(env, invert_job(env, 0.2, seed=2, **opts)) != a  # restarts are seeded
    assert key(env, invert_job(env, 0.2, seed=1, method="lm-restarts", restarts=3)) != a

    values = [0.2, 0.5, 0.8]
    together = [invert_job(env, v, seed=4, **opts) for v in values]
    out = wj.run_job(together[0], env["settings"])
    assert out["coalesced"] == together[1:]
    alone = env["settings"].model_copy(update={"coalesce_max_targets": 0})
    for jid, v in zip(together, values, strict=True):
        solo = invert_job(env, v, seed=4, **opts)
        assert wj.run_job(solo, alone)["coalesced"] == []
        (job, mine), (_, ref) = outcome(env, jid), outcome(env, solo)
        assert job.status == "succeeded" and mine is not None and ref is not None
        assert (mine.pass_jobs, ref.pass_jobs) == (3, 1)
        np.testing.assert_allclose(mine.latent, ref.latent, atol=1e-5)
        # float32 rounding differs with the batch size; LM's stopping test may take one more
        # step (as for surf, tests/test_coalesce.py)
        assert abs(mine.evals - ref.evals) <= 0.2 * ref.evals
        assert [t["stage"] for t in mine.trace] == [t["stage"] for t in ref.trace]


def test_progress_shows_the_first_solve_then_each_round(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = _recorded(env, monkeypatch, method="lm-restarts", restarts=2)  # FLAT: never fitted
    assert _passes(rows) == [("final", None, 1), ("restart", 1, 1), ("restart", 2, 1)]
    final = rows[-1]["final"]
    assert (final["pass"], final["pass_round"], final["pass_index"]) == ("restart", 2, 2)
    last_step = env["store"].manifest("tiny").checkpoints[-1].step
    assert {r["pass_step"] for r in rows if r.get("pass_name") == "restart"} == {last_step}


def test_an_api_job_runs_end_to_end_in_embedded_mode(models_dir: Path, tmp_path: Path) -> None:
    settings = Settings(database_url=None, redis_url=None, state_dir=tmp_path,
                        models_dir=models_dir, auth="off", torch_threads=1)  # fmt: skip
    assert settings.embedded
    with TestClient(create_app(settings)) as client:
        ids = [
            client.post("/invert", json={"model_id": "tiny", "image": FLAT,
                                         "method": "lm-restarts", "restarts": 2, "seed": 3}),
            client.post("/cs-recover", json={"model_id": "tiny", "measurements": [0.1] * 20,
                                             "matrix": {"seed": 1, "m": 20},
                                             "method": "lm-restarts", "seed": 3}),
        ]  # fmt: skip
        assert [r.status_code for r in ids] == [202, 202], [r.text for r in ids]
        jobs = [_wait(client, r.json()["job_id"]) for r in ids]
    for job, rounds in zip(jobs, (2, LM_RESTART_ROUNDS), strict=True):
        assert job["status"] == "succeeded", job
        assert job["method"] == "lm-restarts" and job["params"]["latent_dim"] == 2
        assert job["progress"]["pass"] == "restart"  # off-range targets take every round
        assert job["progress"]["pass_round"] == rounds
        assert [t["stage"] for t in job["result"]["trace"]] == list(range(1, rounds + 2))
    # the worker ran exactly the solver: same start (seed 3), same rounds, same answer
    G = final_generator(ModelStore(models_dir), "tiny")
    y = torch.tensor(FLAT, dtype=torch.float32).flatten().unsqueeze(0)
    ref = lm_restarts(G, y, sample_latents(1, 2, 3), rounds=2, seed=3)
    np.testing.assert_allclose(jobs[0]["result"]["latent"], ref.x.double().numpy(), atol=1e-4)
    assert jobs[0]["result"]["evals"] == ref.evals


def _wait(client: TestClient, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return dict(job)
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
