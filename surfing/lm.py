"""Levenberg–Marquardt on the latent: second-order steps where the unknown is only k-dimensional.

f(x) = 1/2 ||A G(x) - b||^2 is a least-squares problem in x ∈ R^k with k ≈ 5..20, so the
Gauss–Newton matrix (AJ)ᵀ(AJ) is only k×k. Its cost is the Jacobian J = ∂G/∂x, which forward-mode
AD gives as k tangent passes batched together with one primal pass. When the target lies on the
range of G (the exact-recovery setting of the paper, residual 0 at x*), Gauss–Newton converges
quadratically, so a handful of steps replace the hundreds of Adam steps a stage otherwise needs.

Everything is per target: each target has its own damping λ, its own accept/reject decision and
its own convergence test, and converged targets leave the batch (they cost nothing more). So a
target's path does not depend on the other targets in its batch (generators are in eval mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import jvp, vmap


def residual(
    G: nn.Module, x: torch.Tensor, b: torch.Tensor, A: torch.Tensor | None
) -> torch.Tensor:
    """r(x) = A G(x) - b per target, shape (B, m)."""
    out = G(x).flatten(1)
    if A is not None:
        out = out @ A.T
    return out - b


def jacobian(
    G: nn.Module, x: torch.Tensor, A: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A G(x) of shape (B, m), its Jacobian A ∂G/∂x of shape (B, m, k)).

    Forward mode: the k unit tangents are vmapped over one batched jvp, so the primal pass is
    shared and the tangent passes run as one big batch (eval-mode batch norm is per-sample).
    """
    k = x.shape[1]
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


def levenberg_marquardt(
    G: nn.Module,
    x: torch.Tensor,
    b: torch.Tensor,
    A: torch.Tensor | None,
    max_iters: int = 30,
    xtol: float = 1e-6,
    ftol: float = 1e-12,
    lam: float = 1e-3,
) -> LMResult:
    """Minimise 1/2||A G(x) - b||^2 per target by damped Gauss–Newton from x.

    Step: (JᵀJ + λ diag(JᵀJ) + λ·1e-9 I) δ = -Jᵀr. Accepted (f drops) ⇒ λ /= 3; rejected ⇒
    λ *= 4 and the same Jacobian is reused (no recomputation). A target stops when an accepted
    step is shorter than `xtol` (its latent no longer moves), when f < `ftol`, or after
    `max_iters` Jacobians. Cost is reported in forward+backward equivalents (a forward pass
    counts 1/2): a Jacobian is one primal plus k tangent passes, (1 + k)/2; a trial point 1/2.
    """
    B, k = x.shape
    x = x.detach().clone()
    lam_t = torch.full((B,), float(lam), dtype=x.dtype, device=x.device)
    iters = torch.zeros(B, dtype=torch.long)
    forwards = torch.zeros(B, dtype=x.dtype)
    active = torch.ones(B, dtype=torch.bool, device=x.device)
    J: torch.Tensor | None = None  # Jacobian of the rows in `need`, kept across rejections
    with torch.no_grad():
        r = residual(G, x, b, A)
    forwards += 1
    f = 0.5 * r.pow(2).sum(1)
    Jall = torch.zeros(B, r.shape[1], k, dtype=x.dtype, device=x.device)
    stale = torch.ones(B, dtype=torch.bool, device=x.device)  # Jacobian must be recomputed
    active &= f >= ftol
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
        Ja, ra = Jall[idx], r[idx]
        H = Ja.transpose(1, 2) @ Ja  # (b, k, k)
        g = (Ja.transpose(1, 2) @ ra.unsqueeze(2)).squeeze(2)  # (b, k)
        d = torch.diagonal(H, dim1=1, dim2=2)
        damp = lam_t[idx, None] * (d + 1e-9 * d.amax(1, keepdim=True) + 1e-12)
        step = -torch.linalg.solve(H + torch.diag_embed(damp), g)
        x_try = x[idx] + step
        with torch.no_grad():
            r_try = residual(G, x_try, b[idx], A)
        forwards[idx.cpu()] += 1
        f_try = 0.5 * r_try.pow(2).sum(1)
        ok = f_try < f[idx]
        acc = idx[ok]
        x[acc], r[acc], f[acc] = x_try[ok], r_try[ok], f_try[ok]
        stale[acc] = True
        lam_t[idx] = torch.where(ok, lam_t[idx] / 3, lam_t[idx] * 4).clamp(1e-12, 1e12)
        small = step.norm(dim=1) < xtol
        done = (ok & small) | (f[idx] < ftol) | (~ok & small & (lam_t[idx] > 1e6))
        active[idx[done]] = False
    return LMResult(x, f, iters, forwards / 2)
