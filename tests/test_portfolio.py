"""The default schedule, "portfolio" (surfing.portfolio): lm_restarts on G_T, then a surf of
the trajectory for the targets it left unfitted, per target the lower objective.

Each property is checked against the parts run on their own: lm_restarts with the same rounds
and salt, surf (lm-stride) from the same x_init. Tiny networks: the two-basin toy of
tests/test_perf_solvers.py (LM from x < ~1/4 ends in the wrong basin) and the interpolated
ReLU trajectory of tests/helpers.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from surfing.portfolio import (
    FEW_MEASUREMENT_ROUNDS,
    FIRST_PHASE_SALT,
    MISS_RTOL,
    PORTFOLIO_ROUNDS,
    portfolio,
    portfolio_rounds,
)
from surfing.solvers import (
    DEFAULT_SCHEDULE,
    RESCUE_MARGIN,
    SolveResult,
    StageRule,
    lm_restarts,
    not_fitted,
    restart_latents,
    split_result,
    surf,
    uniform_latents,
)
from surfing.trajectory import final_generator, generators
from tests.helpers import interpolated_trajectory
from tests.test_perf_solvers import TwoBasins

X_STAR = 0.5  # TwoBasins' planted optimum
T = 3  # stages of the toy stream


class Stream:
    """A toy stage stream: T stages, each its own TwoBasins module (all equal in value), and a
    separate G_T for `final()`, like surfing.trajectory.Generators. Counts how often it is
    read (passes started) and, per module, the rows of every forward pass."""

    def __init__(self) -> None:
        self.stages = [(t, 10 * t, TwoBasins()) for t in range(T)]
        self.G_T = TwoBasins()
        self.iterations = 0
        self.rows: dict[int, list[int]] = {id(G): [] for _, _, G in self.stages}
        self.rows[id(self.G_T)] = []
        for G in [*(s[2] for s in self.stages), self.G_T]:
            G.register_forward_hook(self._seen)

    def _seen(self, module: nn.Module, inputs: Any, _output: Any) -> None:
        self.rows[id(module)].append(int(inputs[0].shape[0]))

    def __len__(self) -> int:
        return T

    def final(self) -> tuple[int, int, nn.Module]:
        return T - 1, 10 * (T - 1), self.G_T

    def __iter__(self) -> Iterator[tuple[int, int, nn.Module]]:
        self.iterations += 1  # counted when the pass starts (Generators loads nothing before)
        yield from self.stages

    def stage_rows(self) -> list[int]:
        return [r for _, _, G in self.stages for r in self.rows[id(G)]]


def two_basins(x0: list[float] | None = None, off: bool = False) -> tuple[torch.Tensor, ...]:
    """(b, x_init): targets G(1/2), started from x0 (default 24 points across [-0.95, 0.95]);
    `off` moves b off the range of G, so that no target is ever fitted."""
    x = torch.linspace(-0.95, 0.95, 24) if x0 is None else torch.tensor(x0)
    x_init = x.unsqueeze(1)
    b = TwoBasins()(torch.full_like(x_init, X_STAR))
    return (b + torch.tensor([0.05, -0.03]) if off else b), x_init


def first_phase(b: torch.Tensor, x_init: torch.Tensor, rounds: int = PORTFOLIO_ROUNDS):
    """What portfolio's phase 1 computes, run on its own."""
    return lm_restarts(TwoBasins(), b, x_init, None, rounds, MISS_RTOL, FIRST_PHASE_SALT)


def assert_same(a: SolveResult, b: SolveResult, exact: bool = True) -> None:
    assert a.target_evals is not None and b.target_evals is not None
    if exact:
        assert torch.equal(a.x, b.x) and torch.equal(a.objective, b.objective)
    else:  # another batch: float32 rounding of the batched matmuls
        assert torch.allclose(a.x, b.x, atol=1e-6)
        assert torch.allclose(a.objective, b.objective, atol=1e-7, rtol=1e-4)
    assert torch.equal(a.target_evals, b.target_evals)


def test_portfolio_is_the_default_and_surf_dispatches_to_it() -> None:
    assert DEFAULT_SCHEDULE == "portfolio"
    b, x_init = two_basins()
    assert_same(surf(Stream(), b, x_init), portfolio(Stream(), b, x_init))


# ---- (a) never worse than either part ------------------------------------------------------


