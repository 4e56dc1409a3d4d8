"""Levenberg–Marquardt on the latent: second-order steps where the unknown is only k-dimensional.

f(x) = 1/2 ||A G(x) - b||^2 is a least-squares problem in x ∈ R^k with k ≈ 5..20, so the
Gauss–Newton matrix (AJ)ᵀ(AJ) is only k×k. Its cost is the Jacobian J = ∂G/∂x, which forward-mode
AD gives as k tangent passes batched together with one primal pass. When the target lies on the
range of G (the exact-recovery setting of the paper, residual 0 at x*), Gauss–Newton converges
quadratically, so a handful of steps replace the hundreds of Adam steps a stage otherwise needs.

Everything is per target: each target has its own damping λ, its own accept/reject decision and
its own convergence test, and converged targets leave the batch (they cost nothing more). So a
target's path does not depend on the other targets in its batch (generators are in eval mode).
The same holds for `track_step` (the "lm-stride" surfing schedule): whether a target skips a
checkpoint, reuses its stored Jacobian or computes a fresh one is decided from that target's
own residual and Jacobian only, so coalescing jobs into one batch changes no target's path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import jvp, vmap

from surfing.dual import chain, chain_jacobian


def residual(
    G: nn.Module, x: torch.Tensor, b: torch.Tensor, A: torch.Tensor | None
) -> torch.Tensor:
    """r(x) = A G(x) - b per target, shape (B, m)."""
    out = G(x).flatten(1)
    if A is not None:
        out = out @ A.T
    return out - b


def objective(
    G: nn.Module, x: torch.Tensor, b: torch.Tensor, A: torch.Tensor | None
) -> torch.Tensor:
    """Per-target f(x) = 1/2 ||A G(x) - b||^2, shape (B,)."""
    return 0.5 * residual(G, x, b, A).pow(2).sum(dim=1)


def into_ball(x: torch.Tensor, radius: float | None) -> torch.Tensor:
    """x scaled back onto the ball ||x|| <= radius (per target); None: unchanged.

    A Gauss–Newton step is as long as the network is flat in x: on an early checkpoint, or
    for a target off the range of G (a sigmoid output reaches 0 only at infinity), it can send
    the latent to ||x|| ~ 1e4-1e7, from where no later stage brings it back.
    """
    if radius is None:
        return x
    norm = x.norm(dim=1, keepdim=True)
    return x * (radius / norm.clamp_min(radius))


# Jacobians of a generator that declares its layer chain go through surfing.dual (one pass over
# B(k + 1) rows, 0.5-0.7x the time of torch.func's jvp on a CPU: docs/performance.md,
# "Session 14"); False sends every generator through torch.func (bench/jacobian_bench.py).
LAYER_CHAIN = True

# On a CPU the tangent passes of ~25 targets (k = 10: ~275 rows) fit the caches; one pass over
# all of them at 100 targets (1,100 rows) ran ~15 % slower per row. A GPU wants big batches.
CPU_JACOBIAN_ROWS = 256


def jacobian(
    G: nn.Module, x: torch.Tensor, A: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A G(x) of shape (B, m), its Jacobian A ∂G/∂x of shape (B, m, k)).

    Forward mode: a generator with a layer chain pushes the latents and their k unit tangents
    through it as one batch (surfing.dual); any other has the k tangents vmapped over one
    batched jvp, so the primal pass is shared and the tangent passes run as one big batch
    (eval-mode batch norm is per-sample). On a CPU the targets go through in chunks of about
    CPU_JACOBIAN_ROWS rows.
    """
    k = x.shape[1]
    chunk = max(1, CPU_JACOBIAN_ROWS // (k + 1))
    if x.device.type == "cpu" and x.shape[0] > chunk:
        parts = [jacobian(G, x[i : i + chunk], A) for i in range(0, x.shape[0], chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    layers = chain(G) if LAYER_CHAIN else None
    if layers is not None:
        out, J = chain_jacobian(layers, x)
    else:
        eye = torch.eye(k, dtype=x.dtype, device=x.device)

        def flat(z: torch.Tensor) -> torch.Tensor:
            return G(z).flatten(1)

        def along(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return jvp(flat, (x,), (e.expand_as(x),))

        out, tangents = vmap(along, out_dims=(None, 0))(eye)  # tangents: (k, B, n)
        J = tangents.permute(1, 2, 0)  # (B, n, k)
    if A is not None:
        out = out @ A.T
        J = A @ J  # (m, n) @ (B, n, k) -> (B, m, k)
    return out, J


@dataclass
class LMResult:
    x: torch.Tensor  # (B, k)
    objective: torch.Tensor  # (B,)
    iters: torch.Tensor  # (B,) Jacobians computed per target
    evals: torch.Tensor  # (B,) generator cost per target in forward+backward equivalents
    jacobian: torch.Tensor | None = None  # (B, m, k) last Jacobian computed (valid where iters > 0)


def gauss_newton_step(
    J: torch.Tensor, r: torch.Tensor, lam: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped Gauss–Newton step per target and the decrease of f it predicts.

    Solves (JᵀJ + λ diag(JᵀJ) + λ·1e-9 I) δ = -Jᵀr (J: (B, m, k), r: (B, m), λ scalar or (B,)).
    The predicted decrease is f(x) - 1/2||r + Jδ||² = -gᵀδ - 1/2 δᵀHδ: the stride schedule
    compares it with the actual decrease to judge whether a stored Jacobian is still good.
    """
    H = J.transpose(1, 2) @ J  # (b, k, k)
    g = (J.transpose(1, 2) @ r.unsqueeze(2)).squeeze(2)  # (b, k)
    d = torch.diagonal(H, dim1=1, dim2=2)
    lam_t = lam[:, None] if isinstance(lam, torch.Tensor) else lam
    damp = lam_t * (d + 1e-9 * d.amax(1, keepdim=True) + 1e-12)
    # solve_ex: no error check, so no host sync (a GPU stage stays capturable as a CUDA graph);
    # a singular system gives a non-finite step, whose trial f is not lower: LM rejects it.
    step = -torch.linalg.solve_ex(H + torch.diag_embed(damp), g, check_errors=False)[0]
    Hs = (H @ step.unsqueeze(2)).squeeze(2)
    pred = -(g * step).sum(1) - 0.5 * (step * Hs).sum(1)
    return step, pred


def levenberg_marquardt(
    G: nn.Module,
    x: torch.Tensor,
    b: torch.Tensor,
    A: torch.Tensor | None,
    max_iters: int = 30,
    xtol: float = 1e-6,
    ftol: float = 1e-12,
    lam: float = 1e-3,
    max_accepts: int | None = None,
    radius: float | None = None,
    stall: float = 0.0,
    stall_above: torch.Tensor | None = None,
) -> LMResult:
    """Minimise 1/2||A G(x) - b||^2 per target by damped Gauss–Newton from x.

    Step: (JᵀJ + λ diag(JᵀJ) + λ·1e-9 I) δ = -Jᵀr. Accepted (f drops) ⇒ λ /= 3; rejected ⇒
    λ *= 4 and the same Jacobian is reused (no recomputation). A target stops when an accepted
    step is shorter than `xtol` (its latent no longer moves), when f < `ftol`, or after
    `max_iters` trial steps, or (with `max_accepts`) after that many accepted steps -- one
    surfing stage takes a single accepted step, retrying a rejected one with more damping on
    the same Jacobian. Trial points are kept in the ball ||x|| <= `radius` (`into_ball`).
    With `stall` > 0, a target whose f is still above `stall_above` (per target) also stops
    after two accepted steps in a row that each lowered f by less than the fraction `stall`:
    it is creeping down a basin that does not fit it, which a restart leaves anyway.
    Cost is reported in forward+backward equivalents (a forward pass
    counts 1/2): a Jacobian is one primal plus k tangent passes, (1 + k)/2; a trial point 1/2.
    The residual at the start comes from the first Jacobian's primal pass.
    """
    B, k = x.shape
    x = x.detach().clone()
    lam_t = torch.full((B,), float(lam), dtype=x.dtype, device=x.device)
    iters = torch.zeros(B, dtype=torch.long)
    forwards = torch.zeros(B, dtype=x.dtype)
    active = torch.ones(B, dtype=torch.bool, device=x.device)
    stale = torch.ones(B, dtype=torch.bool, device=x.device)  # Jacobian must be recomputed
    if max_iters > 0:
        # Every target needs a Jacobian at x, whose primal pass is G(x): the residual comes
        # from it instead of a separate forward pass (1 of the k + 3 passes of a 1-step stage).
        with torch.no_grad():
            out, J = jacobian(G, x, A)
        r, Jall = out - b, J.contiguous()
        stale[:] = False
        iters += 1
        forwards += 1 + k
    else:
        with torch.no_grad():
            r = residual(G, x, b, A)
        forwards += 1
        Jall = torch.zeros(B, r.shape[1], k, dtype=x.dtype, device=x.device)
    f = 0.5 * r.pow(2).sum(1)
    active &= f >= ftol
    accepts = torch.zeros(B, dtype=torch.long, device=x.device)
    slow = torch.zeros(B, dtype=torch.long, device=x.device)  # accepted slow steps in a row
    for _ in range(max_iters):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        fresh = idx[stale[idx]]
        if fresh.numel():
            with torch.no_grad():
                _, J = jacobian(G, x[fresh], A)
            Jall[fresh] = J
            stale[fresh] = False
            iters[fresh.cpu()] += 1
            forwards[fresh.cpu()] += 1 + k
        step, _ = gauss_newton_step(Jall[idx], r[idx], lam_t[idx])
        x_try = into_ball(x[idx] + step, radius)
        step = x_try - x[idx]
        with torch.no_grad():
            r_try = residual(G, x_try, b[idx], A)
        forwards[idx.cpu()] += 1
        f_try = 0.5 * r_try.pow(2).sum(1)
        ok = f_try < f[idx]
        acc = idx[ok]
        if stall > 0 and stall_above is not None:
            crept = f_try[ok] > (1 - stall) * f[acc]
            slow[acc] = torch.where(crept & (f_try[ok] > stall_above[acc]), slow[acc] + 1, 0)
        x[acc], r[acc], f[acc] = x_try[ok], r_try[ok], f_try[ok]
        stale[acc] = True
        lam_t[idx] = torch.where(ok, lam_t[idx] / 3, lam_t[idx] * 4).clamp(1e-12, 1e12)
        small = step.norm(dim=1) < xtol
        done = (ok & small) | (f[idx] < ftol) | (~ok & small & (lam_t[idx] > 1e6))
        done |= slow[idx] >= 2
        if max_accepts is not None:
            accepts[acc] += 1
            done |= accepts[idx] >= max_accepts
        active[idx[done]] = False
    return LMResult(x, f, iters, forwards / 2, Jall)


# What a target did at one checkpoint of the stride schedule (see `track_step`).
SKIP, CHORD, FRESH, CHORD_THEN_FRESH = 0, 1, 2, 3


@dataclass
class TrackState:
    """What the stride schedule remembers per target from one checkpoint to the next.

    The stage stream is one-pass (an earlier network is gone once the next one arrives), so
    nothing about an earlier network can be re-evaluated; what is kept instead is each
    target's last Jacobian (computed at an earlier latent on an earlier network) and how many
    chord steps it has served since. That is enough to estimate, from one forward pass on the
    new network, how far the stage optimum has moved away from the target's latent.
    """

    jacobian: torch.Tensor  # (B, m, k)
    has: torch.Tensor  # (B,) a Jacobian was computed for this target
    age: torch.Tensor  # (B,) chord steps taken with it since it was computed

    @classmethod
    def empty(cls, B: int, m: int, k: int, like: torch.Tensor) -> TrackState:
        has = torch.zeros(B, dtype=torch.bool, device=like.device)
        age = torch.zeros(B, dtype=torch.long, device=like.device)
        return cls(like.new_zeros(B, m, k), has, age)


def track_step(
    G: nn.Module,
    x: torch.Tensor,
    b: torch.Tensor,
    A: torch.Tensor | None,
    state: TrackState | None,
    skip_xtol: float,
    max_age: int,
    eta: float = 0.25,
    broyden: bool = True,
    lam: float = 1e-3,
    xtol: float = 1e-6,
    radius: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TrackState, torch.Tensor]:
    """One checkpoint of the stride schedule: per target, skip, a chord step, or an LM step.

    A target with a stored Jacobian J pays one forward pass on the new network (residual r)
    and with J predicts the Gauss–Newton step δ = -(JᵀJ + λD)⁻¹Jᵀr, i.e. how far the stage
    optimum now lies from its latent:

    - ‖δ‖ < `skip_xtol`: the optimum barely moved across this checkpoint -- the target skips it
      (cost 1/2). This is the adaptive checkpoint stride, decided per target from the network in
      hand, so nothing has to be revisited: a target whose optimum jumps steps at the checkpoint
      where the jump is seen, exactly as the plain schedule would.
    - else, if J has served fewer than `max_age` chord steps: the chord step x + δ with the
      stored J (cost 1/2 for the trial point), kept if f drops by at least `eta` times the
      decrease the model predicts; with `broyden`, J is then corrected along δ by the secant
      it just observed (rank one, free). The age cap matters: iterating with a fixed J
      converges to where Jᵀr = 0, which is not the stage optimum while the network moves.
    - else (no stored J, too old, or the chord step failed): one Levenberg–Marquardt iteration
      with a fresh Jacobian ((1 + k)/2 + 1/2), as the plain "lm" schedule does. A target with
      no stored J (or with skipping and chords both off) goes straight here: the Jacobian's
      primal pass gives its residual.

    With `skip_xtol` = 0 and `max_age` = 0 this is exactly one `levenberg_marquardt` iteration
    on every target. All decisions are per target, so a target's path does not depend on its
    batch. Returns (x, f, evals per target, state, action per target: SKIP/CHORD/FRESH/
    CHORD_THEN_FRESH).
    """
    B, k = x.shape
    x = x.detach().clone()
    if state is None:
        state = TrackState.empty(B, b.shape[1], k, x)
    f = torch.full((B,), float("nan"), dtype=x.dtype, device=x.device)
    cost = torch.zeros(B, dtype=torch.float64)
    action = torch.full((B,), FRESH, dtype=torch.int8)
    need = torch.ones(B, dtype=torch.bool, device=x.device)
    probing = skip_xtol > 0 or max_age > 0
    idx = state.has.nonzero().squeeze(1) if probing else state.has.new_zeros(0, dtype=torch.long)
    if idx.numel():
        with torch.no_grad():
            r = residual(G, x[idx], b[idx], A)  # the probe: one forward pass on the new network
        cost[idx.cpu()] += 0.5
        f_idx = 0.5 * r.pow(2).sum(1)
        f[idx] = f_idx
        step, pred = gauss_newton_step(state.jacobian[idx], r, lam)
        skip = step.norm(dim=1) < skip_xtol
        need[idx[skip]] = False
        action[idx[skip].cpu()] = SKIP
        chord = ~skip & (state.age[idx] < max_age)
        ci = idx[chord]
        if ci.numel():
            x_try = into_ball(x[ci] + step[chord], radius)
            d = x_try - x[ci]
            with torch.no_grad():
                r_try = residual(G, x_try, b[ci], A)
            cost[ci.cpu()] += 0.5
            f_try = 0.5 * r_try.pow(2).sum(1)
            ok = f_try < f_idx[chord] - eta * pred[chord]
            acc = ci[ok]
            if broyden and acc.numel():
                Ja, da = state.jacobian[acc], d[ok]
                miss = (r_try[ok] - r[chord][ok]) - (Ja @ da.unsqueeze(2)).squeeze(2)
                upd = miss.unsqueeze(2) * (da / da.pow(2).sum(1, keepdim=True)).unsqueeze(1)
                state.jacobian[acc] = Ja + upd
            x[acc], f[acc] = x_try[ok], f_try[ok]
            state.age[acc] += 1
            need[acc] = False
            action[acc.cpu()] = CHORD
            action[ci[~ok].cpu()] = CHORD_THEN_FRESH
    fresh = need.nonzero().squeeze(1)
    if fresh.numel():
        res = levenberg_marquardt(
            G, x[fresh], b[fresh], A, max_iters=1, xtol=xtol, lam=lam, radius=radius
        )
        x[fresh], f[fresh] = res.x, res.objective
        cost[fresh.cpu()] += res.evals.double().cpu()
        got = (res.iters > 0).to(fresh.device)
        if got.any() and res.jacobian is not None:
            state.jacobian[fresh[got]] = res.jacobian[got]
            state.has[fresh[got]] = True
            state.age[fresh[got]] = 0
    return x, f, cost, state, action
