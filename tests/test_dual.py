"""surfing.dual: the Jacobian along a layer chain equals autograd's, and anything it does not
know falls back to torch.func (tiny networks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import surfing.lm
from surfing.architectures import build_generator
from surfing.dual import chain, chain_jacobian
from surfing.lm import jacobian
from surfing.measure import gaussian_matrix
from surfing.solvers import uniform_latents
from surfing.trajectory import frozen

ARCHS = [
    {"kind": "infogan", "latent_dim": 3, "width": 0.05},
    {"kind": "conv", "latent_dim": 4, "channels": 1, "size": 8, "width": 0.1},
    {"kind": "conv", "latent_dim": 2, "channels": 3, "size": 32, "width": 0.05},
    {"kind": "relu", "latent_dim": 3, "hidden": [7, 11], "out_dim": 13},
]


def trained_looking(G: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and batch-norm statistics far from the init's (mean 0, var 1, scale 1,
    shift 0), so a wrong shift or scale in a tangent shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in G.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=g))
                    m.bias.copy_(torch.randn(n, generator=g))
            elif isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.ConvTranspose1d
                            | nn.ConvTranspose2d):  # fmt: skip
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    return frozen(G)


def reference(G: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, n, k) by reverse-mode autograd, one target at a time."""
    rows = [torch.autograd.functional.jacobian(lambda z: G(z[None]).flatten(), x[i])
            for i in range(x.shape[0])]  # fmt: skip
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"{a['kind']}-k{a['latent_dim']}")
def test_builtin_chains_are_the_forward_pass_and_give_its_jacobian(arch: dict) -> None:
    torch.manual_seed(0)
    G = trained_looking(build_generator(arch))
    k = arch["latent_dim"]
    x = uniform_latents(5, k, seed=3)
    layers = chain(G)
    assert layers is not None
    with torch.no_grad():
        y = G(x)
        assert torch.equal(nn.Sequential(*layers)(x).reshape(y.shape), y)
        out, J = chain_jacobian(layers, x)
    torch.testing.assert_close(out, y.flatten(1), atol=1e-6, rtol=1e-5)
    ref = reference(G, x)
    assert J.shape == ref.shape == (5, y[0].numel(), k)
    torch.testing.assert_close(J, ref, atol=1e-5, rtol=1e-4)
    assert J.abs().max() > 1e-2  # not a vanishing Jacobian that any map would match


def test_lm_jacobian_goes_along_the_chain_and_agrees_with_torch_func(monkeypatch) -> None:
    G = trained_looking(build_generator(ARCHS[0]))
    x = uniform_latents(4, 3, seed=1)
    A = gaussian_matrix(0, 20, 784)
    with torch.no_grad():
        out_c, J_c = chain_jacobian(chain(G), x)  # type: ignore[arg-type]
    for M in (None, A):
        out, J = jacobian(G, x, M)
        assert torch.equal(J, J_c if M is None else M @ J_c)  # the values LM uses are these
        assert torch.equal(out, out_c if M is None else out_c @ M.T)
        monkeypatch.setattr(surfing.lm, "LAYER_CHAIN", False)
        out_f, J_f = jacobian(G, x, M)
        monkeypatch.setattr(surfing.lm, "LAYER_CHAIN", True)
        torch.testing.assert_close(J, J_f, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out, out_f, atol=1e-6, rtol=1e-5)


class Chained(nn.Module):
    """A generator declaring an arbitrary chain: every layer type surfing.dual knows."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def layer_chain(self) -> list[nn.Module]:
        return list(self.net)


def every_kind() -> list[nn.Module]:
    return [
        nn.Linear(3, 24),
        nn.BatchNorm1d(24),
        nn.LeakyReLU(0.1),
        nn.Unflatten(1, (4, 6)),
        nn.Conv1d(4, 6, 3, padding=1, bias=False),
        nn.Tanh(),
        nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1),
        nn.Identity(),
        nn.Unflatten(2, (3, 4)),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2),
        nn.BatchNorm2d(4, affine=False),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1),
        nn.Sigmoid(),
        nn.Flatten(),
    ]


def test_every_supported_layer_kind_gives_autograd_jacobian() -> None:
    torch.manual_seed(1)
    G = trained_looking(Chained(every_kind()), seed=2)
    x = uniform_latents(3, 3, seed=4)
    layers = chain(G)
    assert layers is not None
    with torch.no_grad():
        out, J = chain_jacobian(layers, x)
        y = G(x)
    torch.testing.assert_close(out, y.flatten(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(J, reference(G, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "change",
    [
        "gelu",  # a layer type it does not know
        "train",  # batch norm on batch statistics mixes the rows
        "reflect",  # padding other than zeros
        "flatten0",  # a reshape across rows
        "undeclared",  # no layer_chain at all
    ],
)
def test_what_it_does_not_know_goes_to_torch_func(change: str) -> None:
    torch.manual_seed(3)
    layers = [nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Unflatten(1, (2, 4)),
              nn.Conv1d(2, 2, 3, padding=1), nn.Flatten(), nn.Linear(8, 5)]  # fmt: skip
    G = Chained(layers)
    if change == "gelu":
        G.net[2] = nn.GELU()
    elif change == "reflect":
        G.net[4] = nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect")
    elif change == "flatten0":
        G.net[5] = nn.Flatten(0)
        G.net[6] = nn.Identity()
    G = trained_looking(G)
    if change == "train":
        G.net[1].train()
    if change == "undeclared":
        G = frozen(nn.Sequential(*G.net))
    assert chain(G) is None
    if change in ("gelu", "reflect"):  # per-row generators: the torch.func path still works
        x = uniform_latents(3, 3, seed=5)
        out, J = jacobian(G, x, None)
        torch.testing.assert_close(J, reference(G, x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out, G(x).flatten(1).detach(), atol=1e-6, rtol=1e-5)
