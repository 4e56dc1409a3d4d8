"""Stage t of a surfing pass evaluates checkpoint t: looked at in the weights, not the labels.

Every checkpoint of the tiny trajectory carries its own index in the batch-norm counters
(`tag_checkpoint`; eval mode never reads them). A global forward hook records, for every pass
through a generator, the index its weights say, and the solver's progress callback marks where
each stage ends, so each test can compare what was computed with what the trace claims.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import surfing.lm
from models_store import ModelStore
from surfing.measure import gaussian_matrix
from surfing.nets import InfoGANGenerator
from surfing.portfolio import FIRST_PHASE_SALT, PORTFOLIO_ROUNDS
from surfing.solvers import (
    SCHEDULES,
    StageRule,
    StageTrace,
    direct,
    hybrid,
    lm_restarts,
    surf,
    uniform_latents,
)
from surfing.trajectory import final_generator, generators
from tests.conftest import checkpoint_tag, make_tiny_trajectory, tiny_target

N_CKPT = 7
STEPS, FINAL = 3, 5


@dataclass
class Evaluations:
    """Forward passes seen (checkpoint tag, batch rows), cut into stages by `on_stage`."""

    passes: list[tuple[int, int]] = field(default_factory=list)
    stages: list[tuple[StageTrace, list[tuple[int, int]]]] = field(default_factory=list)

    def hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(module, InfoGANGenerator):
            self.passes.append((checkpoint_tag(module), int(inputs[0].shape[0])))

    def on_stage(self, info: StageTrace) -> None:
        self.stages.append((info, self.passes))
        self.passes = []

    def reset(self) -> None:
        self.passes, self.stages = [], []

    def tags(self) -> list[int]:
        return [tag for tag, _ in self.passes]


@pytest.fixture
def evaluations(monkeypatch: pytest.MonkeyPatch) -> Iterator[Evaluations]:
    rec = Evaluations()
    along_chain = surfing.lm.chain_jacobian

    def seen(layers: list[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A Jacobian along the layer chain does not call G.forward: record it here, tagged by
        the weights of the layers it was handed."""
        rec.passes.append((checkpoint_tag(nn.ModuleList(layers)), int(x.shape[0])))
        return along_chain(layers, x)

    monkeypatch.setattr(surfing.lm, "chain_jacobian", seen)
    handle = nn.modules.module.register_module_forward_hook(rec.hook)
    try:
        yield rec
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return make_tiny_trajectory(tmp_path_factory.mktemp("tagged"), "tagged", k=3, n_ckpt=N_CKPT)


def runs(tags: list[int]) -> list[int]:
    """Consecutive repeats collapsed: the checkpoints in the order they were evaluated."""
    return [t for i, t in enumerate(tags) if i == 0 or tags[i - 1] != t]


def problem(store: ModelStore, m: int | None, n: int = 4) -> tuple[torch.Tensor, ...]:
    x_star = uniform_latents(n, 3, seed=1)
    y = tiny_target(store, "tagged", x_star).flatten(1)
    A = gaussian_matrix(5, m, y.shape[1]) if m else None
    b = y if A is None else y @ A.T
    return b, uniform_latents(n, 3, seed=2), A


def check_stages(rec: Evaluations, indices: list[int]) -> None:
    """Every stage evaluated only its own checkpoint, and the passes visited `indices` in order
    (once each per pass: a rescue pass visits them again)."""
    assert rec.stages, "no stage was reported"
    for info, passes in rec.stages:
        assert passes, f"stage {info.stage} evaluated nothing"
        assert {tag for tag, _ in passes} == {info.index}, (info.stage, info.index, passes[:3])
    visited = [info.index for info, _ in rec.stages]
    n_pass = len(visited) // len(indices)
    assert len(visited) == n_pass * len(indices) and visited == indices * n_pass


def test_the_stream_hands_each_checkpoint_its_own_weights(store: ModelStore) -> None:
    stream = generators(store, "tagged", stride=2)
    held = list(stream)  # read all ahead: no module may change under an earlier stage
    assert [checkpoint_tag(G) for _, _, G in held] == [i for i, _, _ in held] == [0, 2, 4, 6]
    assert len({id(G) for _, _, G in held}) == len(held)
    assert checkpoint_tag(final_generator(store, "tagged")) == N_CKPT - 1


def test_a_hook_on_one_streamed_network_stays_on_it(store: ModelStore) -> None:
    """Streamed networks are copies of one template: a hook the worker registers on one of
    them must not fire for any other, and each holds its own weights."""
    held = list(generators(store, "tagged"))
    calls: list[int] = []
    held[2][2].register_forward_hook(lambda m, _i, _o: calls.append(checkpoint_tag(m)))
    with torch.no_grad():
        for _, _, G in held:
            G(uniform_latents(2, 3, seed=0))
    assert calls == [2]
    weights = [G.get_parameter("fc.0.weight") for _, _, G in held]
    assert len({w.data_ptr() for w in weights}) == len(held)
    assert all(not w.requires_grad and not w.is_meta for w in weights)


