"""The example's own generator, and the factory surfing builds it with by name.

Not a surfing built-in: the service learns of it only through this package's entry point
(`digits-mlp` in the `surfing.architectures` group of pyproject.toml).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import ARCH_NAME

IMAGE_SHAPE = (1, 8, 8)


class DigitsGenerator(nn.Module):
    """MLP decoder: latent (B, k) -> (B, 1, 8, 8) pixel intensities in [0, 1]."""

    def __init__(self, latent_dim: int = 8, hidden: int = 128) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden),
            nn.ELU(),
            nn.Linear(hidden, hidden),
            nn.ELU(),
            nn.Linear(hidden, 64),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(z)).view(-1, *IMAGE_SHAPE)


def arch(latent_dim: int = 8, hidden: int = 128) -> dict[str, Any]:
    """The manifest's `arch` for this generator: a name and its config, nothing executable."""
    return {"kind": ARCH_NAME, "latent_dim": latent_dim, "hidden": hidden}


def build(config: dict[str, Any]) -> nn.Module:
    """Entry-point factory: surfing calls it with the manifest's whole `arch` dict."""
    return DigitsGenerator(int(config["latent_dim"]), int(config.get("hidden", 128)))