def check_never_worse(stages_fn: Any, G_T: nn.Module, b: torch.Tensor, x_init: torch.Tensor):
    port = surf(stages_fn(), b, x_init, steps=10, final_steps=50)
    lm = lm_restarts(G_T, b, x_init, None, PORTFOLIO_ROUNDS, MISS_RTOL, FIRST_PHASE_SALT)
    alone = surf(stages_fn(), b, x_init, steps=10, final_steps=50, schedule="lm-stride")
    surfed = not_fitted(lm.objective, b, MISS_RTOL)
    # never above phase 1 alone: it is phase 1's result unless the surf was clearly lower
    assert torch.all(port.objective <= lm.objective)
    # never above the surf alone (up to the margin that keeps float noise from choosing)
    bound = alone.objective[surfed] / (1 - RESCUE_MARGIN) + 1e-7
    assert torch.all(port.objective[surfed] <= bound)
    # and it is one of the two, per target
    took_lm = (port.objective - lm.objective).abs() < 1e-7
    took_surf = (port.objective - alone.objective).abs() <= 1e-6 * alone.objective + 1e-7
    assert torch.all(took_lm | (surfed & took_surf))
    # the targets phase 1 fitted keep its result, fitted
    assert torch.equal(port.x[~surfed], lm.x[~surfed])
    assert not not_fitted(port.objective[~surfed], b[~surfed], MISS_RTOL).any()
    return port, lm, alone, surfed


@pytest.mark.parametrize("off", [False, True])
def test_never_worse_than_lm_restarts_or_surfing_alone_on_two_basins(off: bool) -> None:
    b, x_init = two_basins(off=off)
    port, lm, alone, surfed = check_never_worse(Stream, TwoBasins(), b, x_init)
    assert surfed.any() and (surfed.all() if off else (~surfed).any())
    if not off:  # the surf rescues some target phase 1 missed
        assert (port.objective[surfed] < lm.objective[surfed] * (1 - RESCUE_MARGIN)).any()


def test_never_worse_on_a_trajectory_with_targets_on_and_off_the_range(tmp_path: Path) -> None:
    store = interpolated_trajectory(tmp_path, "mix", n_ckpt=6)
    G_T = final_generator(store, "mix")
    with torch.no_grad():
        y = G_T(uniform_latents(8, 2, seed=3)).flatten(1)
    y[4:] += 0.05 * torch.randn(4, y.shape[1], generator=torch.Generator().manual_seed(1))
    x_init = uniform_latents(8, 2, seed=4)
    _, _, _, surfed = check_never_worse(lambda: generators(store, "mix"), G_T, y, x_init)
    assert surfed[4:].all()  # off the range: never fitted, so always surfed


# ---- (b) what phase 2 works on ---------------------------------------------------------------


def test_phase_2_rescues_from_starts_phase_1_has_not_tried() -> None:
    """Phase 1's restarts are salted apart from the surf's rescue draws (salt 0): a target
    that reaches the rescue starts somewhere new."""
    x_init = uniform_latents(16, 3, seed=5)
    tried = [restart_latents(x_init, r, "uniform", FIRST_PHASE_SALT)
             for r in range(1, PORTFOLIO_ROUNDS + 1)]  # fmt: skip
    for r in range(1, 3):
        rescue = restart_latents(x_init, r)
        assert all((rescue - t).norm(dim=1).min() > 0 for t in tried)


def test_surfs_exactly_the_targets_lm_restarts_left_unfitted() -> None:
    b, x_init = two_basins()
    missed = not_fitted(first_phase(b, x_init).objective, b, MISS_RTOL)
    assert missed.any() and (~missed).any()
    stream = Stream()
    res = surf(stream, b, x_init)
    # G_T (phase 1): the whole batch first, then only restarted rows; the stream's stages:
    # only the rows of the missed targets, in every surf and rescue pass
    assert stream.rows[id(stream.G_T)][0] == b.shape[0]
    assert max(stream.stage_rows()) == int(missed.sum())
    later = [t for t in res.trace if t.pass_name in ("surf", "rescue")]
    assert [t.index for t in later[:T]] == list(range(T))
    assert stream.iterations == len({(t.pass_name, t.pass_round) for t in later}) >= 1
    assert all(t.moved is not None for t in later)
    assert all(torch.equal(t.moved, missed) for t in later if t.pass_name == "surf")
    assert all(not (t.moved & ~missed).any() for t in later)  # a rescue: a subset of them
    # phase 1's passes are lm_restarts' own, with its objectives
    head = res.trace[: len(res.trace) - len(later)]
    assert [(t.pass_name, t.pass_round) for t in head] == [
        (t.pass_name, t.pass_round) for t in first_phase(b, x_init).trace
    ]


