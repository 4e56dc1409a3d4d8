"""Fast solver paths compute what the plain reference computes (tiny networks, milliseconds)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from surfing.architectures import build_generator
from surfing.lm import (
    CHORD,
    CHORD_THEN_FRESH,
    FRESH,
    SKIP,
    jacobian,
    levenberg_marquardt,
    track_step,
)
from surfing.measure import gaussian_matrix
from surfing.solvers import (
    StageRule,
    adam_descent,
    adam_stage,
    not_fitted,
    resolve_schedule,
    restart_latents,
    split_result,
    surf,
    uniform_latents,
)
from surfing.trajectory import final_generator, frozen, generators
from tests.helpers import RELU_ARCH, interpolated_trajectory

INFOGAN = {"kind": "infogan", "latent_dim": 3, "width": 0.05}
NEVER_STOP = StageRule(min_steps=10**9, patience=10**9)


def test_masked_adam_without_stopping_is_torch_adam() -> None:
    torch.manual_seed(0)
    G = frozen(build_generator(INFOGAN))
    b = torch.rand(4, 784)
    x0 = uniform_latents(4, 3, seed=1)
    ref, _, used = adam_descent(G, x0, b, None, steps=30, lr=0.01)
    mine, _, n = adam_stage(G, x0, b, None, max_steps=30, lr=0.01, rule=NEVER_STOP)
    # adam_stage returns the best *evaluated* latent; the reference returns the last iterate,
    # so compare against 29 steps of the reference evaluated after its 30th gradient.
    ref29, _, _ = adam_descent(G, x0, b, None, steps=29, lr=0.01)
    assert used == 30 and int(n.max()) == 30
    f_ref29 = 0.5 * (G(ref29).flatten(1) - b).pow(2).sum(1)
    f_ref = 0.5 * (G(ref).flatten(1) - b).pow(2).sum(1)
    f_mine = 0.5 * (G(mine).flatten(1) - b).pow(2).sum(1)
    assert torch.all(f_mine <= torch.minimum(f_ref29, f_ref) + 1e-6)


def test_masked_adam_paths_match_torch_adam_step_by_step() -> None:
    torch.manual_seed(0)
    G = frozen(build_generator(INFOGAN))
    b = torch.rand(3, 784)
    x0 = uniform_latents(3, 3, seed=1)
    for steps in (1, 2, 7):
        ref, _, _ = adam_descent(G, x0, b, None, steps=steps, lr=0.05)
        # one more gradient evaluation lets adam_stage evaluate the reference's last iterate
        rule = StageRule(min_steps=10**9, patience=10**9, rtol=-1.0)  # "improved" = any drop
        mine, f, _ = adam_stage(G, x0, b, None, max_steps=steps + 1, lr=0.05, rule=rule)
        f_ref = 0.5 * (G(ref).flatten(1) - b).pow(2).sum(1)
        assert torch.all(f <= f_ref + 1e-6)


@pytest.mark.parametrize(
    "schedule", ["portfolio", "auto", "adaptive", "adaptive-adam", "lm", "lm-stride"]
)
def test_masked_batches_give_each_target_its_solo_result(tmp_path: Path, schedule: str) -> None:
    store = interpolated_trajectory(tmp_path, "batch", n_ckpt=6)
    G = final_generator(store, "batch")
    with torch.no_grad():
        b = G(uniform_latents(5, 2, seed=1)).flatten(1)
    x0 = uniform_latents(5, 2, seed=2)
    together = surf(generators(store, "batch"), b, x0, schedule=schedule, final_steps=200)
    for i in range(5):
        alone = surf(
            generators(store, "batch"),
            b[i : i + 1],
            x0[i : i + 1],
            schedule=schedule,
            final_steps=200,
        )
        # Stated tolerance: identical up to float32 batch-size effects in the matmuls.
        assert torch.allclose(alone.x, together.x[i : i + 1], atol=1e-5), (schedule, i)


@pytest.mark.parametrize("schedule", ["portfolio", "auto"])
def test_adaptive_surf_recovers_the_planted_optimum_with_fewer_evals(
    tmp_path: Path, schedule: str
) -> None:
    store = interpolated_trajectory(tmp_path, "planted", n_ckpt=8)
    G = final_generator(store, "planted")
    x_star = uniform_latents(6, 2, seed=3)
    with torch.no_grad():
        b = G(x_star).flatten(1)
    x0 = uniform_latents(6, 2, seed=4)
    paper = surf(
        generators(store, "planted"), b, x0, steps=100, lr=0.02, final_steps=1500, schedule="paper"
    )
    fast = surf(
        generators(store, "planted"), b, x0, steps=100, lr=0.02, final_steps=1500, schedule=schedule
    )
    ok_paper = (paper.x - x_star).norm(dim=1) < 1e-2
    ok_fast = (fast.x - x_star).norm(dim=1) < 1e-2
    assert ok_paper.all() and ok_fast.all()
    assert fast.evals < paper.evals / 4
    assert paper.evals == 7 * 100 + 1500  # the paper schedule is unchanged


def test_jacobian_matches_autograd_with_and_without_a() -> None:
    torch.manual_seed(0)
    G = frozen(build_generator(INFOGAN))
    x = uniform_latents(2, 3, seed=5)
    A = gaussian_matrix(0, 20, 784)
    for M in (None, A):
        out, J = jacobian(G, x, M)
        for i in range(2):

            def f(z: torch.Tensor, M: torch.Tensor | None = M) -> torch.Tensor:
                y = G(z[None]).flatten()
                return y if M is None else M @ y

            ref = torch.autograd.functional.jacobian(f, x[i])
            assert torch.allclose(J[i], ref, atol=1e-6, rtol=1e-4)
            assert torch.allclose(out[i], f(x[i]), atol=1e-6)


def test_jacobian_in_cpu_chunks_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU computes the Jacobian a few targets at a time; chunks change nothing."""
    import surfing.lm

    torch.manual_seed(0)
    G = frozen(build_generator(INFOGAN))
    x = uniform_latents(7, 3, seed=5)
    A = gaussian_matrix(0, 20, 784)
    for M in (None, A):
        monkeypatch.setattr(surfing.lm, "CPU_JACOBIAN_ROWS", 10_000)
        out, J = jacobian(G, x, M)
        monkeypatch.setattr(surfing.lm, "CPU_JACOBIAN_ROWS", 8)  # 2 targets per chunk
        out_c, J_c = jacobian(G, x, M)
        assert J_c.shape == J.shape and out_c.shape == out.shape
        torch.testing.assert_close(J_c, J, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out_c, out, atol=1e-6, rtol=1e-5)


