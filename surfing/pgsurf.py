"""Algorithm 3.2, projected-gradient surfing, on expansive ReLU networks with biases.

G(x, theta) = V relu(W_d ... relu(W_1 x + b_1) ... + b_d) is piecewise linear in x: fixing the
sign of every hidden pre-activation (an *activation pattern*) fixes a polytope P of inputs
and an affine map G(x) = J x + c on it, so f(x) = 1/2 ||A G(x) - b||^2 is a convex quadratic
on P. Between two close networks theta(delta(t-1)) and theta(delta t) the global minimiser
can only move into a piece whose pattern differs from the current one in rows whose
pre-activation is already within tau of zero (the set S(x, theta, tau) of the paper).
Algorithm 3.2 therefore enumerates those pieces, runs projected gradient descent on each,
and keeps the best: Theorem 3.3 says this tracks the global minimiser when delta is small.

Everything here is float64 numpy (projections need the precision, and k is tiny).
Projection onto a polytope is a least-distance program, solved exactly by non-negative least
squares (Lawson & Hanson 1974, ch. 23) -- scipy.optimize.nnls, no QP solver needed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import nnls

from surfing.nets import ExpansiveReLUNet


@dataclass(frozen=True)
class Params:
    """theta = (W_1, b_1, ..., W_d, b_d, V) of an expansive ReLU net, as float64 arrays."""

    Ws: tuple[np.ndarray, ...]
    bs: tuple[np.ndarray, ...]
    V: np.ndarray

    @classmethod
    def of(cls, G: ExpansiveReLUNet) -> Params:
        def arr(t: torch.Tensor) -> np.ndarray:
            return t.detach().cpu().double().numpy().copy()

        return cls(
            tuple(arr(layer.weight) for layer in G.layers),
            tuple(arr(layer.bias) for layer in G.layers),
            arr(G.V.weight),
        )

    @property
    def k(self) -> int:
        return self.Ws[0].shape[1]

    def pre_activations(self, x: np.ndarray) -> list[np.ndarray]:
        """Hidden pre-activations for x of shape (k,) or (N, k)."""
        h, pre = np.asarray(x, dtype=np.float64), []
        for W, b in zip(self.Ws, self.bs, strict=True):
            z = h @ W.T + b
            pre.append(z)
            h = np.maximum(z, 0.0)
        return pre

    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(self.pre_activations(x)[-1], 0.0) @ self.V.T


Pattern = tuple[np.ndarray, ...]  # one bool array per hidden layer: True = active (z >= 0)


def pattern_at(p: Params, x: np.ndarray) -> Pattern:
    return tuple(z >= 0 for z in p.pre_activations(x))


@dataclass
class Piece:
    """One linear piece: G(x) = J x + c on the polytope {x : C x <= h}."""

    pattern: Pattern
    J: np.ndarray
    c: np.ndarray
    C: np.ndarray
    h: np.ndarray


def piece(p: Params, pattern: Pattern) -> Piece:
    """Affine map and polytope of an activation pattern, built layer by layer.

    The pre-activation of layer i is Z_i x + z_i, affine in x given the earlier layers'
    patterns; an active row requires Z x + z >= 0, an inactive one Z x + z <= 0.
    """
    k = p.k
    M, e = np.eye(k), np.zeros(k)
    Cs, hs = [], []
    for W, b, s in zip(p.Ws, p.bs, pattern, strict=True):
        Z, z = W @ M, W @ e + b
        sign = np.where(s, -1.0, 1.0)
        Cs.append(sign[:, None] * Z)
        hs.append(-sign * z)
        M, e = s[:, None] * Z, s * z
    return Piece(pattern, p.V @ M, p.V @ e, np.vstack(Cs), np.concatenate(hs))


def project(C: np.ndarray, h: np.ndarray, v: np.ndarray, tol: float = 1e-10) -> np.ndarray | None:
    """Orthogonal projection of v onto {x : C x <= h}; None when the polytope is empty.

    With x = v + u this is the least-distance program min ||u|| s.t. (-C) u >= C v - h, whose
    solution is read off the residual of one NNLS: E = [-C^T; (Cv - h)^T], f = e_{k+1}.
    """
    r = C @ v - h
    if np.all(r <= tol):
        return v.copy()
    k = len(v)
    E = np.vstack([-C.T, r[None, :]])
    f = np.zeros(k + 1)
    f[-1] = 1.0
    w, _ = nnls(E, f, maxiter=50 * E.shape[1])
    res = E @ w - f
    if abs(res[-1]) < tol:  # residual 0 <=> the constraints are inconsistent
        return None
    return v - res[:k] / res[-1]


def _quadratic(pc: Piece, A: np.ndarray | None, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f on the piece as 1/2 ||M x - d||^2."""
    if A is None:
        return pc.J, b - pc.c
    return A @ pc.J, b - A @ pc.c


