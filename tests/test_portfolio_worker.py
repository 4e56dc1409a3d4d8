"""The default schedule ("portfolio") in the service: the worker runs it on the stream's
G_T first (worker.progress.Hooked.final), its progress shows final -> restart r -> surf ->
rescue r, its jobs coalesce into their solo results, and admission prices its LM solves.

Jobs run on cue against the tiny model (tests/conftest.py), as in tests/test_coalesce.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from app.models import Job
from app.schemas import SolveOptions
from app.services import admission
from app.services.jobs import create_invert_job
from surfing.latents import sample_latents
from surfing.portfolio import MISS_RTOL, PORTFOLIO_ROUNDS
from surfing.solvers import not_fitted, surf
from surfing.trajectory import final_generator, generators
from tests.test_coalesce import outcome
from tests.test_events import FLAT, _passes, _recorded
from worker import jobs as wj

STEPS = {"steps": 3, "final_steps": 6}
X_STAR = [0.3, -0.4]  # the on-range target's latent (k = 2)


def on_range(env: dict[str, Any]) -> list:
    """G_T(x*) as a nested list: LM on G_T fits it from a start next to x*."""
    G = final_generator(env["store"], "tiny")
    with torch.no_grad():
        return G(torch.tensor([X_STAR])).tolist()


def job(env: dict[str, Any], image: Any, **options: Any) -> str:
    opts = SolveOptions.model_validate({"method": "surf", **STEPS, **options})
    with env["sessions"]() as s:
        return create_invert_job(
            s, env["store"], env["settings"], env["queue"], "tiny", opts, image, "test"
        ).id


def n_ckpt(env: dict[str, Any]) -> int:
    return len(env["store"].manifest("tiny").checkpoints)


def test_progress_shows_the_passes_on_g_t_then_the_surf_and_its_rescue(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    n, last_step = n_ckpt(env), env["store"].manifest("tiny").checkpoints[-1].step
    rows = _recorded(env, monkeypatch, method="surf", **STEPS)  # FLAT: never fitted
    g_t_passes = [("final", None, 1)] + [("restart", r, 1) for r in range(1, PORTFOLIO_ROUNDS + 1)]
    assert _passes(rows) == g_t_passes + [("surf", None, n), ("rescue", 1, n)]
    on_g_t = [r for r in rows if r.get("pass_name") in ("final", "restart")]
    steps = [r["pass_step"] for r in on_g_t]  # null only until G_T is loaded, then G_T's
    known = steps[steps.index(last_step) :]
    assert set(steps[: len(steps) - len(known)]) <= {None} and set(known) == {last_step}
    assert any(r["pass_step"] == last_step for r in on_g_t if r["pass_name"] == "final")
    final = rows[-1]["final"]
    rescue_index = len(g_t_passes) + 1  # after the passes on G_T and the surf
    assert (final["pass"], final["pass_round"], final["pass_index"]) == ("rescue", 1, rescue_index)

    monkeypatch.undo()
    no_rescue = _recorded(env, monkeypatch, method="surf", rescue=False, **STEPS)
    assert _passes(no_rescue) == g_t_passes + [("surf", None, n)]

    monkeypatch.undo()  # fitted on G_T at once: one pass, the stream is never read
    fitted = _recorded(env, monkeypatch, image=on_range(env), method="surf",
                       x_init=[v + 0.01 for v in X_STAR], **STEPS)  # fmt: skip
    assert _passes(fitted) == [("final", None, 1)]
    assert fitted[-1]["final"]["pass"] == "final"


def test_a_request_sets_the_rounds_on_g_t_with_restarts(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`restarts` is the portfolio's round count: with 1, the worker runs one restart round on
    G_T before the surf (an off-range image no longer pays for the default's rounds)."""
    n = n_ckpt(env)
    rows = _recorded(env, monkeypatch, method="surf", restarts=1, **STEPS)  # FLAT: never fitted
    assert _passes(rows) == [("final", None, 1), ("restart", 1, 1), ("surf", None, n),
                             ("rescue", 1, n)]  # fmt: skip
    params = {"latent_dim": 2, "stages": n}
    default = admission.estimate_evals("surf", params, 1)
    one = admission.estimate_evals("surf", {**params, "restarts": 1}, 1)
    assert default - one == (PORTFOLIO_ROUNDS - 1) * admission.LM_ITERS * (2 + 2) // 2  # k = 2
    with pytest.raises(ValueError, match="schedule 'portfolio' only"):
        SolveOptions.model_validate({"method": "surf", "schedule": "paper", "restarts": 1})


def test_a_queued_job_with_restarts_and_another_schedule_still_runs(env: dict[str, Any]) -> None:
    """Before the API refused `restarts` with surf's other schedules it ignored them; a job
    queued then (params written directly here) runs with its schedule and no rounds."""
    job_id = job(env, FLAT, schedule="auto")
    with env["sessions"]() as s:
        row = s.get(Job, job_id)
        assert row is not None
        row.params = {**row.params, "restarts": 3}
        s.commit()
    wj.run_job(job_id, env["settings"])
    done, result = outcome(env, job_id)
    assert done.status == "succeeded", done.error
    assert result is not None


