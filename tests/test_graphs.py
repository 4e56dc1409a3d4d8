"""The CUDA-graph Adam path (surfing.graphs) computes what torch.optim.Adam computes.

On a CPU the fixed-shape step runs eagerly and must equal torch.optim.Adam bit for bit, which
checks everything except the capture itself (the in-place weight swap, the state reset per
descent, the on-device step counter); the last test checks the capture and runs only where
CUDA is present (scripts/gpu_issue5.sh runs it on the device machine).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from surfing.architectures import build_generator
from surfing.graphs import GraphedAdam, GraphedLMStage
from surfing.lm import levenberg_marquardt
from surfing.measure import gaussian_matrix
from surfing.solvers import StageRule, direct, surf, uniform_latents
from surfing.trajectory import final_generator, frozen, generators
from tests.helpers import interpolated_trajectory

INFOGAN = {"kind": "infogan", "latent_dim": 3, "width": 0.05}


def test_static_adam_step_is_torch_adam() -> None:
    torch.manual_seed(0)
    G = frozen(build_generator(INFOGAN))
    b = torch.rand(4, 784)
    A = gaussian_matrix(3, 30, 784)
    x0 = uniform_latents(4, 3, seed=1)
    for measure in (None, A, None):
        ref = direct(G, b if measure is None else b @ A.T, x0, measure, steps=300, lr=0.01)
        mine = direct(G, b if measure is None else b @ A.T, x0, measure, steps=300, graphs=True)
        assert mine.evals == ref.evals == 300
        assert torch.equal(mine.x, ref.x)  # same operations in the same order: bit for bit
        assert torch.equal(mine.objective, ref.objective)


def test_one_runner_reused_across_networks_starts_each_descent_afresh() -> None:
    """A descent's result must not depend on what the runner descended before."""
    torch.manual_seed(0)
    G1, G2 = frozen(build_generator(INFOGAN)), frozen(build_generator(INFOGAN))
    b = torch.rand(2, 784)
    x0 = uniform_latents(2, 3, seed=4)
    runner = GraphedAdam(G1, b, None, lr=0.02, k=3)
    first, _ = runner.descend(G1, x0, 50)
    on_g2, f2 = runner.descend(G2, x0, 50)
    again, _ = runner.descend(G1, x0, 50)
    fresh_g2 = direct(G2, b, x0, steps=50, lr=0.02)
    assert torch.equal(first, again)
    assert torch.equal(on_g2, fresh_g2.x) and torch.equal(f2, fresh_g2.objective)
    # the caller's networks are read, never written: the runner works on its own copy, and
    # the caller's hooks stay the caller's (a capture would fire them once, replays never)
    calls: list[int] = []
    G1.register_forward_hook(lambda *_: calls.append(1))
    runner = GraphedAdam(G1, b, None, lr=0.02, k=3)
    runner.descend(G1, x0, 5)
    assert calls == [] and len(G1._forward_hooks) == 1
    pairs = zip(runner.G.parameters(), G1.parameters(), strict=True)
    assert all(p.data_ptr() != q.data_ptr() for p, q in pairs)


def test_architecture_change_is_refused() -> None:
    G = frozen(build_generator(INFOGAN))
    other = frozen(
        build_generator({"kind": "relu", "latent_dim": 3, "hidden": [8], "out_dim": 784})
    )
    runner = GraphedAdam(G, torch.rand(1, 784), None, lr=0.01, k=3)
    with pytest.raises(ValueError, match="architecture"):
        runner.descend(other, uniform_latents(1, 3, seed=0), 1)


def test_paper_schedule_with_graphs_matches_the_reference(tmp_path: Path) -> None:
    store = interpolated_trajectory(tmp_path, "g", INFOGAN, n_ckpt=5)  # batch norm: buffers too
    G = final_generator(store, "g")
    with torch.no_grad():
        b = G(uniform_latents(3, 3, seed=1)).flatten(1)
    x0 = uniform_latents(3, 3, seed=2)
    kw = {"schedule": "paper", "steps": 20, "final_steps": 200}
    ref = surf(generators(store, "g"), b, x0, **kw)
    mine = surf(generators(store, "g"), b, x0, graphs=True, **kw)
    assert mine.evals == ref.evals == 4 * 20 + 200
    assert torch.equal(mine.x, ref.x)
    for a, r in zip(mine.trace, ref.trace, strict=True):
        assert torch.equal(a.objective, r.objective)


def test_lm_stage_is_one_levenberg_marquardt_iteration() -> None:
    torch.manual_seed(0)
    G = frozen(build_generator(INFOGAN))
    x0 = uniform_latents(5, 3, seed=3)
    with torch.no_grad():
        b = G(uniform_latents(5, 3, seed=4)).flatten(1)
    A = gaussian_matrix(3, 40, 784)
    for measure, rhs in ((None, b), (A, b @ A.T)):
        ref = levenberg_marquardt(G, x0, rhs, measure, max_iters=1)
        x, f, evals = GraphedLMStage(G, rhs, measure, k=3).step(G, x0)
        assert torch.equal(x, ref.x) and torch.equal(f, ref.objective)
        assert torch.equal(evals, ref.evals)