def pgd(
    pc: Piece,
    A: np.ndarray | None,
    b: np.ndarray,
    x0: np.ndarray,
    max_iter: int = 2000,
    tol: float = 1e-12,
) -> tuple[np.ndarray, float, int] | None:
    """Projected gradient descent on one piece (lines 4-8 of Algorithm 3.2), step 1/L with
    L = ||M||^2 the exact gradient Lipschitz constant. Returns (x, f, iterations), or None
    when the piece is empty."""
    M, d = _quadratic(pc, A, b)
    x = project(pc.C, pc.h, x0)
    if x is None:
        return None
    L = float(np.linalg.norm(M, 2)) ** 2
    it = 0
    if L > 0:
        for it in range(1, max_iter + 1):  # noqa: B007 -- `it` is reported
            nxt = project(pc.C, pc.h, x - (M.T @ (M @ x - d)) / L)
            if nxt is None:  # numerically on the edge of an empty set: stop where we are
                break
            done = np.linalg.norm(nxt - x) <= tol * (1.0 + np.linalg.norm(x))
            x = nxt
            if done:
                break
    return x, 0.5 * float(np.sum((M @ x - d) ** 2)), it


def piece_minimum(
    pc: Piece, A: np.ndarray | None, b: np.ndarray, x0: np.ndarray
) -> tuple[np.ndarray, float] | None:
    """The exact minimiser of f over the piece (the limit of `pgd`), or None if empty.

    With M = QR of full column rank, u = R x - Q^T d turns the problem into a least-distance
    program min ||u|| over a polytope: one NNLS. Rank-deficient pieces fall back to `pgd`.
    """
    M, d = _quadratic(pc, A, b)
    Q, R = np.linalg.qr(M)
    s = np.abs(np.diag(R))
    if len(s) < pc.J.shape[1] or s.min() <= 1e-9 * max(s.max(), 1e-300):
        out = pgd(pc, A, b, x0)
        return None if out is None else (out[0], out[1])
    Rinv = np.linalg.inv(R)
    qd = Q.T @ d
    u = project(pc.C @ Rinv, pc.h - pc.C @ Rinv @ qd, np.zeros(len(qd)))
    if u is None:
        return None
    x = Rinv @ (u + qd)
    return x, 0.5 * float(np.sum((M @ x - d) ** 2))