def test_the_worker_runs_the_solver_from_the_streams_final_network(env: dict[str, Any]) -> None:
    jid = job(env, FLAT, seed=3)
    wj.run_job(jid, env["settings"])
    done, res = outcome(env, jid)
    assert done.status == "succeeded" and res is not None
    b = torch.tensor(FLAT, dtype=torch.float32).flatten().unsqueeze(0)
    ref = surf(generators(env["store"], "tiny"), b, sample_latents(1, 2, 3), **STEPS)
    np.testing.assert_allclose(res.latent, ref.x.double().numpy(), atol=1e-5)
    assert res.evals == ref.evals
    passes = [(t["pass"], t["pass_round"], t["pass_index"]) for t in res.trace]
    on_g_t = list(range(PORTFOLIO_ROUNDS + 1))  # pass indices: final, restart 1, ...
    surf_pass, rescue_pass = len(on_g_t), len(on_g_t) + 1
    indices = on_g_t + [surf_pass] * n_ckpt(env) + [rescue_pass] * n_ckpt(env)
    assert passes == [(t.pass_name, t.pass_round, i) for t, i in
                      zip(ref.trace, indices, strict=True)]  # fmt: skip
    assert [t["stage"] for t in res.trace] == list(range(1, len(ref.trace) + 1))
    assert all(t["stage"] <= t["total"] for t in res.trace)
    assert res.trace[0]["index"] == n_ckpt(env) - 1  # the first pass ran on G_T


def test_coalesced_jobs_get_their_solo_results(env: dict[str, Any]) -> None:
    """One job LM fits on G_T, two it does not: one pass, the split equals the solo runs."""
    near = {"x_init": [v + 0.01 for v in X_STAR]}
    specs = [(on_range(env), near), (FLAT, {"seed": 1}), (np.full((1, 28, 28), 0.8).tolist(),
                                                           {"seed": 2})]  # fmt: skip
    together = [job(env, image, **opts) for image, opts in specs]
    assert wj.run_job(together[0], env["settings"])["coalesced"] == together[1:]
    alone = env["settings"].model_copy(update={"coalesce_max_targets": 0})
    for jid, (image, opts) in zip(together, specs, strict=True):
        solo = job(env, image, **opts)
        assert wj.run_job(solo, alone)["coalesced"] == []
        (done, mine), (_, ref) = outcome(env, jid), outcome(env, solo)
        assert done.status == "succeeded" and mine is not None and ref is not None
        assert (mine.pass_jobs, ref.pass_jobs) == (3, 1)
        np.testing.assert_allclose(mine.latent, ref.latent, atol=1e-5)
        np.testing.assert_allclose(mine.objective, ref.objective, rtol=1e-3, atol=1e-9)
        # float32 rounding differs with the batch size; LM's stopping test may take one more
        # step (as in tests/test_coalesce.py)
        assert abs(mine.evals - ref.evals) <= 0.2 * ref.evals
        strip = [(t["stage"], t["pass"], t["pass_round"]) for t in mine.trace]
        assert strip == [(t["stage"], t["pass"], t["pass_round"]) for t in ref.trace]
    first = outcome(env, together[0])[1]
    assert first is not None and [t["pass"] for t in first.trace] == ["final"]


def test_the_compute_cap_prices_the_lm_solves_on_g_t(env: dict[str, Any]) -> None:
    """The estimate's LM part bounds what phase 1 spends on targets that take every round."""
    k, stages = 2, n_ckpt(env)
    params = {"latent_dim": k, "stages": stages}
    lm = (1 + PORTFOLIO_ROUNDS) * admission.LM_ITERS * (k + 2) // 2
    surf_part = ((stages - 1) * admission.SURF_STEPS + admission.FINAL_STEPS) * 2
    assert admission.estimate_evals("surf", params, 3) == 3 * (surf_part + lm)
    assert admission.estimate_evals("surf", {**params, "schedule": "auto"}, 3) == 3 * surf_part
    no_rescue = {**params, "rescue": False}
    assert admission.estimate_evals("surf", no_rescue, 1) == surf_part // 2 + lm
    b = torch.rand(6, 784, generator=torch.Generator().manual_seed(0))  # off the range
    res = surf(generators(env["store"], "tiny"), b, sample_latents(6, k, 1))
    g_t = res.rounds[PORTFOLIO_ROUNDS]  # after the last restart round
    assert g_t.name == f"restart {PORTFOLIO_ROUNDS}"
    assert not_fitted(g_t.objective, b, MISS_RTOL).all()  # every target took every round
    assert float(g_t.target_evals.max()) <= lm
    assert res.target_evals is not None
    assert float(res.target_evals.max()) <= admission.estimate_evals("surf", params, 1)