def test_a_batch_that_lm_fits_never_touches_the_stream() -> None:
    b, x_init = two_basins([0.3, 0.45, 0.6, 0.8, 0.95])  # all in x*'s basin
    stream = Stream()
    res = surf(stream, b, x_init)
    assert stream.iterations == 0 and stream.stage_rows() == []
    assert [t.pass_name for t in res.trace] == ["final"]
    assert_same(res, first_phase(b, x_init))
    assert ((res.x - X_STAR).abs() < 1e-4).all()


# ---- (c) deterministic, batch-free ----------------------------------------------------------


def test_deterministic_and_independent_of_batch_position() -> None:
    b, x_init = two_basins()
    a, again = surf(Stream(), b, x_init), surf(Stream(), b, x_init)
    assert_same(a, again)
    pairs = zip(a.trace, again.trace, strict=True)
    assert all(t.moved is None or torch.equal(t.moved, u.moved) for t, u in pairs)
    perm = torch.randperm(b.shape[0], generator=torch.Generator().manual_seed(0))
    shuffled = surf(Stream(), b[perm], x_init[perm])
    assert shuffled.target_evals is not None and a.target_evals is not None
    assert torch.allclose(shuffled.x, a.x[perm], atol=1e-6)
    assert torch.equal(shuffled.target_evals, a.target_evals[perm])


def test_a_coalesced_batch_splits_into_the_solo_results() -> None:
    b, x_init = two_basins()
    fitted = ~not_fitted(first_phase(b, x_init, rounds=0).objective, b, MISS_RTOL)
    # job 1: every target fitted by the first LM solve; job 2: some not; job 3: off the range
    b_off, x_off = two_basins([-0.9, -0.5, 0.7], off=True)
    jobs = [(b[fitted][:3], x_init[fitted][:3]), (b[:8], x_init[:8]), (b_off, x_off)]
    together = surf(Stream(), torch.cat([j[0] for j in jobs]), torch.cat([j[1] for j in jobs]))
    parts = split_result(together, [len(j[0]) for j in jobs])
    for (bj, xj), part in zip(jobs, parts, strict=True):
        alone = surf(Stream(), bj, xj)
        assert_same(part, alone, exact=False)
        assert part.evals == alone.evals
        assert [(t.stage, t.total, t.pass_name, t.pass_round) for t in part.trace] == [
            (t.stage, t.total, t.pass_name, t.pass_round) for t in alone.trace
        ]
        # the batch's points: the job's own, then (passes only other jobs needed) its result
        n = len(alone.rounds)
        assert [r.name for r in part.rounds[:n]] == [r.name for r in alone.rounds]
        padded = alone.rounds + [alone.rounds[-1]] * (len(part.rounds) - n)
        for mine, ref in zip(part.rounds, padded, strict=True):
            assert torch.allclose(mine.objective, ref.objective, atol=1e-7, rtol=1e-4)
            assert torch.equal(mine.target_evals, ref.target_evals)
    assert [t.pass_name for t in parts[0].trace] == ["final"]  # job 1 never surfed
    assert "surf" in [t.pass_name for t in parts[2].trace]


# ---- (d) round points --------------------------------------------------------------------------


def assert_point(point: Any, res: SolveResult) -> None:
    assert torch.equal(point.x, res.x) and torch.equal(point.objective, res.objective)
    assert torch.equal(point.target_evals, res.target_evals)


def test_each_lm_restarts_point_is_the_run_stopped_there() -> None:
    b, x_init = two_basins(off=True)  # every target takes every round
    full = lm_restarts(TwoBasins(), b, x_init, rounds=3)
    assert [p.name for p in full.rounds] == ["final", "restart 1", "restart 2", "restart 3"]
    for r, point in enumerate(full.rounds):
        assert_point(point, lm_restarts(TwoBasins(), b, x_init, rounds=r))


def test_each_surf_point_is_the_run_stopped_there() -> None:
    b, x_init = two_basins()
    full = surf(Stream(), b, x_init, schedule="lm-stride", rule=StageRule(rescue_rounds=2))
    names = [p.name for p in full.rounds]
    assert names[0] == "surf" and names[1:] == [f"rescue {r}" for r in range(1, len(names))]
    assert len(names) >= 2  # the toy needs at least one rescue round
    off = surf(Stream(), b, x_init, schedule="lm-stride", rule=StageRule(rescue_rtol=None))
    assert_point(full.rounds[0], off)
    for r, point in enumerate(full.rounds[1:], start=1):
        stopped = surf(Stream(), b, x_init, schedule="lm-stride", rule=StageRule(rescue_rounds=r))
        assert_point(point, stopped)