def test_lm_converges_in_compressed_sensing_and_keeps_targets_independent() -> None:
    torch.manual_seed(0)
    G = frozen(
        build_generator({"kind": "relu", "latent_dim": 2, "hidden": [20, 60], "out_dim": 100})
    )
    A = gaussian_matrix(1, 10, 100)
    x_star = uniform_latents(4, 2, seed=6)
    with torch.no_grad():
        b = G(x_star) @ A.T
    x0 = x_star + 0.05 * torch.randn(4, 2)
    res = levenberg_marquardt(G, x0, b, A)
    assert (res.x - x_star).norm(dim=1).max() < 1e-4
    solo = levenberg_marquardt(G, x0[2:3], b[2:3], A)
    assert torch.allclose(solo.x, res.x[2:3], atol=1e-6)
    assert int(solo.iters[0]) == int(res.iters[2])


def test_unknown_schedule_is_refused(tmp_path: Path) -> None:
    store = interpolated_trajectory(tmp_path, "s", n_ckpt=2)
    with pytest.raises(ValueError, match="schedule"):
        surf(generators(store, "s"), torch.zeros(1, 100), torch.zeros(1, 2), schedule="fast")


@pytest.mark.parametrize("schedule", ["portfolio", "auto"])
def test_coalesced_jobs_split_back_into_their_solo_results(tmp_path: Path, schedule: str) -> None:
    store = interpolated_trajectory(tmp_path, "jobs", n_ckpt=5)
    G = final_generator(store, "jobs")
    with torch.no_grad():
        b = G(uniform_latents(5, 2, seed=7)).flatten(1)
    x0 = uniform_latents(5, 2, seed=8)
    jobs = [(b[:2], x0[:2]), (b[2:], x0[2:])]
    b_all, x_all = torch.cat([j[0] for j in jobs]), torch.cat([j[1] for j in jobs])
    together = surf(generators(store, "jobs"), b_all, x_all, schedule=schedule)
    parts = split_result(together, [2, 3])
    for (bj, xj), part in zip(jobs, parts, strict=True):
        alone = surf(generators(store, "jobs"), bj, xj, schedule=schedule)
        assert torch.allclose(part.x, alone.x, atol=1e-5)
        assert torch.allclose(part.objective, alone.objective, atol=1e-6, rtol=1e-4)
        assert part.evals == alone.evals
        assert [(t.stage, t.pass_name) for t in part.trace] == [
            (t.stage, t.pass_name) for t in alone.trace
        ]
        if schedule == "auto":  # one pass, every target fitted: no rescue
            assert len(part.trace) == 5
        assert part.trace[-1].objective.shape == (xj.shape[0],)
    with pytest.raises(ValueError, match="add up"):
        split_result(together, [2, 2])


