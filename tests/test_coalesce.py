"""Coalescing queued jobs into one pass over the trajectory (worker.coalesce, worker.jobs).

- only jobs whose answers cannot change share a pass (same model, matrix and options);
- every job of a pass gets the result it gets alone, its own row, attempt and pass size;
- the pass respects its target cap, and a job canceled during the pass is dropped alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from app.models import Job, JobResult
from app.schemas import MatrixSeed, SolveOptions
from app.services.jobs import cancel_job, create_cs_job, create_invert_job
from surfing.solvers import StageRule
from worker import jobs as wj
from worker.coalesce import pass_key


def invert_job(env: dict[str, Any], value: float, **options: Any) -> str:
    opts = SolveOptions.model_validate({"method": "surf", **options})
    with env["sessions"]() as s:
        return create_invert_job(
            s,
            env["store"],
            env["settings"],
            env["queue"],
            "tiny",
            opts,
            np.full((1, 28, 28), value).tolist(),
            "test",
        ).id


def cs_job(
    env: dict[str, Any], matrix_seed: int, matrix: list[list[float]] | None = None, **options: Any
) -> str:
    opts = SolveOptions.model_validate({"method": "surf", **options})
    m = 20 if matrix is None else len(matrix)
    with env["sessions"]() as s:
        return create_cs_job(
            s,
            env["store"],
            env["settings"],
            env["queue"],
            "tiny",
            opts,
            [0.1] * m,
            MatrixSeed(seed=matrix_seed, m=20) if matrix is None else matrix,
            None,
            "test",
        ).id


def key(env: dict[str, Any], job_id: str) -> str | None:
    with env["sessions"]() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return pass_key(job)


def outcome(env: dict[str, Any], job_id: str) -> tuple[Job, JobResult | None]:
    with env["sessions"]() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job, s.get(JobResult, job_id)


def test_only_jobs_with_the_same_answer_path_share_a_pass(env: dict[str, Any]) -> None:
    a = key(env, invert_job(env, 0.2, seed=1))
    assert a is not None
    assert key(env, invert_job(env, 0.7, seed=9)) == a  # other target, other seed: fine
    assert key(env, invert_job(env, 0.2, seed=1, steps=7)) != a  # other options
    # tol stops an Adam stage when every target of the batch is below it: the paper's stages
    # and the Adam stage on θ_0 of every other schedule (the default's surf too)
    for schedule in ("paper", "lm", "auto", None):
        assert key(env, invert_job(env, 0.2, seed=1, schedule=schedule, tol=1e-3)) is None
    assert key(env, invert_job(env, 0.2, method="hybrid")) is None  # restarts drawn per batch
    assert key(env, invert_job(env, 0.2, method="adam", tol=1e-3)) is None
    assert key(env, cs_job(env, 3)) == key(env, cs_job(env, 3, seed=5))
    assert key(env, cs_job(env, 3)) != key(env, cs_job(env, 4))  # another matrix


@pytest.mark.parametrize("schedule", ["paper", "lm", "auto"])
def test_a_pass_gives_every_job_its_solo_result(env: dict[str, Any], schedule: str) -> None:
    opts = {"schedule": schedule, "steps": 3, "final_steps": 6}
    values = [0.2, 0.5, 0.8]
    together = [invert_job(env, v, seed=i, **opts) for i, v in enumerate(values)]
    other = invert_job(env, 0.5, seed=0, schedule=schedule, steps=4, final_steps=6)

    out = wj.run_job(together[0], env["settings"])
    assert out["coalesced"] == together[1:]
    for jid in together:
        job, res = outcome(env, jid)
        assert job.status == "succeeded" and job.attempt == 1 and res is not None
        assert (res.pass_jobs, res.pass_targets) == (3, 3)
        assert job.stage == job.stages and len(res.trace) == job.stages
    assert outcome(env, other)[0].status == "queued"  # different options: not in this pass
    assert wj.run_job(together[1], env["settings"]) == {"job_id": together[1], "skipped": True}

    alone = env["settings"].model_copy(update={"coalesce_max_targets": 0})
    for i, (jid, v) in enumerate(zip(together, values, strict=True)):
        solo = invert_job(env, v, seed=i, **opts)
        assert wj.run_job(solo, alone)["coalesced"] == []
        _, mine = outcome(env, jid)
        _, ref = outcome(env, solo)
        assert mine is not None and ref is not None and ref.pass_jobs == 1
        np.testing.assert_allclose(mine.latent, ref.latent, atol=1e-4)
        np.testing.assert_allclose(mine.pixel_error, ref.pixel_error, rtol=1e-3, atol=1e-7)
        if schedule == "paper":  # fixed step counts
            assert mine.evals == ref.evals
        else:  # float32 rounding differs with the batch size; LM's stopping test may
            assert abs(mine.evals - ref.evals) <= 0.2 * ref.evals  # take one more step


def test_explicit_matrices_must_be_equal_to_share_a_pass(env: dict[str, Any]) -> None:
    rng = np.random.default_rng(0)
    a1, a2 = (rng.normal(size=(5, 784)).round(3).tolist() for _ in range(2))
    opts = {"steps": 2, "final_steps": 2}
    ids = [
        cs_job(env, 0, a1, **opts),
        cs_job(env, 0, a2, **opts),
        cs_job(env, 0, a1, seed=3, **opts),
    ]
    assert wj.run_job(ids[0], env["settings"])["coalesced"] == [ids[2]]
    assert [outcome(env, j)[0].status for j in ids] == ["succeeded", "queued", "succeeded"]


def test_a_pass_respects_its_target_cap(env: dict[str, Any]) -> None:
    settings = env["settings"].model_copy(update={"coalesce_max_targets": 2})
    ids = [invert_job(env, 0.1 * (i + 1), seed=i, steps=2, final_steps=2) for i in range(3)]
    out = wj.run_job(ids[0], settings)
    assert out["coalesced"] == [ids[1]]
    assert [outcome(env, j)[0].status for j in ids] == ["succeeded", "succeeded", "queued"]


def test_a_job_canceled_during_the_pass_is_dropped_alone(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [invert_job(env, 0.1 * (i + 1), seed=i, steps=2, final_steps=2) for i in range(3)]
    solve = wj._solve

    def cancel_then_solve(*args: Any, **kwargs: Any) -> Any:
        with env["sessions"]() as s:
            cancel_job(s, env["queue"], ids[1])
        return solve(*args, **kwargs)

    monkeypatch.setattr(wj, "_solve", cancel_then_solve)
    out = wj.run_job(ids[0], env["settings"])
    assert out["written"] == [ids[0], ids[2]]
    statuses = [outcome(env, j)[0].status for j in ids]
    assert statuses == ["succeeded", "canceled", "succeeded"]
    assert outcome(env, ids[1])[1] is None


@pytest.mark.parametrize("schedule", ["paper", "lm"])
def test_the_cuda_graphs_setting_reaches_the_solver_and_changes_no_result(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, schedule: str
) -> None:
    """SURFING_CUDA_GRAPHS: a surf job runs through surfing.graphs (eagerly on this CPU) and
    gets exactly the result it gets without it."""
    from surfing import graphs

    runs: list[str] = []
    real_run = graphs._Replayed._run

    def spy(self: graphs._Replayed, *args: Any) -> None:
        runs.append(type(self).__name__)
        real_run(self, *args)

    monkeypatch.setattr(graphs._Replayed, "_run", spy)
    solo = env["settings"].model_copy(update={"coalesce_max_targets": 0})
    opts = {"schedule": schedule, "steps": 3, "final_steps": 6}
    plain = invert_job(env, 0.3, seed=1, **opts)
    wj.run_job(plain, solo)
    assert runs == []
    graphed = invert_job(env, 0.3, seed=1, **opts)
    wj.run_job(graphed, solo.model_copy(update={"cuda_graphs": True}))
    expected = {"GraphedAdam"} if schedule == "paper" else {"GraphedLMStage"}
    if schedule != "paper" and StageRule().head_stages:  # the head stages are Adam's
        expected.add("GraphedAdam")
    assert runs and set(runs) == expected
    (job_a, a), (job_b, b) = outcome(env, plain), outcome(env, graphed)
    assert job_a.status == job_b.status == "succeeded" and a is not None and b is not None
    assert a.latent == b.latent and a.evals == b.evals


def test_a_rescue_pass_adds_stages_and_can_be_turned_off(env: dict[str, Any]) -> None:
    """A constant image is off the tiny model's range, so the default rescues it: the job's
    progress and trace count the second pass; rescue=false runs one pass."""
    opts = {"schedule": "lm", "steps": 3, "final_steps": 6}
    on = invert_job(env, 0.2, seed=1, **opts)
    off = invert_job(env, 0.2, seed=1, rescue=False, **opts)
    assert key(env, on) != key(env, off)  # different answer paths never share a pass
    alone = env["settings"].model_copy(update={"coalesce_max_targets": 0})
    for jid in (on, off):
        wj.run_job(jid, alone)
    (job_on, res_on), (job_off, res_off) = outcome(env, on), outcome(env, off)
    assert res_on is not None and res_off is not None
    n = len(res_off.trace)
    assert n == job_off.stage == job_off.stages == 4  # the tiny trajectory's checkpoints
    assert len(res_on.trace) == job_on.stage == job_on.stages == 2 * n
    assert [t.get("rescued") for t in res_on.trace] == [None] * n + [1] * n
    assert res_on.evals > res_off.evals
    assert res_on.objective[0] <= res_off.objective[0]