def nearby_pieces(
    p: Params, x: np.ndarray, tau: float, max_free: int = 16
) -> tuple[list[Piece], int, int]:
    """The non-empty pieces of P(x, theta, tau): patterns that differ from x's own only in
    rows with |pre-activation| < tau (at most `max_free` of them, those closest to zero).

    Of the 2^|S| sign choices most give empty polytopes, so they are enumerated depth first,
    layer by layer, and a branch is cut as soon as the constraints decided so far (all rows of
    earlier layers, the fixed and already chosen rows of this one) have no common point.
    Returns (pieces, |S|, patterns tested)."""
    pre = p.pre_activations(x)
    sizes = [len(z) for z in pre]
    offsets = np.cumsum([0, *sizes])
    rows = [(abs(z[j]), i, j) for i, z in enumerate(pre) for j in np.flatnonzero(np.abs(z) < tau)]
    free = sorted((i, j) for _, i, j in sorted(rows)[:max_free])
    is_free = np.zeros(offsets[-1], dtype=bool)
    for i, j in free:
        is_free[offsets[i] + j] = True
    pattern = [z >= 0 for z in pre]
    found: list[Piece] = []
    tested = 0

    def visit(n: int, witness: np.ndarray) -> None:
        nonlocal tested
        tested += 1
        layer = free[n][0] if n < len(free) else len(sizes)
        decided = np.zeros(offsets[-1], dtype=bool)
        decided[: offsets[min(layer + 1, len(sizes))]] = True
        undecided_here = [offsets[i] + j for i, j in free[n:] if i == layer]
        decided[undecided_here] = False
        pc = piece(p, tuple(s.copy() for s in pattern))
        C, h = pc.C[decided], pc.h[decided]
        if np.any(C @ witness > h + 1e-10):  # the parent's point is cut off: look again
            found_point = project(C, h, x)
            if found_point is None:
                return
            witness = found_point
        if n == len(free):
            found.append(pc)
            return
        i, j = free[n]
        for bit in (False, True):
            pattern[i][j] = bit
            visit(n + 1, witness)

    visit(0, x)
    return found, len(rows), tested


@dataclass
class PGStep:
    """One step of Algorithm 3.2: the new iterate and how much searching it took."""

    x: np.ndarray
    objective: float
    slack_rows: int  # |S(x_{t-1}, theta(delta t), tau)|
    candidates: int  # partial and full patterns tested for emptiness (<= 2^(|S|+1))
    pieces: int  # non-empty pieces actually searched


def objective(p: Params, A: np.ndarray | None, b: np.ndarray, x: np.ndarray) -> float:
    out = p.forward(x)
    if A is not None:
        out = A @ out
    return 0.5 * float(np.sum((out - b) ** 2))


def pg_surf_step(
    p: Params,
    A: np.ndarray | None,
    b: np.ndarray,
    x_prev: np.ndarray,
    tau: float,
    exact: bool = False,
    max_free: int = 16,
) -> PGStep:
    """Lines 3-9 of Algorithm 3.2 for one network theta(delta t).

    `exact=True` replaces the inner projected-gradient loop by its limit (`piece_minimum`)."""
    pieces, slack, tested = nearby_pieces(p, x_prev, tau, max_free)
    best_x, best_f = x_prev, objective(p, A, b, x_prev)
    for pc in pieces:
        out = piece_minimum(pc, A, b, x_prev) if exact else pgd(pc, A, b, x_prev)
        if out is not None and out[1] < best_f:
            best_x, best_f = out[0], out[1]
    return PGStep(best_x, best_f, slack, tested, len(pieces))


@dataclass
class PGResult:
    x: np.ndarray
    objective: float
    steps: list[PGStep] = field(default_factory=list)


def pg_surf(
    flow: Iterable[Params],
    b: np.ndarray,
    x0: np.ndarray,
    tau: float,
    A: np.ndarray | None = None,
    exact: bool = False,
) -> PGResult:
    """Algorithm 3.2 over theta(delta), theta(2 delta), ..., from x0 = argmin f(., theta(0)).

    `flow` excludes theta(0): x0 is its minimiser, found by the caller (for a random
    network plain descent finds it -- Theorem 3.1 -- or use `global_minimum`)."""
    x, steps = np.asarray(x0, dtype=np.float64), []
    f = float("nan")
    for p in flow:
        step = pg_surf_step(p, A, b, x, tau, exact)
        x, f = step.x, step.objective
        steps.append(step)
    return PGResult(x, f, steps)