def test_auto_schedule_is_lm_stride_except_with_few_measurements(tmp_path: Path) -> None:
    """auto = lm-stride for A = I and for m > 2k; the paper's schedule for m <= 2k (k = 2)."""
    store = interpolated_trajectory(tmp_path, "auto", n_ckpt=4)
    G = final_generator(store, "auto")
    x0 = uniform_latents(3, 2, seed=9)
    with torch.no_grad():
        y = G(uniform_latents(3, 2, seed=10)).flatten(1)
    cases = ((None, "lm-stride"), (gaussian_matrix(3, 30, 100), "lm-stride"))
    cases += ((gaussian_matrix(3, 5, 100), "lm-stride"),)
    cases += ((gaussian_matrix(3, 4, 100), "paper"),)
    for M, expected in cases:
        b = y if M is None else y @ M.T
        auto = surf(generators(store, "auto"), b, x0, M, steps=3, final_steps=5, schedule="auto")
        same = surf(generators(store, "auto"), b, x0, M, steps=3, final_steps=5, schedule=expected)
        assert torch.equal(auto.x, same.x) and auto.evals == same.evals
    assert resolve_schedule("auto", gaussian_matrix(3, 4, 100), 2) == "paper"
    assert resolve_schedule("auto", None, 2) == "lm-stride"


PLAIN_LM = StageRule(skip_xtol=0.0, reuse_max=0)


def test_lm_stride_without_skipping_or_reuse_is_exactly_plain_lm(tmp_path: Path) -> None:
    store = interpolated_trajectory(tmp_path, "plain", arch=INFOGAN, n_ckpt=6)
    G = final_generator(store, "plain")
    x0 = uniform_latents(4, 3, seed=11)
    with torch.no_grad():
        y = G(uniform_latents(4, 3, seed=12)).flatten(1)
    A = gaussian_matrix(4, 40, 784)
    for M in (None, A):
        b = y if M is None else y @ M.T
        lm = surf(generators(store, "plain"), b, x0, M, schedule="lm")
        same = surf(generators(store, "plain"), b, x0, M, schedule="lm-stride", rule=PLAIN_LM)
        assert torch.equal(lm.x, same.x) and torch.equal(lm.objective, same.objective)
        assert lm.target_evals is not None and same.target_evals is not None
        assert torch.equal(lm.target_evals, same.target_evals)
        for t in same.trace[PLAIN_LM.head_stages : -1]:  # head stages are Adam, not LM
            assert t.action is not None and bool((t.action == FRESH).all())


def test_track_step_skips_only_targets_whose_optimum_did_not_move() -> None:
    torch.manual_seed(0)
    G = frozen(build_generator(RELU_ARCH))
    x_star = uniform_latents(2, 2, seed=13)
    with torch.no_grad():
        b = G(x_star)
    # target 0 starts next to its optimum, target 1 far from it; the network does not change
    x = torch.stack([x_star[0] + 1e-3, x_star[1] + 0.3])
    x1, f1, c1, state, a1 = track_step(G, x, b, None, None, skip_xtol=1e-3, max_age=0)
    assert a1.tolist() == [FRESH, FRESH]  # no stored Jacobian yet: both take a fresh step
    x2, f2, c2, state, a2 = track_step(G, x1, b, None, state, skip_xtol=1e-3, max_age=0)
    assert a2.tolist() == [SKIP, FRESH]
    assert torch.equal(x2[0], x1[0]) and float(c2[0]) == 0.5  # a skip costs one forward pass
    assert float(c2[1]) == 0.5 + (1 + 2) / 2 + 0.5  # a step: forward, Jacobian, trial point
    assert float(f2[1]) < float(f1[1])