def test_a_warm_cache_serves_each_checkpoint_its_own_weights(store: ModelStore) -> None:
    """The worker's WarmStore: the first pass fills the cache, the second is served from it."""
    from worker.cache import WarmStore

    warm = WarmStore(store.root, 64 * 1024 * 1024, "cpu")
    for expected_hits in (0, N_CKPT):
        held = list(generators(warm, "tagged"))
        assert [checkpoint_tag(G) for _, _, G in held] == list(range(N_CKPT))
        assert warm.hits == expected_hits


@pytest.mark.parametrize("m", [None, 40])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("schedule", [s for s in SCHEDULES if s != "portfolio"])
def test_stage_t_evaluates_checkpoint_t(
    store: ModelStore, evaluations: Evaluations, schedule: str, stride: int, m: int | None
) -> None:
    b, x0, A = problem(store, m)
    evaluations.reset()
    stages = generators(store, "tagged", stride=stride)
    res = surf(
        stages,
        b,
        x0,
        A,
        steps=STEPS,
        final_steps=FINAL,
        schedule=schedule,
        progress=evaluations.on_stage,
    )
    check_stages(evaluations, stages.indices)
    assert [t.index for t in res.trace] == [info.index for info, _ in evaluations.stages]
    first, last = evaluations.stages[0], evaluations.stages[len(stages) - 1]
    assert first[0].index == 0 and last[0].index == N_CKPT - 1
    if schedule == "paper" or StageRule().head_stages >= 1:
        # θ_0: one stage of the paper's Adam steps, one forward each plus the final objective
        assert len(first[1]) == STEPS + 1


def mixed_problem(store: ModelStore, m: int | None) -> tuple[torch.Tensor, ...]:
    """Two targets on the range of G_T started next to their x* (LM on G_T fits them) and two
    off it (a flat grey image: nothing fits it), so both phases of "portfolio" run."""
    x_star = uniform_latents(2, 3, seed=1)
    y = torch.cat([tiny_target(store, "tagged", x_star).flatten(1), torch.full((2, 784), 0.9)])
    A = gaussian_matrix(5, m, y.shape[1]) if m else None
    b = y if A is None else y @ A.T
    return b, torch.cat([x_star + 0.01, uniform_latents(2, 3, seed=2)]), A