def global_minimum(
    p: Params,
    A: np.ndarray | None,
    b: np.ndarray,
    extent: float = 3.0,
    grid: int = 201,
    top: int | None = 256,
    polish_tau: float = 0.0,
) -> tuple[np.ndarray, float, int]:
    """Brute-force argmin of f for small k: evaluate f on a dense grid over
    [-extent, extent]^k, then minimise exactly over the piece of each of the `top` best grid
    points (every distinct piece the grid touches when top is None). Returns
    (x, f, pieces solved). Pieces narrower than the grid spacing can be missed; each piece's
    minimum is exact and may lie outside the box. `polish_tau` > 0 then repeats one
    Algorithm 3.2 step on the same network from the best point until f stops dropping: a
    search of every piece within that slack, which catches the thin neighbouring pieces a
    coarse grid (k = 3) misses -- `exhaustive_minimum` measures how often that is needed."""
    k = p.k
    axis = np.linspace(-extent, extent, grid)
    pts = np.stack(np.meshgrid(*([axis] * k), indexing="ij"), axis=-1).reshape(-1, k)
    out = p.forward(pts)
    if A is not None:
        out = out @ A.T
    vals = 0.5 * np.sum((out - b) ** 2, axis=1)
    order = np.argsort(vals) if top is None else np.argsort(vals)[:top]
    seen: dict[bytes, np.ndarray] = {}
    for i in order:
        key = np.concatenate(pattern_at(p, pts[i])).tobytes()
        seen.setdefault(key, pts[i])
    best_x, best_f = pts[order[0]], float(vals[order[0]])
    for x_start in seen.values():
        sol = piece_minimum(piece(p, pattern_at(p, x_start)), A, b, x_start)
        if sol is not None and sol[1] < best_f:
            best_x, best_f = sol
    while polish_tau > 0:
        step = pg_surf_step(p, A, b, best_x, polish_tau, exact=True)
        if step.objective >= best_f - 1e-12 * (1.0 + abs(best_f)):
            break
        best_x, best_f = step.x, step.objective
    return best_x, best_f, len(seen)


def all_pieces(p: Params) -> list[Piece]:
    """Every non-empty linear piece of G(., theta) on R^k: the search of Algorithm 3.2 with
    every row free (tau = inf). Exponential in general, but ~2 * 10^4 pieces for k = 3 and
    48 hidden units -- affordable once per network, so it can referee `global_minimum`, whose
    grid may miss a thin piece. The pieces do not depend on the target: reuse them."""
    rows = sum(len(b) for b in p.bs)
    return nearby_pieces(p, np.zeros(p.k), np.inf, max_free=rows)[0]


def exhaustive_minimum(
    pieces: list[Piece], A: np.ndarray | None, b: np.ndarray
) -> tuple[np.ndarray, float, int]:
    """The exact global minimum of f over `pieces` (all of them: `all_pieces`).

    The unconstrained least-squares minimum of a piece's quadratic is a lower bound on its
    constrained one, so pieces are solved in increasing order of that bound until it passes
    the best value found: a handful of NNLS solves instead of one per piece.
    Returns (x, f, pieces solved)."""
    Ms = np.stack([_quadratic(pc, A, b)[0] for pc in pieces])
    ds = np.stack([_quadratic(pc, A, b)[1] for pc in pieces])
    fit = np.einsum("pnk,pk->pn", Ms, np.einsum("pkn,pn->pk", np.linalg.pinv(Ms), ds))
    bound = 0.5 * np.sum((fit - ds) ** 2, axis=1)
    best_x, best_f, solved = np.full(Ms.shape[2], np.nan), np.inf, 0
    for i in np.argsort(bound):
        if bound[i] >= best_f:
            break
        solved += 1
        sol = piece_minimum(pieces[i], A, b, np.zeros(Ms.shape[2]))
        if sol is not None and sol[1] < best_f:
            best_x, best_f = sol
    return best_x, best_f, solved
