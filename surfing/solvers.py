"""Solvers for min_x f(x) = 1/2 ||A G(x) - b||^2, each batched over targets.

The loss of a batch is the sum of independent per-target losses and Adam is element-wise,
so every target follows exactly the path it would follow alone (generators are in eval mode).

- `surf`: Algorithm 3.1, Adam on f_0, f_1, ..., f_T, each stage warm-started from the last
  (or, in the faster schedules, per-target masked Adam / Levenberg–Marquardt stages whose
  stopping, skipping and Jacobian reuse are decided per target from that target's own values,
  so coalescing targets from different jobs into one batch changes no target's path). The
  faster schedules end with a rescue pass: a target its pass did not fit surfs again from a
  fresh start drawn from its own x_init, which keeps that property.
- `direct`, `direct_restarts`, `hybrid`, `lm_restarts` (surfing.restarts, importable from
  here): solvers on the final network, with or without restarts -- the paper's baseline and
  the strongest one that never touches the trajectory (issue 16).
- schedule "portfolio" (the default, surfing.portfolio): `lm_restarts` first, then `surf`
  only for the targets it left unfitted.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from surfing.graphs import GraphedAdam, GraphedLMStage
from surfing.latents import check_prior, draw
from surfing.lm import TrackState, levenberg_marquardt, objective, track_step
from surfing.results import RoundPoint, SolveResult, StageTrace
from surfing.results import split_result as split_result  # re-exported: callers import it here

Stage = tuple[int, int, nn.Module]  # (checkpoint index, training step, generator)
Progress = Callable[[StageTrace], None]
# Defined in surfing.restarts (which builds on this module), importable from here as before.
_RESTARTS = ("direct", "polish", "direct_restarts", "hybrid", "lm_restarts", "LM_RESTART_ROUNDS")


def __getattr__(name: str) -> object:
    if name in _RESTARTS:
        from surfing import restarts

        return getattr(restarts, name)
    raise AttributeError(f"module 'surfing.solvers' has no attribute {name!r}")



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
    runner: GraphedAdam | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Up to `steps` Adam steps from x (fresh optimiser state); stops early once every target's
    gradient norm is below `tol`. Returns (x, objective, steps used). With a `runner` the steps
    are its replayed CUDA graph (unless `tol` is set: that test needs the host every step)."""
    if runner is not None and tol is None:
        x, f = runner.descend(G, x, steps)
        return x, f, steps
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
    """Yield (stage, is_last) with one element of look-ahead (the stream has no length).

    The look-ahead takes the next stage before this one runs, so a stream must give every stage
    its own network (surfing.trajectory.Generators does); one that reloaded a shared module in
    place would run each stage on the next checkpoint."""
    it = iter(stages)
    try:
        prev = next(it)
    except StopIteration:
        raise ValueError("surfing needs at least one checkpoint") from None
    for cur in it:
        yield prev, False
        prev = cur
    yield prev, True


SCHEDULES = ("portfolio", "auto", "adaptive", "adaptive-adam", "lm", "lm-stride", "paper")
DEFAULT_SCHEDULE = "portfolio"


def final_stage(stages: Iterable[Stage]) -> Stage:
    """The stream's last stage, without walking the stream: a list's last item, or what the
    stream's `final()` hands out (surfing.trajectory.Generators loads only that checkpoint)."""
    if isinstance(stages, list | tuple):
        if not stages:
            raise ValueError("surfing needs at least one checkpoint")
        return stages[-1]
    final = getattr(stages, "final", None)
    if final is None:
        raise TypeError(
            "schedule 'portfolio' needs the final network first: pass a list of stages or a "
            "stream with final() (surfing.trajectory.Generators)"
        )
    return final()