@pytest.mark.parametrize("m", [None, 40])
@pytest.mark.parametrize("stride", [1, 3])
def test_portfolio_evaluates_g_t_first_then_checkpoint_t_for_the_unfitted_only(
    store: ModelStore, evaluations: Evaluations, stride: int, m: int | None
) -> None:
    b, x0, A = mixed_problem(store, m)
    evaluations.reset()
    stages = generators(store, "tagged", stride=stride)
    res = surf(stages, b, x0, A, steps=STEPS, final_steps=FINAL, schedule="portfolio",
               progress=evaluations.on_stage)  # fmt: skip
    assert [t.index for t in res.trace] == [info.index for info, _ in evaluations.stages]
    first = [(i, p) for i, p in evaluations.stages if i.pass_name in ("final", "restart")]
    second = [(i, p) for i, p in evaluations.stages if i.pass_name in ("surf", "rescue")]
    assert len(first) + len(second) == len(evaluations.stages)
    assert first[0][0].pass_name == "final" and len(first) >= 2  # the off-range ones restart
    # phase 1: only G_T's weights, the whole batch at first, then only the restarted targets
    for info, passes in first:
        assert passes and {tag for tag, _ in passes} == {N_CKPT - 1} == {info.index}
        rows = b.shape[0] if info.moved is None else int(info.moved.sum())
        assert max(r for _, r in passes) == rows
    # phase 2: stage t on checkpoint t, each pass over every surfed checkpoint in order, and
    # only the rows of the targets phase 1 left unfitted (the two off-range ones)
    unfitted = torch.tensor([False, False, True, True])
    for info, passes in second:
        assert passes and {tag for tag, _ in passes} == {info.index}, (info.stage, passes[:3])
        assert info.moved is not None and torch.equal(info.moved, unfitted)
        assert max(r for _, r in passes) == 2
    visited = [info.index for info, _ in second]
    assert visited[: len(stages)] == stages.indices and len(visited) % len(stages) == 0
    assert visited == stages.indices * (len(visited) // len(stages))
    assert len(second[0][1]) == STEPS + 1  # θ_0: the Adam head stage, as in every surf pass
    fitted = ~unfitted  # phase 1's result stands for the targets it fitted
    G_T = final_generator(store, "tagged")
    again = lm_restarts(G_T, b[fitted], x0[fitted], A, PORTFOLIO_ROUNDS, seed=FIRST_PHASE_SALT)
    assert torch.allclose(res.x[fitted], again.x, atol=1e-6)  # up to batch-size rounding


@pytest.mark.parametrize("stride", [1, 2])
def test_paper_schedule_evaluates_each_checkpoint_as_often_as_it_says(
    store: ModelStore, evaluations: Evaluations, stride: int
) -> None:
    b, x0, _ = problem(store, None)
    evaluations.reset()
    stages = generators(store, "tagged", stride=stride)
    surf(stages, b, x0, steps=STEPS, final_steps=FINAL, schedule="paper")
    expected: list[int] = []
    for i in stages.indices:  # each Adam step is one pass, plus one for the stage objective
        expected += [i] * ((FINAL if i == N_CKPT - 1 else STEPS) + 1)
    assert evaluations.tags() == expected


def test_a_rescue_pass_surfs_the_same_checkpoints_again(
    store: ModelStore, evaluations: Evaluations
) -> None:
    b = torch.full((3, 784), 0.9)  # off the range of G: never fitted, so every target rescued
    b[0] = tiny_target(store, "tagged", uniform_latents(1, 3, seed=7)).flatten()
    x0 = uniform_latents(3, 3, seed=2)
    evaluations.reset()
    rule = StageRule(rescue_rounds=2)
    stages = generators(store, "tagged")
    res = surf(
        stages, b, x0, steps=STEPS, schedule="lm-stride", rule=rule, progress=evaluations.on_stage
    )
    check_stages(evaluations, stages.indices)
    rescues = [(info, p) for info, p in evaluations.stages if info.moved is not None]
    assert len(rescues) >= N_CKPT and len(res.trace) == len(evaluations.stages)
    for info, passes in rescues:  # a rescue pass evaluates only the targets it re-surfs
        assert max(rows for _, rows in passes) == int(info.moved.sum())


@pytest.mark.parametrize("schedule", ["paper", "lm"])
def test_graphed_stages_evaluate_their_own_checkpoint(
    store: ModelStore, evaluations: Evaluations, schedule: str
) -> None:
    b, x0, A = problem(store, 40)
    evaluations.reset()
    stages = generators(store, "tagged")
    surf(
        stages,
        b,
        x0,
        A,
        steps=STEPS,
        final_steps=FINAL,
        schedule=schedule,
        graphs=True,
        progress=evaluations.on_stage,
    )
    check_stages(evaluations, stages.indices)


def test_direct_and_hybrid_restarts_run_on_the_last_checkpoint(
    store: ModelStore, evaluations: Evaluations
) -> None:
    b, x0, _ = problem(store, None)
    evaluations.reset()
    direct(final_generator(store, "tagged"), b, x0, steps=4)
    assert set(evaluations.tags()) == {N_CKPT - 1}
    evaluations.reset()
    stages = generators(store, "tagged")
    hybrid(
        stages,
        b,
        x0,
        restarts=2,
        steps=STEPS,
        final_steps=FINAL,
        direct_steps=4,
        progress=evaluations.on_stage,
    )
    check_stages(evaluations, stages.indices)
    assert set(evaluations.tags()) == {N_CKPT - 1}  # the restarts and polish after the pass


@pytest.mark.parametrize("schedule", ["paper", "auto"])
def test_worker_passes_evaluate_each_stage_on_its_checkpoint(
    env: dict[str, Any], evaluations: Evaluations, schedule: str
) -> None:
    """The worker path, coalesced: two jobs share one pass; each job's trace names the
    checkpoints that pass evaluated, in order."""
    from tests.test_coalesce import invert_job, outcome
    from worker import jobs as wj

    opts = {"schedule": schedule, "steps": 3, "final_steps": 4, "rescue": False}
    ids = [invert_job(env, v, seed=i, **opts) for i, v in enumerate([0.3, 0.6])]
    evaluations.reset()
    assert wj.run_job(ids[0], env["settings"])["coalesced"] == ids[1:]
    n = len(env["store"].manifest("tiny").checkpoints)
    assert runs(evaluations.tags()) == list(range(n))
    for jid in ids:
        job, res = outcome(env, jid)
        assert job.status == "succeeded" and res is not None and res.pass_jobs == 2
        assert [entry["index"] for entry in res.trace] == list(range(n))


def test_a_list_read_from_the_stream_solves_like_the_stream(tmp_path: Path) -> None:
    """A consumer may hold every stage at once (Alg 3.2's experiments pass a list of modules):
    each still holds its own checkpoint, so the path equals the streamed one."""
    store = make_tiny_trajectory(tmp_path, "t", k=3, n_ckpt=4)
    b, x0 = (
        tiny_target(store, "t", uniform_latents(2, 3, seed=1)).flatten(1),
        uniform_latents(2, 3, seed=2),
    )
    listed = list(generators(store, "t"))
    a = surf(listed, b, x0, steps=STEPS, final_steps=FINAL, schedule="paper")
    s = surf(generators(store, "t"), b, x0, steps=STEPS, final_steps=FINAL, schedule="paper")
    np.testing.assert_array_equal(a.x.numpy(), s.x.numpy())