def test_lm_stage_with_retries_is_levenberg_marquardt_until_its_first_accepted_step() -> None:
    """Rejected trials are retried with more damping on the same Jacobian. Targets that need
    a second trial run it in a smaller batch in levenberg_marquardt: equal up to rounding."""
    torch.manual_seed(0)
    G = frozen(build_generator(INFOGAN))
    x0 = uniform_latents(16, 3, seed=3)
    b = torch.rand(16, 784)  # off-range targets: many first trials overshoot and are rejected
    ref = levenberg_marquardt(G, x0, b, None, max_iters=3, max_accepts=1)
    one = levenberg_marquardt(G, x0, b, None, max_iters=1)
    assert (ref.evals > one.evals).any(), "no target needed a retry: the test checks nothing"
    assert int(ref.iters.max()) == 1  # one Jacobian: the stage ends at the first accepted step
    x, f, evals = GraphedLMStage(G, b, None, k=3, trials=3).step(G, x0)
    assert torch.equal(evals, ref.evals)
    torch.testing.assert_close(x, ref.x, rtol=0, atol=1e-5)
    torch.testing.assert_close(f, ref.objective, rtol=1e-4, atol=1e-9)


def test_lm_stage_leaves_a_solved_target_alone() -> None:
    """f < ftol: levenberg_marquardt drops the target from its batch, the graph masks it. The
    other targets then run in batches of different sizes, so they agree up to rounding."""
    torch.manual_seed(0)
    G = frozen(build_generator(INFOGAN))
    x0 = uniform_latents(5, 3, seed=3)
    with torch.no_grad():
        b = G(uniform_latents(5, 3, seed=4)).flatten(1)
        b[2] = G(x0[2:3]).flatten(1)[0]
    ref = levenberg_marquardt(G, x0, b, None, max_iters=1)
    x, f, evals = GraphedLMStage(G, b, None, k=3).step(G, x0)
    assert torch.equal(x[2], x0[2]) and float(evals[2]) == (1 + 3) / 2  # its Jacobian only
    assert torch.equal(evals, ref.evals)
    torch.testing.assert_close(x, ref.x, rtol=0, atol=1e-5)
    torch.testing.assert_close(f, ref.objective, rtol=0.05, atol=1e-9)


@pytest.mark.parametrize("m", [0, 60])
def test_lm_schedule_with_graphs_matches_the_reference(tmp_path: Path, m: int) -> None:
    """One trial per stage: bit for bit (the default's retries: see the test above)."""
    store = interpolated_trajectory(tmp_path, "l", INFOGAN, n_ckpt=6)
    G = final_generator(store, "l")
    A = gaussian_matrix(5, m, 784) if m else None
    with torch.no_grad():
        y = G(uniform_latents(4, 3, seed=1)).flatten(1)
    b = y if A is None else y @ A.T
    x0 = uniform_latents(4, 3, seed=2)
    one = StageRule(lm_stage_trials=1)
    ref = surf(generators(store, "l"), b, x0, A, schedule="lm", rule=one)
    mine = surf(generators(store, "l"), b, x0, A, schedule="lm", rule=one, graphs=True)
    assert torch.equal(mine.x, ref.x) and torch.equal(mine.target_evals, ref.target_evals)
    for a, r in zip(mine.trace, ref.trace, strict=True):
        assert torch.equal(a.objective, r.objective)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the capture needs a CUDA device")
def test_captured_graph_matches_eager_adam_on_the_gpu(tmp_path: Path) -> None:
    store = interpolated_trajectory(tmp_path, "gpu", INFOGAN, n_ckpt=4)
    G = final_generator(store, "gpu", "cuda")
    with torch.no_grad():
        b = G(uniform_latents(8, 3, seed=1, device="cuda")).flatten(1)
    x0 = uniform_latents(8, 3, seed=2, device="cuda")
    ref = direct(G, b, x0, steps=300)
    mine = direct(G, b, x0, steps=300, graphs=True)
    # torch.optim.Adam takes its multi-tensor path on a GPU: equal up to rounding there
    assert (mine.x - ref.x).abs().max() < 1e-4
    kw = {"schedule": "paper", "steps": 20, "final_steps": 100}
    ref = surf(generators(store, "gpu", device="cuda"), b, x0, **kw)
    mine = surf(generators(store, "gpu", device="cuda"), b, x0, graphs=True, **kw)
    assert (mine.x - ref.x).abs().max() < 1e-4
    ref = surf(generators(store, "gpu", device="cuda"), b, x0, schedule="lm")
    mine = surf(generators(store, "gpu", device="cuda"), b, x0, schedule="lm", graphs=True)
    assert (mine.x - ref.x).abs().max() < 1e-4
