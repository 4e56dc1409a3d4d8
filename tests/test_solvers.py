"""The objective, the solvers and the measurement matrix on tiny networks."""

from __future__ import annotations

import torch

from surfing.architectures import build_generator
from surfing.measure import gaussian_matrix, measure
from surfing.portfolio import PORTFOLIO_ROUNDS
from surfing.solvers import (
    StageRule,
    direct,
    direct_restarts,
    hybrid,
    objective,
    polish,
    surf,
    uniform_latents,
)
from surfing.trajectory import final_generator, generators
from tests.helpers import RELU_ARCH, interpolated_trajectory


def test_objective_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    G = build_generator({"kind": "infogan", "latent_dim": 3, "width": 0.05}).double().eval()
    A = gaussian_matrix(1, 30, 784).double()
    b = torch.randn(2, 30, dtype=torch.float64)
    x = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    objective(G, x, b, A).sum().backward()
    eps, numeric = 1e-6, torch.zeros_like(x)
    for i in range(2):
        for j in range(3):
            e = torch.zeros_like(x)
            e[i, j] = eps
            with torch.no_grad():
                hi, lo = objective(G, x + e, b, A)[i], objective(G, x - e, b, A)[i]
            numeric[i, j] = (hi - lo) / (2 * eps)
    assert torch.allclose(x.grad, numeric, rtol=1e-5, atol=1e-7)


def test_gaussian_matrix_is_reproducible_and_scaled() -> None:
    a, b = gaussian_matrix(7, 50, 784), gaussian_matrix(7, 50, 784)
    assert torch.equal(a, b)
    assert not torch.equal(a, gaussian_matrix(8, 50, 784))
    assert a.shape == (50, 784) and a.dtype == torch.float32
    assert abs(float(a.var()) * 50 - 1.0) < 0.05  # N(0, 1/m) entries
    # documented generator, written out: a client can rebuild A without our code
    g = torch.Generator().manual_seed(7)
    assert torch.equal(a, torch.randn(50, 784, generator=g) / 50**0.5)


def test_surf_recovers_planted_optimum(tmp_path) -> None:
    store = interpolated_trajectory(tmp_path, "planted", n_ckpt=8)
    G = final_generator(store, "planted")
    x_star = uniform_latents(4, 2, seed=3)
    with torch.no_grad():
        b = measure(G(x_star), None)
    res = surf(
        generators(store, "planted"),
        b,
        uniform_latents(4, 2, seed=4),
        steps=40,
        lr=0.02,
        final_steps=400,
        schedule="paper",
    )
    assert (res.x - x_star).norm(dim=1).max() < 1e-2
    assert len(res.trace) == 8 and res.trace[-1].steps_used == 400
    assert res.evals == 7 * 40 + 400


def test_batched_solve_equals_one_by_one(tmp_path) -> None:
    store = interpolated_trajectory(tmp_path, "batch")
    G = final_generator(store, "batch")
    b = measure(G(uniform_latents(3, 2, seed=1)), None)
    x0 = uniform_latents(3, 2, seed=2)
    together = surf(generators(store, "batch"), b, x0, steps=10, final_steps=50)
    for i in range(3):
        alone = surf(
            generators(store, "batch"), b[i : i + 1], x0[i : i + 1], steps=10, final_steps=50
        )
        assert torch.allclose(alone.x, together.x[i : i + 1], atol=1e-5)


def test_restarts_keep_the_lowest_objective_and_hybrid_is_never_worse(tmp_path) -> None:
    store = interpolated_trajectory(tmp_path, "restarts")
    G = final_generator(store, "restarts")
    b = measure(G(uniform_latents(5, 2, seed=1)), None) + 0.05 * torch.randn(5, 100)
    x0 = uniform_latents(5, 2, seed=2)
    single = direct(G, b, x0, steps=200)
    multi = direct_restarts(G, b, restarts=4, seed=9, x_init=x0, steps=200)
    assert (multi.objective <= single.objective + 1e-6).all()
    assert multi.evals == 4 * 200
    surfed = surf(generators(store, "restarts"), b, x0, steps=10, final_steps=200)
    mixed = hybrid(
        generators(store, "restarts"),
        b,
        x0,
        restarts=4,
        seed=9,
        steps=10,
        final_steps=200,
        direct_steps=200,
    )
    restarted = direct_restarts(G, b, restarts=4, seed=9, steps=200)
    assert (mixed.objective <= surfed.objective + 1e-6).all()
    assert (mixed.objective <= restarted.objective + 1e-6).all()


def test_polish_converges_and_never_raises_the_objective(tmp_path) -> None:
    """Short Adam runs stop short of x*; polishing them by LM reaches it (exact targets)."""
    store = interpolated_trajectory(tmp_path, "polish")
    G = final_generator(store, "polish")
    x_star = uniform_latents(6, 2, seed=1)
    b = measure(G(x_star), None)
    rough = direct(G, b, x_star + 0.05, steps=20)  # near x*, not converged
    fine = polish(G, rough, b)
    assert (fine.objective <= rough.objective).all()
    assert float((fine.x - x_star).norm(dim=1).max()) < 0.1 * float(
        (rough.x - x_star).norm(dim=1).max()
    )
    assert fine.evals > rough.evals


def test_progress_callback_sees_every_stage_and_can_abort(tmp_path) -> None:
    store = interpolated_trajectory(tmp_path, "progress", n_ckpt=5)
    b = torch.zeros(1, 100)
    seen = []
    surf(
        generators(store, "progress"),
        b,
        torch.zeros(1, 2),
        steps=2,
        final_steps=2,
        progress=seen.append,
        schedule="auto",
        rule=StageRule(rescue_rtol=None),  # b = 0 is off the range: it would be rescued
    )
    assert [s.stage for s in seen] == [0, 1, 2, 3, 4] and seen[0].total == 5

    # the default (portfolio): LM on G_T and its restart rounds, then the surf of the target
    # none of them fitted (b = 0 never is); stages count on across the passes
    seen.clear()
    surf(generators(store, "progress"), b, torch.zeros(1, 2), steps=2, final_steps=2,
         progress=seen.append, rule=StageRule(rescue_rtol=None))  # fmt: skip
    on_g_t = [("final", None)] + [("restart", r) for r in range(1, PORTFOLIO_ROUNDS + 1)]
    n = len(on_g_t) + 5
    assert [s.stage for s in seen] == list(range(n))
    assert [(s.pass_name, s.pass_round) for s in seen] == on_g_t + [("surf", None)] * 5
    assert [s.index for s in seen] == [4] * len(on_g_t) + [0, 1, 2, 3, 4]
    assert all(s.stage < s.total for s in seen) and seen[-1].total == n

    class Stop(Exception):
        pass

    def stop_at_two(info):
        if info.stage == 2:
            raise Stop

    try:
        surf(generators(store, "progress"), b, torch.zeros(1, 2), steps=2, progress=stop_at_two)
    except Stop:
        pass
    else:
        raise AssertionError("raising from progress must abort the solve")


def test_stride_keeps_first_and_last(tmp_path) -> None:
    store = interpolated_trajectory(tmp_path, "stride", n_ckpt=6)
    stages = generators(store, "stride", stride=4)
    assert len(stages) == 3
    assert [index for index, _, _ in stages] == [0, 4, 5]


def test_generator_is_in_eval_mode_so_targets_do_not_interact() -> None:
    G = build_generator({"kind": "infogan", "latent_dim": 2, "width": 0.05}).eval()
    x = torch.rand(4, 2)
    assert torch.allclose(G(x)[:1], G(x[:1]), atol=1e-6)
    assert RELU_ARCH["kind"] == "relu"
