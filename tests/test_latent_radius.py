"""Levenberg–Marquardt stays in the latent ball: a flat early network or a target off the
range of G must not send x to infinity (seen at ||x|| ~ 1e7 on a digits VAE)."""

from __future__ import annotations

import math

import torch
from torch import nn

from surfing.lm import into_ball, levenberg_marquardt, track_step
from surfing.solvers import StageRule, surf


class Sigmoid(nn.Module):
    """G(x) = sigmoid(W x): pixel 0 is reached only at infinity, like a trained decoder."""

    def __init__(self, k: int, n: int, scale: float, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(n, k, generator=g) * scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x @ self.W.T)


def test_into_ball_scales_only_points_outside() -> None:
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    out = into_ball(x, 2.0)
    assert torch.allclose(out[0], torch.tensor([1.2, 1.6]))
    assert torch.equal(out[1:], x[1:])
    assert into_ball(x, None) is x


def test_lm_runs_off_to_infinity_without_a_radius_and_not_with_one() -> None:
    k, n = 4, 32
    G = Sigmoid(k, n, 1.0, seed=0)
    G.W.abs_()  # every row has W x < 0 along x = -t (1, ..., 1)
    b = torch.zeros(2, n)  # all black: sigmoid(W x) reaches it only as t -> infinity
    x0 = torch.tensor([[0.1, -0.2, 0.3, 0.0], [0.5, 0.5, -0.5, 0.2]])
    free = levenberg_marquardt(G, x0, b, None, max_iters=40)
    radius = 3 * math.sqrt(k)
    kept = levenberg_marquardt(G, x0, b, None, max_iters=40, radius=radius)
    assert float(free.x.norm(dim=1).max()) > 3 * radius  # the failure the radius is for
    assert float(kept.x.norm(dim=1).max()) <= radius * (1 + 1e-5)
    f0 = 0.5 * (G(x0) - b).pow(2).sum(1)
    assert bool((kept.objective < f0).all())  # it still descends, inside the ball


def test_surf_keeps_every_stage_in_the_ball_on_flat_early_networks() -> None:
    k, n = 3, 48
    stages = [(t, 40 * t, Sigmoid(k, n, s, seed=1)) for t, s in enumerate((1e-3, 1e-2, 0.5, 1.0))]
    b = Sigmoid(k, n, 1.0, seed=1)(torch.tensor([[0.5, -0.2, 0.1], [-0.9, 0.4, 0.3]]))
    x0 = torch.tensor([[0.1, 0.1, 0.1], [-0.1, 0.2, 0.0]])
    for schedule in ("lm-stride", "lm"):
        free = surf(stages, b, x0, schedule=schedule,
                    rule=StageRule(head_stages=0, latent_radius=None))
        rule = StageRule(head_stages=0, latent_radius=3.0)
        kept = surf(stages, b, x0, schedule=schedule, rule=rule)
        bound = 3.0 * math.sqrt(k) * (1 + 1e-5)
        assert max(float(t.x_norm.max()) for t in free.trace) > bound  # flat nets blow it up
        assert max(float(t.x_norm.max()) for t in kept.trace) <= bound
        assert kept.x.norm(dim=1).max() <= bound


def test_track_step_chord_stays_in_the_ball() -> None:
    k, n = 2, 16
    G = Sigmoid(k, n, 1e-3, seed=2)  # nearly flat: every Gauss–Newton step is huge
    b = torch.rand(3, n, generator=torch.Generator().manual_seed(3))
    x = torch.zeros(3, k)
    state = None
    for _ in range(4):  # fresh steps, then chord steps with the stored Jacobian
        x, _, _, state, _ = track_step(G, x, b, None, state, 0.0, 2, radius=1.0)
        assert float(x.norm(dim=1).max()) <= 1.0 + 1e-6


def test_the_default_rule_bounds_the_latent() -> None:
    """Every default surf is bounded: with k = 3, 5 sqrt(3) ~ 8.7."""
    assert StageRule().radius(3) == 5.0 * math.sqrt(3)
    assert StageRule(latent_radius=None).radius(3) is None
