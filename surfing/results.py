"""What a solver returns: per-stage traces, per-pass points and the final latents, and how a
coalesced batch's result is cut back into per-job results."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class StageTrace:
    """What one stage did; `objective` holds the per-target values at the end of the stage."""

    stage: int
    total: int | None
    index: int
    step: int
    steps_used: int
    objective: torch.Tensor
    x_norm: torch.Tensor
    # schedule "lm-stride": what each target did here (surfing.lm SKIP/CHORD/FRESH/...)
    action: torch.Tensor | None = None
    # (B,) bool: the targets this stage worked on; None = all (a rescue pass works on a few)
    moved: torch.Tensor | None = None
    # which pass over the trajectory this stage belongs to: "surf", or "rescue" with its round
    # (1-based), so a progress display can count stages per pass instead of a growing total
    pass_name: str = "surf"
    pass_round: int | None = None

    @property
    def objective_mean(self) -> float:
        return float(self.objective.mean())

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "stage": self.stage,
            "total": self.total,
            "index": self.index,
            "step": self.step,
            "steps_used": self.steps_used,
            "objective_mean": self.objective_mean,
            "x_norm_mean": float(self.x_norm.mean()),
            "rescued": int(self.moved.sum()) if self.moved is not None else None,
        }


@dataclass
class RoundPoint:
    """Where every target stood after one pass of a multi-pass solver, so a curve of success
    against cost can be read off one run: a run with fewer rounds ends exactly here."""

    name: str  # "surf", "rescue 1", "final" (LM on G_T), "restart 2", ...
    x: torch.Tensor  # (B, k)
    objective: torch.Tensor  # (B,)
    target_evals: torch.Tensor  # (B,) cumulative cost per target, float64, CPU


@dataclass
class SolveResult:
    x: torch.Tensor  # (B, k) latents
    objective: torch.Tensor  # (B,) final objective on the last network
    evals: int  # generator forward+backward passes per target
    trace: list[StageTrace] = field(default_factory=list)
    target_evals: torch.Tensor | None = None  # (B,) per-target cost, where targets differ
    rounds: list[RoundPoint] = field(default_factory=list)  # surf / lm_restarts / portfolio


def split_result(res: SolveResult, sizes: list[int]) -> list[SolveResult]:
    """Cut the result of one coalesced batch back into per-job results (`sizes` targets each).

    Coalescing is exact because targets are independent: a worker may concatenate the `b` and
    `x_init` of queued jobs for the same model (and the same A and solver options), surf once
    -- one pass over the trajectory, each checkpoint loaded once -- and split the result; each
    job gets what it would have got alone (up to float32 batch-size rounding).
    """
    if sum(sizes) != res.x.shape[0]:
        raise ValueError(f"sizes add up to {sum(sizes)}, the result has {res.x.shape[0]} targets")
    out, lo = [], 0
    for n in sizes:
        hi = lo + n
        cost = res.target_evals[lo:hi] if res.target_evals is not None else None
        evals = int(round(float(cost.double().mean()))) if cost is not None else res.evals
        trace = [
            replace(
                t,
                objective=t.objective[lo:hi],
                x_norm=t.x_norm[lo:hi],
                action=t.action[lo:hi] if t.action is not None else None,
                moved=t.moved[lo:hi] if t.moved is not None else None,
            )
            for t in res.trace
            if t.moved is None or bool(t.moved[lo:hi].any())  # a rescue this job took part in
        ]
        rounds = [
            RoundPoint(r.name, r.x[lo:hi], r.objective[lo:hi], r.target_evals[lo:hi])
            for r in res.rounds
        ]
        out.append(SolveResult(res.x[lo:hi], res.objective[lo:hi], evals, trace, cost, rounds))
        lo = hi
    return out
