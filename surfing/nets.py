"""Networks: the InfoGAN-style generator the paper inverts, a DCGAN-style generator for any
C x H x W, their discriminator/critic and VAE encoder, and the expansive ReLU network of the
paper's theory section."""

from __future__ import annotations

import math

import torch
from torch import nn


def _w(base: int, width: float) -> int:
    """Scaled channel count; the width multiplier lets tests use a tiny network."""
    return max(1, round(base * width))


class InfoGANGenerator(nn.Module):
    """z(k) -> FC 1024 -> FC 128*7*7 -> ConvT 64 -> ConvT 1 -> sigmoid (Chen et al. 2016)."""

    def __init__(self, latent_dim: int, width: float = 1.0) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        h1, c1, c2 = _w(1024, width), _w(128, width), _w(64, width)
        self.c1 = c1
        self.fc = nn.Sequential(
            nn.Linear(latent_dim, h1),
            nn.BatchNorm1d(h1),
            nn.ReLU(),
            nn.Linear(h1, c1 * 7 * 7),
            nn.BatchNorm1d(c1 * 7 * 7),
            nn.ReLU(),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(c1, c2, 4, 2, 1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.ConvTranspose2d(c2, 1, 4, 2, 1),
            nn.Sigmoid(),
        )
        init_normal(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.fc(z).view(-1, self.c1, 7, 7))

    def layer_chain(self) -> list[nn.Module]:
        """forward as a chain of layers (surfing.dual computes Jacobians along it)."""
        return [*self.fc, nn.Unflatten(1, (self.c1, 7, 7)), *self.deconv]


CONV_CHANNELS = (1, 3)
CONV_SIZES = (8, 16, 28, 32, 64)


def conv_plan(size: int) -> tuple[int, int]:
    """(base, ups): a base x base map doubled `ups` times reaches `size` (28 = 7 * 2^2)."""
    if size not in CONV_SIZES:
        raise ValueError(
            f"image size {size} is not supported by the conv generator; use one of {CONV_SIZES}"
        )
    base = 7 if size == 28 else 4
    return base, (size // base).bit_length() - 1


class ConvGenerator(nn.Module):
    """DCGAN-style: z(k) -> FC c_0*b*b -> ConvT (x2, +BN, ReLU) ... -> ConvT (x2) to C -> sigmoid.

    The base b is 4 (7 for size 28) and `ups` transposed convs double it to the size; level i
    has c_i = 64 * 2^(ups - 1 - i) channels (times `width`), so a 32 x 32 image goes
    256 @ 4x4 -> 128 @ 8x8 -> 64 @ 16x16 -> C @ 32x32 (Radford et al. 2016, one level less).
    """

    def __init__(self, latent_dim: int, channels: int, size: int, width: float = 1.0) -> None:
        super().__init__()
        if channels not in CONV_CHANNELS:
            raise ValueError(f"channels must be one of {CONV_CHANNELS}, not {channels}")
        base, ups = conv_plan(size)
        self.latent_dim, self.channels, self.size, self.base = latent_dim, channels, size, base
        widths = [_w(64 * 2 ** (ups - 1 - i), width) for i in range(ups)]
        self.c0 = widths[0]
        self.fc = nn.Sequential(
            nn.Linear(latent_dim, self.c0 * base * base),
            nn.BatchNorm1d(self.c0 * base * base),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.ReLU()]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Sigmoid()]
        self.deconv = nn.Sequential(*layers)
        init_normal(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.fc(z).view(-1, self.c0, self.base, self.base))

    def layer_chain(self) -> list[nn.Module]:
        """forward as a chain of layers (surfing.dual computes Jacobians along it)."""
        return [*self.fc, nn.Unflatten(1, (self.c0, self.base, self.base)), *self.deconv]


class ConvTrunk(nn.Module):
    """Mirror of the generator: Conv 64 s2 -> Conv 128 s2 (+norm) -> FC 1024 (+norm) -> FC out.

    `out_dim` = 1 gives the GAN discriminator / WGAN critic, 2k the VAE encoder (mean, log-var).
    `norm=False` drops batch norm, which the gradient penalty of WGAN-GP requires. Images larger
    than 32 get more stride-2 convs (channels doubling) until the map is at most 8 x 8, which
    keeps the FC layer small; the default 1 x 28 x 28 trunk is the paper's, layer for layer.
    """

    def __init__(
        self,
        out_dim: int,
        width: float = 1.0,
        norm: bool = True,
        channels: int = 1,
        size: int = 28,
    ) -> None:
        super().__init__()
        c1, c2, h = _w(64, width), _w(128, width), _w(1024, width)

        def bn(layer: type[nn.Module], n: int) -> nn.Module:
            return layer(n) if norm else nn.Identity()

        layers: list[nn.Module] = [nn.Conv2d(channels, c1, 4, 2, 1), nn.LeakyReLU(0.2)]
        c, c_next, side = c1, c2, size // 2
        while True:  # the paper's second conv, then more while the map is over 8 x 8
            layers += [nn.Conv2d(c, c_next, 4, 2, 1), bn(nn.BatchNorm2d, c_next), nn.LeakyReLU(0.2)]
            c, c_next, side = c_next, 2 * c_next, side // 2
            if side <= 8:
                break
        self.net = nn.Sequential(
            *layers,
            nn.Flatten(),
            nn.Linear(c * side * side, h),
            bn(nn.BatchNorm1d, h),
            nn.LeakyReLU(0.2),
            nn.Linear(h, out_dim),
        )
        init_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """DCGAN initialisation: weights N(0, 0.02), batch-norm scales N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


class ExpansiveReLUNet(nn.Module):
    """G(x) = V relu(W_d ... relu(W_1 x + b_1) ... + b_d), the network of Theorem 3.1.

    Entries of W_i and b_i are N(0, 1/n_i) (n_i = width of layer i), V is N(0, 1/n).
    """

    def __init__(self, latent_dim: int, hidden: list[int], out_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        dims = [latent_dim, *hidden]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.V = nn.Linear(dims[-1], out_dim, bias=False)
        with torch.no_grad():
            for layer in self.layers:
                std = 1.0 / math.sqrt(layer.out_features)
                layer.weight.normal_(0.0, std)
                layer.bias.normal_(0.0, std)
            self.V.weight.normal_(0.0, 1.0 / math.sqrt(out_dim))

    def hidden_pre_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Pre-activations of every hidden layer: they define the linear piece x lies on."""
        pre = []
        for layer in self.layers:
            z = layer(x)
            pre.append(z)
            x = torch.relu(z)
        return pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.V(x)

    def layer_chain(self) -> list[nn.Module]:
        """forward as a chain of layers (surfing.dual computes Jacobians along it)."""
        return [m for layer in self.layers for m in (layer, nn.ReLU())] + [self.V]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
