"""Algorithm 3.2 (surfing.pgsurf): pieces, projections, and a two-piece network whose global
minimiser is known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surfing.nets import ExpansiveReLUNet
from surfing.pgsurf import (
    Params,
    all_pieces,
    exhaustive_minimum,
    global_minimum,
    objective,
    pattern_at,
    pg_surf,
    pg_surf_step,
    pgd,
    piece,
    piece_minimum,
    project,
)


def two_piece(v1: list[float], v2: list[float]) -> Params:
    """G(x) = v1 relu(x) + v2 relu(-x), x in R: two linear pieces meeting at x = 0."""
    G = ExpansiveReLUNet(1, [2], len(v1))
    with torch.no_grad():
        G.layers[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        G.layers[0].bias.zero_()
        G.V.weight.copy_(torch.tensor([v1, v2]).T)
    return Params.of(G)


def closed_form(v1: np.ndarray, v2: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """Minimisers and minima of 1/2||G(x) - y||^2 on x >= 0 (G = v1 x) and x <= 0 (G = -v2 x)."""
    xa = max(0.0, v1 @ y / (v1 @ v1))
    xb = min(0.0, -(v2 @ y) / (v2 @ v2))
    return xa, 0.5 * np.sum((v1 * xa - y) ** 2), xb, 0.5 * np.sum((-v2 * xb - y) ** 2)


V1, V2, Y = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([2.0, 1.0, 0.5])


def test_pieces_match_the_network() -> None:
    G = ExpansiveReLUNet(2, [5, 7], 4)
    p = Params.of(G)
    x = np.array([0.3, -0.7])
    pc = piece(p, pattern_at(p, x))
    np.testing.assert_allclose(pc.J @ x + pc.c, p.forward(x), atol=1e-12)
    np.testing.assert_allclose(
        p.forward(x), G(torch.tensor(x[None]).float())[0].detach().double(), atol=1e-5
    )
    assert np.all(pc.C @ x <= pc.h + 1e-12)  # x lies in its own piece


def test_projection() -> None:
    C = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # the box [-1, 1]^2
    h = np.ones(4)
    np.testing.assert_allclose(project(C, h, np.array([3.0, 0.5])), [1.0, 0.5], atol=1e-9)
    np.testing.assert_allclose(project(C, h, np.array([-2.0, -5.0])), [-1.0, -1.0], atol=1e-9)
    np.testing.assert_allclose(project(C, h, np.array([0.2, 0.1])), [0.2, 0.1])
    # half-plane x + y <= 0: projection of (1, 1) is (0, 0)
    np.testing.assert_allclose(
        project(np.array([[1.0, 1.0]]), np.zeros(1), np.ones(2)), [0.0, 0.0], atol=1e-9
    )
    assert project(np.array([[1.0], [-1.0]]), np.array([-1.0, -1.0]), np.zeros(1)) is None


def test_two_piece_minimisers_in_closed_form() -> None:
    p = two_piece(V1.tolist(), V2.tolist())
    xa, fa, xb, fb = closed_form(V1, V2, Y)
    assert xa > 0 > xb and fa < fb  # two local minima; the global one is on x > 0
    for x0, (x_want, f_want) in ((0.5, (xa, fa)), (-0.5, (xb, fb))):
        pc = piece(p, pattern_at(p, np.array([x0])))
        x, f, _ = pgd(pc, None, Y, np.array([x0]))
        assert x[0] == pytest.approx(x_want, abs=1e-8) and f == pytest.approx(f_want)
        x, f = piece_minimum(pc, None, Y, np.array([x0]))
        assert x[0] == pytest.approx(x_want, abs=1e-10) and f == pytest.approx(f_want)
    x, f, _ = global_minimum(p, None, Y, grid=101)
    assert x[0] == pytest.approx(xa) and f == pytest.approx(fa)


def test_alg32_step_jumps_to_the_other_piece_only_within_slack() -> None:
    """From x = -0.02 (piece x <= 0, whose own minimum -1 is only local), a slack tau > 0.02
    puts both pieces in P(x, theta, tau) and the step lands on the global minimiser xa = 2;
    a slack below 0.02 searches one piece and stays at its minimum, as descent does."""
    p = two_piece(V1.tolist(), V2.tolist())
    xa, fa, xb, fb = closed_form(V1, V2, Y)
    wide = pg_surf_step(p, None, Y, np.array([-0.02]), tau=0.05)
    assert wide.x[0] == pytest.approx(xa) and wide.objective == pytest.approx(fa)
    assert wide.slack_rows == 2 and wide.pieces == 4  # x > 0, x < 0 and the point x = 0 twice
    narrow = pg_surf_step(p, None, Y, np.array([-0.02]), tau=0.01)
    assert narrow.x[0] == pytest.approx(xb) and narrow.pieces == 1
    from surfing.solvers import direct

    G = ExpansiveReLUNet(1, [2], 3)
    G.load_state_dict(
        {
            "layers.0.weight": torch.tensor([[1.0], [-1.0]]),
            "layers.0.bias": torch.zeros(2),
            "V.weight": torch.tensor(np.stack([V1, V2], 1)).float(),
        }
    )
    res = direct(G, torch.tensor(Y[None]).float(), torch.tensor([[-0.02]]), steps=1500, lr=0.01)
    assert float(res.x[0, 0]) == pytest.approx(xb, abs=1e-3)  # descent stays in the local min


def test_alg32_tracks_the_closed_form_minimiser_along_a_flow() -> None:
    """v1(s) = (1 - 2s, 1, 0), v2(s) = (2s - 1, 1, 0), y = e_1: the minimiser moves
    continuously from x > 0 through the kink at s = 1/2 to x < 0; with small steps in s
    Algorithm 3.2 must sit on the closed-form global minimiser at every step."""
    y = np.array([1.0, 0.0, 0.0])
    ss = np.linspace(0.0, 1.0, 51)
    flow = [two_piece([1 - 2 * s, 1.0, 0.0], [2 * s - 1, 1.0, 0.0]) for s in ss]
    want = []
    for s in ss:
        v1, v2 = np.array([1 - 2 * s, 1.0, 0.0]), np.array([2 * s - 1, 1.0, 0.0])
        xa, fa, xb, fb = closed_form(v1, v2, y)
        want.append(xa if fa <= fb else xb)
    res = pg_surf(flow[1:], y, np.array([want[0]]), tau=0.1)
    got = [st.x[0] for st in res.steps]
    np.testing.assert_allclose(got, want[1:], atol=1e-7)
    assert max(st.pieces for st in res.steps) <= 4


def test_alg32_with_infinite_slack_is_exhaustive_search() -> None:
    """tau = inf frees every row: Algorithm 3.2 then searches every piece and must agree with
    the brute-force global minimum at every step of a random flow (small k, few units).
    These tiny nets are not expansive, so their minima can sit far out: a wide box."""
    torch.manual_seed(3)
    base = ExpansiveReLUNet(2, [3, 4], 5)
    other = ExpansiveReLUNet(2, [3, 4], 5)
    flow = []
    for s in np.linspace(0, 1, 6):
        G = ExpansiveReLUNet(2, [3, 4], 5)
        G.load_state_dict(
            {k: (1 - s) * v + s * other.state_dict()[k] for k, v in base.state_dict().items()}
        )
        flow.append(Params.of(G))
    y = np.random.default_rng(0).normal(size=5)
    x0, _, _ = global_minimum(flow[0], None, y, extent=10, grid=121, top=None)
    res = pg_surf(flow[1:], y, x0, tau=np.inf, exact=True)
    for p, st in zip(flow[1:], res.steps, strict=True):
        assert st.slack_rows == 7 and st.candidates <= 2**8
        _, f_best, _ = global_minimum(p, None, y, extent=10, grid=121, top=None)
        assert st.objective == pytest.approx(f_best, rel=1e-6, abs=1e-9)
        assert st.objective == pytest.approx(objective(p, None, y, st.x), rel=1e-9, abs=1e-12)


def test_gaussian_measurements() -> None:
    """With A, pieces are still quadratics: pgd and the exact piece minimum agree."""
    rng = np.random.default_rng(1)
    p = Params.of(ExpansiveReLUNet(2, [6, 9], 8))
    A = rng.normal(size=(5, 8)) / np.sqrt(5)
    b = rng.normal(size=5)
    x = rng.uniform(-1, 1, size=2)
    pc = piece(p, pattern_at(p, x))
    x1, f1, _ = pgd(pc, A, b, x, max_iter=20000)
    x2, f2 = piece_minimum(pc, A, b, x)
    assert f1 == pytest.approx(f2, rel=1e-6, abs=1e-9)


def test_exhaustive_minimum_matches_the_closed_form() -> None:
    """x > 0, x < 0 and the point x = 0 (twice: both rows off, both rows on) are all the
    pieces of the two-piece net; the exact minimum over them is the closed-form one."""
    p = two_piece(V1.tolist(), V2.tolist())
    pieces = all_pieces(p)
    assert len(pieces) == 4
    xa, fa, _, _ = closed_form(V1, V2, Y)
    x, f, solved = exhaustive_minimum(pieces, None, Y)
    assert x[0] == pytest.approx(xa) and f == pytest.approx(fa) and 1 <= solved <= 4


def test_polished_grid_referee_is_exact_on_a_coarse_grid() -> None:
    """A 5 x 5 grid keeping one best point can miss the global minimum of a random net;
    polishing with an all-row slack cannot, and both agree with exhaustive enumeration,
    which must also match the old referee on a fine grid over every touched piece."""
    torch.manual_seed(5)
    p = Params.of(ExpansiveReLUNet(2, [3, 4], 5))
    y = np.random.default_rng(2).normal(size=5)
    _, f_exact, solved = exhaustive_minimum(all_pieces(p), None, y)
    _, f_fine, _ = global_minimum(p, None, y, extent=10, grid=121, top=None)
    assert f_exact == pytest.approx(f_fine, rel=1e-9, abs=1e-12)
    assert solved < len(all_pieces(p))  # the lower bound prunes some pieces
    _, f_coarse, _ = global_minimum(p, None, y, extent=10, grid=5, top=1)
    _, f_polished, _ = global_minimum(p, None, y, extent=10, grid=5, top=1, polish_tau=np.inf)
    assert f_polished == pytest.approx(f_exact, rel=1e-9, abs=1e-12) and f_coarse >= f_polished