def test_each_portfolio_point_is_the_run_stopped_there() -> None:
    b, x_init = two_basins()
    full = portfolio(Stream(), b, x_init, rule=StageRule(rescue_rounds=2))
    names = [p.name for p in full.rounds]
    restarts = [f"restart {r}" for r in range(1, PORTFOLIO_ROUNDS + 1)]
    assert names[: PORTFOLIO_ROUNDS + 2] == ["final", *restarts, "surf"]
    assert_point(full.rounds[-1], full)
    # phase 1's points: lm_restarts with fewer rounds, and portfolio's own rounds option
    for r in range(PORTFOLIO_ROUNDS + 1):
        assert_point(full.rounds[r], first_phase(b, x_init, rounds=r))
        fewer = portfolio(Stream(), b, x_init, rounds=r, rule=StageRule(rescue_rounds=2))
        for p, q in zip(fewer.rounds[: r + 1], full.rounds[: r + 1], strict=True):
            assert p.name == q.name
            assert_point(p, SolveResult(q.x, q.objective, 0, target_evals=q.target_evals))
    # phase 2's points: the portfolio without its rescue, then with 1, 2 rescue rounds
    surf_at = PORTFOLIO_ROUNDS + 1
    assert_point(full.rounds[surf_at], portfolio(Stream(), b, x_init,
                                                 rule=StageRule(rescue_rtol=None)))  # fmt: skip
    for r, point in enumerate(full.rounds[surf_at + 1 :], start=1):
        assert point.name == f"rescue {r}"
        assert_point(point, portfolio(Stream(), b, x_init, rule=StageRule(rescue_rounds=r)))
    # cumulative cost never falls and the objective never rises, point to point
    for p, q in zip(full.rounds, full.rounds[1:], strict=False):
        assert torch.all(q.target_evals >= p.target_evals)
        assert torch.all(q.objective <= p.objective)


# ---- (e) streams without final() ---------------------------------------------------------------


def test_a_one_shot_stream_without_final_is_refused_clearly() -> None:
    b, x_init = two_basins([0.6])
    stages = Stream().stages
    with pytest.raises(TypeError, match=r"final\(\)"):
        surf(iter(stages), b, x_init)
    with pytest.raises(TypeError, match="portfolio"):
        surf((s for s in stages), b, x_init, schedule="portfolio")
    with pytest.raises(ValueError, match="at least one checkpoint"):
        surf([], b, x_init)
    assert_same(surf(stages, b, x_init), surf(tuple(stages), b, x_init))  # lists, tuples: fine
    assert surf(iter(stages), b, x_init, schedule="auto").x.shape == (1, 1)  # others: fine


def test_the_default_rounds_follow_the_number_of_measurements() -> None:
    """m <= 3k: FEW_MEASUREMENT_ROUNDS restart rounds before surfing, else PORTFOLIO_ROUNDS;
    the first phase is then exactly lm_restarts with that many rounds."""
    b, x_init = two_basins(off=True)  # never fitted: every round runs
    ident = torch.eye(2)  # m = 2 measurements of the k = 1 toy: m <= 3k
    few, plain = portfolio(Stream(), b, x_init, ident), portfolio(Stream(), b, x_init)

    def restarts(res: SolveResult) -> list[str]:
        return [p.name for p in res.rounds if p.name.startswith("restart")]

    assert restarts(few) == [f"restart {r}" for r in range(1, FEW_MEASUREMENT_ROUNDS + 1)]
    assert restarts(plain) == [f"restart {r}" for r in range(1, PORTFOLIO_ROUNDS + 1)]
    ref = lm_restarts(TwoBasins(), b, x_init, ident, FEW_MEASUREMENT_ROUNDS, MISS_RTOL,
                      FIRST_PHASE_SALT)  # fmt: skip
    assert_point(few.rounds[FEW_MEASUREMENT_ROUNDS], ref)
    one = surf(Stream(), b, x_init, ident, rounds=1)  # a caller's round count wins
    assert restarts(one) == ["restart 1"]
    with pytest.raises(ValueError, match="portfolio"):
        surf(Stream(), b, x_init, ident, schedule="lm-stride", rounds=1)
    few_r, plain_r = FEW_MEASUREMENT_ROUNDS, PORTFOLIO_ROUNDS
    assert [portfolio_rounds(m, 1) for m in (None, 1, 3, 4)] == [plain_r, few_r, few_r, plain_r]
    assert [portfolio_rounds(m, 20) for m in (50, 60, 61)] == [few_r, few_r, plain_r]
