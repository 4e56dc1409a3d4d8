"""Solvers for min_x f(x) = 1/2 ||A G(x) - b||^2, each batched over targets.

The loss of a batch is the sum of independent per-target losses and Adam is element-wise,
so every target follows exactly the path it would follow alone (generators are in eval mode).

- `surf`: Algorithm 3.1, Adam on f_0, f_1, ..., f_T, each stage warm-started from the last.
- `direct`: Adam on the final network only (the paper's baseline).
- `direct_restarts`: `direct` from R random starts, lowest objective kept per target.
- `hybrid`: surf plus restarts on the final network, lowest objective kept per target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

Stage = tuple[int, int, nn.Module]  # (checkpoint index, training step, generator)
Progress = Callable[["StageTrace"], None]


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
        }


@dataclass
class SolveResult:
    x: torch.Tensor  # (B, k) latents
    objective: torch.Tensor  # (B,) final objective on the last network
    evals: int  # generator forward+backward passes per target
    trace: list[StageTrace] = field(default_factory=list)


def objective(
    G: nn.Module, x: torch.Tensor, b: torch.Tensor, A: torch.Tensor | None
) -> torch.Tensor:
    """Per-target f(x) = 1/2 ||A G(x) - b||^2, shape (B,)."""
    out = G(x).flatten(1)
    if A is not None:
        out = out @ A.T
    return 0.5 * (out - b).pow(2).sum(dim=1)


def uniform_latents(n: int, k: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """x ~ U[-1, 1]^k, the paper's prior for x* and x_init (drawn on the CPU: reproducible)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return (torch.rand(n, k, generator=g) * 2 - 1).to(device)


def adam_descent(
    G: nn.Module,
    x: torch.Tensor,
    b: torch.Tensor,
    A: torch.Tensor | None,
    steps: int,
    lr: float,
    tol: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Up to `steps` Adam steps from x (fresh optimiser state); stops early once every target's
    gradient norm is below `tol`. Returns (x, objective, steps used)."""
    x = x.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    used = 0
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        objective(G, x, b, A).sum().backward()
        used += 1
        if tol is not None and float(x.grad.norm(dim=1).max()) < tol:
            break
        opt.step()
    with torch.no_grad():
        f = objective(G, x, b, A)
    return x.detach(), f, used


def _with_last(stages: Iterable[Stage]) -> Iterator[tuple[Stage, bool]]:
    """Yield (stage, is_last) with one element of look-ahead (the stream has no length)."""
    it = iter(stages)
    try:
        prev = next(it)
    except StopIteration:
        raise ValueError("surfing needs at least one checkpoint") from None
    for cur in it:
        yield prev, False
        prev = cur
    yield prev, True


def surf(
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
) -> SolveResult:
    """Algorithm 3.1: `steps` Adam steps on each f_t warm-started from x_{t-1}; the last
    network gets `final_steps` so x_T is converged as tightly as the direct baseline's.

    `progress` is called after every stage; an exception raised from it aborts the solve.
    """
    if total is None and hasattr(stages, "__len__"):
        total = len(stages)  # type: ignore[arg-type]
    x, evals, trace = x_init, 0, []
    f = torch.full((x_init.shape[0],), float("nan"))
    for t, ((index, step, G), last) in enumerate(_with_last(stages)):
        x, f, used = adam_descent(G, x, b, A, final_steps if last else steps, lr, tol)
        evals += used
        info = StageTrace(t, total, index, step, used, f.cpu(), x.norm(dim=1).cpu())
        trace.append(info)
        if progress is not None:
            progress(info)
    return SolveResult(x, f, evals, trace)


def direct(
    G: nn.Module,
    b: torch.Tensor,
    x_init: torch.Tensor,
    A: torch.Tensor | None = None,
    steps: int = 2000,
    lr: float = 0.01,
    tol: float | None = None,
) -> SolveResult:
    """Adam on the final network only, from x_init."""
    x, f, used = adam_descent(G, x_init, b, A, steps, lr, tol)
    return SolveResult(x, f, used)


def _keep_best(best: SolveResult, other: SolveResult) -> SolveResult:
    """Per target, the solution with the lower objective (ties keep `best`)."""
    better = other.objective < best.objective
    x = torch.where(better[:, None], other.x, best.x)
    f = torch.where(better, other.objective, best.objective)
    return SolveResult(x, f, best.evals + other.evals, best.trace)


def direct_restarts(
    G: nn.Module,
    b: torch.Tensor,
    restarts: int,
    seed: int = 0,
    A: torch.Tensor | None = None,
    x_init: torch.Tensor | None = None,
    steps: int = 2000,
    lr: float = 0.01,
    tol: float | None = None,
) -> SolveResult:
    """`direct` from `restarts` starts (x_init first if given, the rest U[-1,1]^k), all run as
    one batch; the lowest objective wins per target."""
    if restarts < 1:
        raise ValueError("restarts must be >= 1")
    n, k = b.shape[0], int(G.latent_dim)
    starts = uniform_latents(n * restarts, k, seed, b.device).view(restarts, n, k)
    if x_init is not None:
        starts[0] = x_init
    res = direct(G, b.repeat(restarts, 1), starts.view(-1, k), A, steps, lr, tol)
    xs, fs = res.x.view(restarts, n, k), res.objective.view(restarts, n)
    best = fs.argmin(dim=0)
    idx = torch.arange(n, device=best.device)
    return SolveResult(xs[best, idx], fs[best, idx], res.evals * restarts)


def hybrid(
    stages: Iterable[Stage],
    b: torch.Tensor,
    x_init: torch.Tensor,
    restarts: int,
    seed: int = 0,
    A: torch.Tensor | None = None,
    steps: int = 20,
    lr: float = 0.01,
    tol: float | None = None,
    final_steps: int = 1000,
    direct_steps: int = 2000,
    progress: Progress | None = None,
) -> SolveResult:
    """Surf, then `restarts` direct descents on the final network; lowest objective wins,
    so per target it is never worse (in objective) than either part."""
    last: list[nn.Module] = []

    def remember(stream: Iterable[Stage]) -> Iterator[Stage]:
        for stage in stream:
            last[:] = [stage[2]]
            yield stage

    total = len(stages) if hasattr(stages, "__len__") else None  # type: ignore[arg-type]
    surfed = surf(remember(stages), b, x_init, A, steps, lr, tol, final_steps, progress, total)
    restarted = direct_restarts(last[0], b, restarts, seed, A, None, direct_steps, lr, tol)
    return _keep_best(surfed, restarted)