def test_chord_steps_reuse_the_jacobian_until_it_is_too_old() -> None:
    torch.manual_seed(0)
    G = frozen(build_generator(RELU_ARCH))
    x_star = uniform_latents(1, 2, seed=14)
    with torch.no_grad():
        b = G(x_star)
    x, state, seen = x_star + 0.2, None, []
    for _ in range(6):
        x, f, c, state, a = track_step(G, x, b, None, state, skip_xtol=0.0, max_age=2)
        seen.append(int(a[0]))
    # fresh, then at most two chord steps per Jacobian (a failed chord step refreshes early)
    assert seen[0] == FRESH and CHORD in seen
    run = 0
    for a in seen:
        run = run + 1 if a == CHORD else 0
        assert run <= 2
    assert all(a in (CHORD, FRESH, CHORD_THEN_FRESH) for a in seen)


def test_lm_stride_mixes_actions_and_each_target_keeps_its_solo_path(tmp_path: Path) -> None:
    store = interpolated_trajectory(tmp_path, "mixed", arch=INFOGAN, n_ckpt=10)
    # float64: in float32 the batch size's rounding flipped a borderline skip/chord decision
    # on one CPU (an Intel Xeon, one thread) and the tiny, non-injective network then fitted
    # the target exactly at another latent; the test is about the decisions, not the rounding.
    stages = [(i, s, copy.deepcopy(G).double()) for i, s, G in generators(store, "mixed")]
    x_star = uniform_latents(6, 3, seed=15).double()
    with torch.no_grad():
        b = stages[-1][2](x_star).flatten(1)
    x0 = uniform_latents(6, 3, seed=16).double()
    rule = StageRule(skip_xtol=0.05, reuse_max=2)
    together = surf(stages, b, x0, schedule="lm-stride", rule=rule)
    acts = torch.stack([t.action for t in together.trace[:-1] if t.action is not None])
    # the batch really mixes per-target decisions, so the comparison below means something
    assert {SKIP, CHORD, FRESH} <= set(acts.unique().tolist())
    assert any(len(set(row.tolist())) > 1 for row in acts)
    for i in range(6):
        alone = surf(stages, b[i : i + 1], x0[i : i + 1], schedule="lm-stride", rule=rule)
        assert torch.allclose(alone.x, together.x[i : i + 1], atol=1e-9), i
        solo_acts = torch.stack([t.action for t in alone.trace[:-1] if t.action is not None])
        assert torch.equal(solo_acts[:, 0], acts[:, i]), i
    assert together.target_evals is not None
    parts = split_result(together, [2, 4])
    stride_stage = next(t for t in parts[1].trace if t.action is not None)
    assert stride_stage.action is not None and stride_stage.action.shape == (4,)


class TwoBasins(torch.nn.Module):
    """G(x) = ((u - 2)(u + 1)^2, u / 10) with u = 4x: for b = G(1/2) the objective is 0 at the
    planted x* = 1/2 and has a second, non-global minimum near x = -1/4 (first residual 0,
    second not). Descent started below x = 1/4 ends in the wrong basin."""

    latent_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = 4 * x
        return torch.cat([(u - 2) * (u + 1) ** 2, u / 10], dim=1)


def two_basin_problem(x0: list[float]) -> tuple[list, torch.Tensor, torch.Tensor]:
    G = TwoBasins()
    stages = [(t, 10 * t, G) for t in range(3)]  # a list can be streamed again
    b = G(torch.full((len(x0), 1), 0.5))
    return stages, b, torch.tensor(x0).unsqueeze(1)