def resolve_schedule(schedule: str, A: torch.Tensor | None, latent_dim: int | None = None) -> str:
    """ "auto" follows the measurements (docs/performance.md, docs/results.md Fig 4):
    "lm-stride" with its rescue pass and an Adam stage on θ_0 (StageRule.head_stages), the
    fastest schedule that held the paper's success rate (dcgan-k10/k20, vae-k10, wgan-gp-k10,
    200 trials each at A = I and m = 50: never below the paper schedule), except with few
    measurements, m <= 2k. There Gauss–Newton fits the m numbers of an off-range image exactly
    and lands far from it (Fig 4: median pixel error 0.20 / 0.15 with "lm" against 0.061 /
    0.028 with "paper" at m = 10 / 20, before the stream fix), so "auto" uses "paper" there.
    Callers that want a fixed method name it."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    # "portfolio" (the default) is not resolved here: surfing.portfolio runs lm_restarts, then
    # "lm-stride" for the targets still unfitted, at every m
    if schedule != "auto":
        return schedule
    if A is not None and latent_dim is not None and A.shape[0] <= 2 * latent_dim:
        return "paper"
    return "lm-stride"


# The miss test (rescue, restart rounds, the portfolio's hand-over to surfing): a target whose
# relative residual ||A G(x) - b||^2 / ||b||^2 is above this is "not fitted". Successes ended
# at most at 9.2e-8 (1.0e-7 with a GPU's TF32 convolutions emulated); near misses, LM stuck
# close to x*, at 1.8e-5 to 4.8e-5, which 1e-4 let through unsurfed (docs/results.md, issue 16).
MISS_RTOL = 1e-5


@dataclass(frozen=True)
class StageRule:
    """When an adaptive stage stops for one target (the paper's schedule ignores this).

    A target's stage ends once its objective has not dropped by a relative `rtol` for `patience`
    consecutive Adam steps (after at least `min_steps`), or its gradient norm is below `gtol`,
    or it reached the stage's step cap. The final network is solved by Levenberg–Marquardt to
    `lm_xtol` (latent step length), at most `lm_iters` Jacobians, except in "adaptive-adam".
    """

    min_steps: int = 2
    patience: int = 2
    rtol: float = 1e-2
    gtol: float = 0.0
    lm_iters: int = 40
    lm_xtol: float = 1e-6
    lm_stage_iters: int = 1  # schedule "lm": accepted steps (Jacobians) per intermediate stage
    # ... and trial steps at most (a rejected one is retried with 4x the damping, same
    # Jacobian). Measured at m = 50 (500 trials): 3 trials 92.0 % vs 1 trial 90.4 %, paper
    # 91.8 %, but the two settings disagree on ~6 % of targets each way, so it is not the default.
    lm_stage_trials: int = 1
    # schedule "lm-stride" (see surfing.lm.track_step): a target skips a checkpoint when the
    # Gauss–Newton step predicted by its stored Jacobian is shorter than `skip_xtol`; a step
    # first tries that prediction (a chord step, kept if f drops by `reuse_eta` x the predicted
    # decrease; the Jacobian then gets a free Broyden correction if `reuse_broyden`) until the
    # Jacobian has served `reuse_max` chord steps, then computes a fresh one.
    # skip_xtol = 0 and reuse_max = 0 is exactly "lm". Defaults: the measured combination of
    # docs/performance.md (on dcgan-k10 no target's predicted step fell below 0.01, so the skip
    # never fired there; the chord steps are what saves evaluations).
    skip_xtol: float = 3e-3
    reuse_max: int = 1
    reuse_eta: float = 0.25
    reuse_broyden: bool = True
    # Rescue (see surf): a target with ||A G(x) - b||^2 > rescue_rtol ||b||^2 at the end (a
    # residual above ~0.3 % of the target in norm) surfs again from a fresh start, at most
    # `rescue_rounds` times; None turns it off. See MISS_RTOL.
    rescue_rtol: float | None = MISS_RTOL
    rescue_rounds: int = 1
    # The first `head_stages` stages of every schedule but "paper" are the paper's Adam stage
    # (`head_steps` Adam steps, default the call's `steps`, at its `lr`) instead of the
    # schedule's own step. On θ_0, the random initialisation, the network is nearly flat in x,
    # so a Gauss–Newton step is huge (||x|| reached 1e3-1e7) and the latent rarely comes back;
    # an Adam step moves each coordinate by at most about `lr`. Measured on four trajectories
    # in docs/performance.md, section "Session 6" (m = 50: 11-40 % without, 35-100 % with).
    head_stages: int = 1
    # Levenberg–Marquardt keeps every latent in the ball ||x|| <= latent_radius * sqrt(k)
    # (surfing.lm.into_ball); None: unbounded. Both priors put x* well inside it. Unbounded,
    # a step on a flat early network or toward an off-range target's saturated pixels sent
    # ||x|| to 1e4-1e7 on a digits VAE (25 of 100 held-out digits); measured in
    # docs/performance.md, section "Latent radius".
    latent_radius: float | None = 5.0
    head_steps: int | None = None
    # lm_restarts (the default's first phase): a target not yet fitted (the miss test) whose
    # objective fell by less than this fraction on two accepted LM steps in a row stops there
    # and goes to the next round (surfing.lm.levenberg_marquardt's `stall`); 0: off. On eight
    # settings of two trajectories (300 trials) the default fitted as many targets for up to
    # 23 % fewer evaluations: docs/results.md, "Session 13".
    lm_stall: float = 0.01

    def radius(self, k: int) -> float | None:
        """The latent ball Levenberg–Marquardt stays in, for latent dimension k."""
        return None if self.latent_radius is None else self.latent_radius * math.sqrt(k)


def adam_stage(
    G: nn.Module,
    x: torch.Tensor,
    b: torch.Tensor,
    A: torch.Tensor | None,
    max_steps: int,
    lr: float,
    rule: StageRule,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam with a per-target stopping rule; stopped targets leave the batch.

    Same update as torch.optim.Adam (fresh state each stage). All targets start together and
    the active set only shrinks, so the shared step counter is every active target's own
    counter, and each target follows the path it would follow alone. Returns, per target, the
    best evaluated latent, its objective and the number of gradient evaluations it used.
    """
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    n = x.shape[0]
    x = x.detach().clone()
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    best_x, best_f = x.clone(), torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    stall = torch.zeros(n, dtype=torch.long, device=x.device)
    used = torch.zeros(n, dtype=torch.long, device=x.device)
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    for t in range(1, max_steps + 1):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        xa = x[idx].requires_grad_(True)
        fa = objective(G, xa, b[idx], A)
        (grad,) = torch.autograd.grad(fa.sum(), xa)
        fa = fa.detach()
        used[idx] += 1
        prev = best_f[idx]
        improved = fa < prev * (1 - rule.rtol)
        better = fa < prev
        best_f[idx] = torch.where(better, fa, prev)
        best_x[idx] = torch.where(better[:, None], xa.detach(), best_x[idx])
        stall[idx] = torch.where(improved, 0, stall[idx] + 1)
        stop = (stall[idx] >= rule.patience) & (t >= rule.min_steps)
        stop |= grad.norm(dim=1) <= rule.gtol
        ma = m[idx].mul_(beta1).add_(grad, alpha=1 - beta1)
        va = v[idx].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m[idx], v[idx] = ma, va
        denom = (va.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        x[idx] = xa.detach() - (lr / (1 - beta1**t)) * ma / denom
        active[idx[stop]] = False
    return best_x, best_f, used


def _lm_stage(
    G: nn.Module,
    x: torch.Tensor,
    b: torch.Tensor,
    A: torch.Tensor | None,
    iters: int,
    rule: StageRule,
    accepts: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    res = levenberg_marquardt(
        G, x, b, A, max_iters=iters, xtol=rule.lm_xtol, max_accepts=accepts,
        radius=rule.radius(x.shape[1]),
    )
    return res.x, res.objective, res.evals


RESCUE_MARGIN = 1e-3  # a rescue result replaces the first one only if 0.1 % lower


def restart_latents(
    x_init: torch.Tensor, round_: int, prior: str = "uniform", seed: int = 0
) -> torch.Tensor:
    """A fresh start per target for rescue round `round_`, drawn from the latent prior.

    Each row is drawn from a generator seeded by that target's own x_init and the round (and
    `seed`, if not 0), not by its position: a target restarts from the same point whichever
    batch it is coalesced into.
    """
    rows = x_init.detach().to("cpu", torch.float64).contiguous()
    out = torch.empty(rows.shape, dtype=torch.float64)
    salt = seed.to_bytes(8, "little", signed=True) if seed else b""  # 0: the rescue's draws
    for i, row in enumerate(rows):
        key = row.numpy().tobytes() + round_.to_bytes(4, "little") + salt
        row_seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        g = torch.Generator().manual_seed(row_seed)
        out[i] = draw((rows.shape[1],), g, prior, dtype=torch.float64)
    return out.to(x_init)


def fit_line(b: torch.Tensor, rtol: float) -> torch.Tensor:
    """(B,) the objective f = 1/2 ||A G(x) - b||^2 at which `not_fitted` flips: rtol ||b||^2 / 2
    (LM's stall stop judges "not yet fitted" against the same line)."""
    return 0.5 * rtol * b.pow(2).sum(dim=1).clamp_min(torch.finfo(b.dtype).tiny)


def not_fitted(f: torch.Tensor, b: torch.Tensor, rtol: float) -> torch.Tensor:
    """(B,) bool: ||A G(x) - b||^2 > rtol ||b||^2, i.e. the latent does not reproduce its target.

    When the target lies on the range of G (the paper's exact-recovery setting) the global
    optimum fits it exactly, so a clearly positive residual marks a target stuck in another
    basin; non-finite objectives count as not fitted."""
    return ~(f <= fit_line(b, rtol).to(f.device))


@dataclass(frozen=True)
class _PassOptions:
    """What every pass of one `surf` call shares (the main pass and its rescue passes)."""

    schedule: str
    rule: StageRule
    steps: int
    lr: float
    tol: float | None
    final_steps: int
    graphs: bool


def _surf_pass(
    stages: Iterable[Stage],
    b: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor | None,
    opts: _PassOptions,
    report: Callable[[StageTrace], None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass of Algorithm 3.1 over the stream; returns (x, f, per-target cost)."""
    schedule, rule, steps, lr, tol = opts.schedule, opts.rule, opts.steps, opts.lr, opts.tol
    cost = torch.zeros(x.shape[0], dtype=torch.float64)
    f = torch.full((x.shape[0],), float("nan"))
    track: TrackState | None = None
    runner: GraphedAdam | None = None
    lm_runner: GraphedLMStage | None = None
    for t, ((index, step, G), last) in enumerate(_with_last(stages)):
        action = None
        head = schedule != "paper" and not last and t < rule.head_stages
        if schedule == "paper" or head:
            if opts.graphs and runner is None and tol is None:  # tol's test needs the host
                runner = GraphedAdam(G, b, A, lr, x.shape[1])
            n_steps = opts.final_steps if last else steps
            if head and rule.head_steps is not None:
                n_steps = rule.head_steps
            x, f, used = adam_descent(G, x, b, A, n_steps, lr, tol, runner)
            cost += used
            steps_used = used
        else:
            if last and schedule != "adaptive-adam":
                x, f, c = _lm_stage(G, x, b, A, rule.lm_iters, rule)
            elif schedule == "lm" and opts.graphs and rule.lm_stage_iters == 1:
                trials = rule.lm_stage_trials
                lm_runner = lm_runner or GraphedLMStage(
                    G, b, A, x.shape[1], trials, radius=rule.radius(x.shape[1])
                )
                x, f, c = lm_runner.step(G, x)
            elif schedule == "lm":
                trials = max(rule.lm_stage_trials, rule.lm_stage_iters)
                x, f, c = _lm_stage(G, x, b, A, trials, rule, rule.lm_stage_iters)
            elif schedule == "lm-stride":
                x, f, c, track, action = track_step(
                    G,
                    x,
                    b,
                    A,
                    track,
                    rule.skip_xtol,
                    rule.reuse_max,
                    eta=rule.reuse_eta,
                    broyden=rule.reuse_broyden,
                    xtol=rule.lm_xtol,
                    radius=rule.radius(x.shape[1]),
                )
            else:
                cap = opts.final_steps if last else steps
                x, f, c = adam_stage(G, x, b, A, cap, lr, rule)
            cost += c.cpu().double()
            steps_used = int(c.max()) if c.numel() else 0
        report(StageTrace(t, None, index, step, steps_used, f.cpu(), x.norm(dim=1).cpu(), action))
    return x, f, cost


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
    schedule: str = DEFAULT_SCHEDULE,
    rule: StageRule | None = None,
    graphs: bool = False,
    prior: str = "uniform",
    rounds: int | None = None,
) -> SolveResult:
    """Algorithm 3.1: descend each f_t warm-started from x_{t-1}, ending on the final network.

    schedule "portfolio" (default): not a pass over the trajectory first, but Levenberg–Marquardt
    with restarts on the final network, then "lm-stride" surfing only for the targets that did
    not fit (surfing.portfolio; needs a list or a stream with `final()`; `rounds`: its restart
    rounds, None = portfolio_rounds of the operator; other schedules refuse it). "paper": exactly
    `steps` Adam steps per stage (fewer if every gradient norm is below `tol`) and
    `final_steps` on the last network -- the paper's method, kept as the reference. "auto":
    the default until issue 16, "lm-stride", or "paper" when m <= 2k (see resolve_schedule).
    "adaptive": per-target Adam stages that stop when the target's stage
    objective stalls (see StageRule; `steps` is the cap, so no target does more work per stage
    than the paper) and Levenberg–Marquardt on the last network, which converges in a few
    k×k solves where Adam needs ~1000 steps. "adaptive-adam": the same stages, but masked Adam
    capped at `final_steps` on the last network. "lm": Levenberg–Marquardt on every stage.
    "lm-stride": "lm" with an adaptive checkpoint stride and Jacobian reuse: per target, a
    checkpoint across which its optimum barely moved is skipped, and a step reuses the
    target's last Jacobian while that still predicts the decrease (surfing.lm.track_step).

    Rescue (every schedule but "paper"; StageRule.rescue_rtol / rescue_rounds): a target whose
    final latent does not reproduce its target (see `not_fitted`) surfs the trajectory again
    from a fresh start (`restart_latents`, a draw from the latent `prior`) and keeps the
    rescue's result if its objective is lower by more than RESCUE_MARGIN. Only those targets
    take the extra pass, so when every target is fitted it costs nothing. It needs a stream
    that can be iterated again (a list, surfing.trajectory.Generators); a one-shot iterator
    gets no rescue. Rescue stages are reported as stages T, T + 1, ... (of 2T), with `moved`
    set to the targets they work on.

    `graphs` (schedules "paper" and "lm"): run the paper's Adam steps, or "lm"'s one-iteration
    intermediate stages, through one runner of surfing.graphs, captured once as a CUDA graph on
    a GPU and replayed at every checkpoint (on a CPU the same fixed-shape code runs eagerly,
    with the same results). Off by default until measured end to end on a GPU.

    `progress` is called after every stage; an exception raised from it aborts the solve.
    `evals` counts generator forward+backward passes per target (a mean for adaptive
    schedules, where targets stop at different times; a forward pass counts as half).
    """
    schedule = resolve_schedule(schedule, A, x_init.shape[1])
    check_prior(prior)
    rule = rule or StageRule()
    if schedule == "portfolio":
        from surfing.portfolio import portfolio  # it surfs through this function in turn

        return portfolio(
            stages, b, x_init, A, steps, lr, tol, final_steps, progress, total, rule, graphs, prior,
            rounds,
        )  # fmt: skip
    if rounds is not None:
        raise ValueError(f"rounds applies to schedule 'portfolio' only, not {schedule!r}")
    if tol is not None:
        rule = replace(rule, gtol=tol)  # a gradient-norm tolerance ends adaptive stages too
    if total is None and hasattr(stages, "__len__"):
        total = len(stages)  # type: ignore[arg-type]
    opts = _PassOptions(schedule, rule, steps, lr, tol, final_steps, graphs)
    trace: list[StageTrace] = []

    def report(info: StageTrace) -> None:
        info = replace(info, total=total)
        trace.append(info)
        if progress is not None:
            progress(info)

    x, f, cost = _surf_pass(stages, b, x_init, A, opts, report)
    rounds = [RoundPoint("surf", x, f, cost.clone())]
    per_pass = len(trace)
    rescue = schedule != "paper" and rule.rescue_rtol is not None
    reusable = iter(stages) is not stages  # a one-shot iterator cannot be streamed again
    for round_ in range(1, rule.rescue_rounds + 1 if rescue and reusable else 1):
        idx = not_fitted(f, b, rule.rescue_rtol).nonzero().squeeze(1)  # type: ignore[arg-type]
        if idx.numel() == 0:
            break
        moved = torch.zeros(x.shape[0], dtype=torch.bool)
        moved[idx.cpu()] = True
        total = (round_ + 1) * per_pass
        report_rescue = _rescue_reporter(report, round_ * per_pass, moved, x, f, round_)
        start = restart_latents(x_init[idx], round_, prior)
        x_r, f_r, c_r = _surf_pass(stages, b[idx], start, A, opts, report_rescue)
        # "clearly lower": two runs that end in the same flat minimum differ by float noise,
        # and a bare < would then pick by batch-size rounding (coalesced != solo result)
        better = f_r < (1 - RESCUE_MARGIN) * f[idx].nan_to_num(nan=float("inf"))
        x, f = x.clone(), f.clone()  # the trace may hold these very tensors (CPU .cpu())
        x[idx[better]], f[idx[better]] = x_r[better], f_r[better]
        cost[idx.cpu()] += c_r
        rounds.append(RoundPoint(f"rescue {round_}", x, f, cost.clone()))
    return SolveResult(x, f, int(round(float(cost.mean()))), trace, cost, rounds)


def _rescue_reporter(
    report: Callable[[StageTrace], None],
    offset: int,
    moved: torch.Tensor,
    x: torch.Tensor,
    f: torch.Tensor,
    round_: int = 1,
) -> Callable[[StageTrace], None]:
    """Reports a rescue pass's stages as full-batch stages `offset`, `offset` + 1, ...: the
    rescued targets show their values in this pass, the others the result they already have."""
    base_f, base_norm = f.cpu(), x.norm(dim=1).cpu()

    def on_stage(info: StageTrace) -> None:
        full_f, full_norm = base_f.clone(), base_norm.clone()
        full_f[moved], full_norm[moved] = info.objective, info.x_norm
        stage = offset + info.stage
        report(
            replace(
                info, stage=stage, objective=full_f, x_norm=full_norm, action=None, moved=moved,
                pass_name="rescue", pass_round=round_,
            )
        )

    return on_stage
