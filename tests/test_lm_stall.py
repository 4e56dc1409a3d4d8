"""The stall stop of Levenberg–Marquardt (`stall`, StageRule.lm_stall in lm_restarts).

On the two-basin toy, LM from x < ~1/4 creeps into a minimum with a non-zero residual. With
the stall stop those targets stop early (fewer evaluations, an objective no lower), while every
target that fits follows exactly the path it follows without it; restarts then fix the same
targets as before at a lower cost.
"""

from __future__ import annotations

import torch

from surfing.lm import levenberg_marquardt
from surfing.solvers import StageRule, fit_line, lm_restarts, not_fitted
from tests.test_lm_restarts import X_STAR, at_x_star, two_basins

RTOL = 1e-4


def test_only_targets_that_do_not_fit_stop_early() -> None:
    G, b, x_init = two_basins(48)
    plain = levenberg_marquardt(G, x_init, b, None, max_iters=40)
    stalled = levenberg_marquardt(
        G, x_init, b, None, max_iters=40, stall=0.01, stall_above=fit_line(b, RTOL)
    )
    fits = ~not_fitted(plain.objective, b, RTOL)
    assert fits.any() and (~fits).any()
    # a target that fits takes the very same steps
    assert torch.equal(stalled.x[fits], plain.x[fits])
    assert torch.equal(stalled.evals[fits], plain.evals[fits])
    # one that does not stops no later, never below where the full run ended, and still misses
    assert torch.all(stalled.evals[~fits] <= plain.evals[~fits])
    assert torch.all(stalled.objective[~fits] >= plain.objective[~fits])
    assert torch.all(not_fitted(stalled.objective[~fits], b[~fits], RTOL))
    saved = plain.evals[~fits] - stalled.evals[~fits]
    assert (saved > 0).float().mean() > 0.5  # it fires on most of them
    # the stopped point is where two accepted steps crept: one more LM iteration from it
    # lowers f by less than 1 % (or not at all)
    more = levenberg_marquardt(G, stalled.x[~fits], b[~fits], None, max_iters=1)
    assert torch.all(more.objective >= 0.99 * stalled.objective[~fits] - 1e-12)


def test_off_without_a_line_and_never_for_targets_under_it() -> None:
    G, b, x_init = two_basins(24)
    plain = levenberg_marquardt(G, x_init, b, None, max_iters=40)
    no_line = levenberg_marquardt(G, x_init, b, None, max_iters=40, stall=0.01)
    high_line = levenberg_marquardt(
        G, x_init, b, None, max_iters=40, stall=0.01, stall_above=torch.full((24,), 1e9)
    )
    for other in (no_line, high_line):
        assert torch.equal(other.x, plain.x) and torch.equal(other.evals, plain.evals)


def test_restarts_with_the_stall_fix_the_same_targets_for_less() -> None:
    G, b, x_init = two_basins(48)
    for seed in (0, 7):
        full = lm_restarts(
            G, b, x_init, rounds=3, rtol=RTOL, seed=seed, rule=StageRule(lm_stall=0.0)
        )
        cut = lm_restarts(G, b, x_init, rounds=3, rtol=RTOL, seed=seed)  # the default: 0.01
        assert StageRule().lm_stall == 0.01
        assert torch.equal(at_x_star(cut.x), at_x_star(full.x))
        assert full.target_evals is not None and cut.target_evals is not None
        assert torch.all(cut.target_evals <= full.target_evals)
        assert cut.evals < full.evals
        assert torch.allclose(cut.x[at_x_star(cut.x)], torch.tensor(X_STAR), atol=1e-3)