def test_restart_latents_depend_on_the_target_not_its_position() -> None:
    x0 = uniform_latents(6, 3, seed=13)
    first = restart_latents(x0, 1)
    assert first.shape == x0.shape and first.abs().max() <= 1
    assert torch.equal(restart_latents(x0.flip(0), 1), first.flip(0))  # order-free
    assert torch.equal(restart_latents(x0[2:3], 1), first[2:3])  # batch-free
    assert not torch.equal(restart_latents(x0, 2), first)  # a new round, a new start
    assert (first - x0).norm(dim=1).min() > 0


def test_not_fitted_is_relative_to_the_target_and_flags_non_finite() -> None:
    b = torch.tensor([[1.0, 0.0], [100.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    f = torch.tensor([1e-6, 1e-2, float("nan"), 0.0])  # 2f / ||b||^2 = 2e-6, 2e-6, nan, 0/0
    assert not_fitted(f, b, 1e-4).tolist() == [False, False, True, False]
    assert not_fitted(f, b, 1e-6).tolist() == [True, True, True, False]


def test_rescue_restarts_only_the_stuck_targets_and_never_worsens_one() -> None:
    x0 = [-0.9, -0.7, -0.6, -0.5, -0.45, -0.4, 0.6, 0.8]
    stages, b, x_init = two_basin_problem(x0)
    off = surf(stages, b, x_init, schedule="auto", rule=StageRule(rescue_rtol=None))
    on = surf(stages, b, x_init, schedule="auto")
    stuck = (off.x - 0.5).abs().squeeze(1) > 1e-2
    assert stuck[:6].all() and not stuck[6:].any()  # descent from x < 1/4 misses x*
    restart = restart_latents(x_init, 1)
    lucky = stuck & (restart.squeeze(1) > 0.3)  # restarts inside x*'s basin
    assert lucky.any() and (stuck & (restart.squeeze(1) < 0.2)).any()
    solved = (on.x - 0.5).abs().squeeze(1) < 1e-2
    assert torch.equal(solved, ~stuck | lucky)
    assert torch.all(on.objective <= off.objective)
    assert torch.equal(on.x[~stuck], off.x[~stuck])  # fitted targets are left alone
    assert off.target_evals is not None and on.target_evals is not None
    assert torch.equal(on.target_evals[~stuck], off.target_evals[~stuck])
    assert torch.all(on.target_evals[stuck] > off.target_evals[stuck])
    # the rescue pass shows as stages 3..5 of 6, marking the targets it works on
    assert [t.stage for t in on.trace] == list(range(6)) and on.trace[-1].total == 6
    assert on.trace[2].moved is None and on.trace[3].moved is not None
    assert torch.equal(on.trace[3].moved, stuck)
    assert torch.equal(on.trace[3].objective[~stuck], off.objective[~stuck])


def test_rescue_rounds_and_one_shot_streams() -> None:
    stages, b, x_init = two_basin_problem([-0.9, -0.7, -0.6, -0.5, -0.45, -0.4])
    one = surf(stages, b, x_init, schedule="auto")
    two = surf(stages, b, x_init, schedule="auto", rule=StageRule(rescue_rounds=2))
    solved = lambda r: int(((r.x - 0.5).abs() < 1e-2).sum())  # noqa: E731
    assert solved(two) >= solved(one) and torch.all(two.objective <= one.objective)
    assert len(two.trace) in (6, 9)
    once = surf(iter(stages), b, x_init, schedule="auto")  # cannot be streamed twice: no rescue
    plain = surf(stages, b, x_init, schedule="auto", rule=StageRule(rescue_rtol=None))
    assert torch.equal(once.x, plain.x) and len(once.trace) == 3


def test_coalesced_jobs_with_a_rescue_split_back_into_their_solo_results() -> None:
    stages, b, x_init = two_basin_problem([0.6, 0.8, -0.9, -0.7, -0.6, -0.5])
    together = surf(stages, b, x_init, schedule="auto")
    parts = split_result(together, [2, 4])  # job 1 is fitted at once, job 2 needs a rescue
    for (lo, hi), part in zip(((0, 2), (2, 6)), parts, strict=True):
        alone = surf(stages, b[lo:hi], x_init[lo:hi], schedule="auto")
        assert torch.allclose(part.x, alone.x, atol=1e-6)
        assert part.evals == alone.evals
        assert [t.stage for t in part.trace] == [t.stage for t in alone.trace]
    assert len(parts[0].trace) == 3 and len(parts[1].trace) == 6
