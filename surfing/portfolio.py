"""The default solver: every target first on the final network alone, the trajectory only
for the targets that still miss.

Levenberg–Marquardt on G_T, then a few rounds of fresh starts (`lm_restarts`), fits most
targets for a fraction of a surfing pass; surfing the trajectory (`lm-stride` with its rescue)
then works only on the targets no start fitted, where the final surface's basins defeated
random starts. Per target the lower objective wins, so the result is never worse than either
part. The measurements behind the order and the round count: docs/results.md, section
"Surfing against the strongest baseline".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch

from surfing.restarts import lm_restarts
from surfing.solvers import (
    MISS_RTOL,
    RESCUE_MARGIN,
    Progress,
    RoundPoint,
    SolveResult,
    Stage,
    StageRule,
    StageTrace,
    final_stage,
    not_fitted,
    surf,
)

# LM restart rounds on G_T before the trajectory is surfed (`portfolio_rounds`). With few
# measurements (m <= 3k) every extra round kept fitting targets: 20 rounds fitted 9-10 points
# more than 10 at m = 2k and 14 more than 2 at m = 2.5k (300 trials, two trainings), and the
# surf after them added 1-3 points; elsewhere rounds beyond 2 fitted as many, and an off-range
# image, which no round fits, pays for every one of them. Measurements: docs/results.md,
# "Session 12".
PORTFOLIO_ROUNDS = 2
FEW_MEASUREMENT_ROUNDS = 20
FEW_MEASUREMENTS_PER_LATENT = 3  # "few": m <= 3k (rounds gained 14 points at 2.5k, none at 5k)
PORTFOLIO_SURF = "lm-stride"  # how the still-unfitted targets surf (with its rescue pass)
# Salts the first phase's restart draws so they differ from the rescue's (surf uses salt 0):
# a target the restarts could not fit then surfs from starts it has not tried yet.
FIRST_PHASE_SALT = -1


def portfolio_rounds(m: int | None, latent_dim: int) -> int:
    """The default's restart rounds for m measurements (None: A = I) of a k-dim latent."""
    few = m is not None and m <= FEW_MEASUREMENTS_PER_LATENT * latent_dim
    return FEW_MEASUREMENT_ROUNDS if few else PORTFOLIO_ROUNDS


def portfolio(
    stages: Iterable[Stage],
    b: torch.Tensor,
    x_init: torch.Tensor,
    A: torch.Tensor | None = None,
    steps: int = 20,
    lr: float = 0.01,
    tol: float | None = None,
    final_steps: int = 1000,
    progress: Progress | None = None,
    total: int | None = None,
    rule: StageRule | None = None,
    graphs: bool = False,
    prior: str = "uniform",
    rounds: int | None = None,
    surf_schedule: str = PORTFOLIO_SURF,
) -> SolveResult:
    """`lm_restarts` on the stream's final network with `rounds` restart rounds (None:
    `portfolio_rounds` of the operator), then `surf`
    (`surf_schedule`, the call's rule, so its rescue pass too) for the targets still not fitted
    (relative residual above the rule's rescue_rtol, or MISS_RTOL), each keeping the result
    whose objective is lower by RESCUE_MARGIN. A target's path depends only on its own b and
    x_init (restart draws are hashed from x_init), so coalesced jobs get their solo results.

    Trace: lm_restarts' passes ("final", "restart" r), then the surf and rescue passes with
    `moved` marking the targets they work on; `rounds` of the result holds a point after every
    pass (a curve of success against cost from one run)."""
    rule = rule or StageRule()
    if rounds is None:
        rounds = portfolio_rounds(None if A is None else A.shape[0], x_init.shape[1])
    rtol = rule.rescue_rtol if rule.rescue_rtol is not None else MISS_RTOL
    trace: list[StageTrace] = []

    def report(info: StageTrace) -> None:
        trace.append(info)
        if progress is not None:
            progress(info)

    index, step, G_T = final_stage(stages)
    first = lm_restarts(
        G_T, b, x_init, A, rounds, rtol, FIRST_PHASE_SALT, prior, rule, report, index, step
    )
    x, f, cost = first.x, first.objective, first.target_evals
    assert cost is not None
    points = list(first.rounds)
    idx = not_fitted(f, b, rtol).nonzero().squeeze(1)
    if idx.numel() == 0:
        return SolveResult(x, f, int(round(float(cost.mean()))), trace, cost, points)

    moved = torch.zeros(x.shape[0], dtype=torch.bool)
    moved[idx.cpu()] = True
    offset = len(trace)
    base_f, base_norm = f.cpu(), x.norm(dim=1).cpu()

    def report_subset(info: StageTrace) -> None:
        full_f, full_norm = base_f.clone(), base_norm.clone()
        full_f[moved], full_norm[moved] = info.objective, info.x_norm
        here = moved.clone()
        if info.moved is not None:  # a rescue round within the subset
            here[idx.cpu()] = info.moved
        total = None if info.total is None else offset + info.total  # stage <= total - 1
        report(replace(info, stage=offset + info.stage, total=total, objective=full_f,
                       x_norm=full_norm, action=None, moved=here))  # fmt: skip

    second = surf(
        stages, b[idx], x_init[idx], A, steps, lr, tol, final_steps, report_subset,
        total, surf_schedule, rule, graphs, prior,
    )  # fmt: skip

    def merged(x2: torch.Tensor, f2: torch.Tensor, c2: torch.Tensor) -> RoundPoint:
        better = f2 < (1 - RESCUE_MARGIN) * f[idx].nan_to_num(nan=float("inf"))
        xm, fm, cm = x.clone(), f.clone(), cost.clone()
        xm[idx[better]], fm[idx[better]] = x2[better], f2[better]
        cm[idx.cpu()] += c2
        return RoundPoint("", xm, fm, cm)

    for point in second.rounds:
        points.append(replace(merged(point.x, point.objective, point.target_evals),
                              name=point.name))  # fmt: skip
    last = points[-1]
    return SolveResult(
        last.x, last.objective, int(round(float(last.target_evals.mean()))), trace,
        last.target_evals, points,
    )  # fmt: skip
