"""Latent priors: where starts, restarts and rescue draws come from (a manifest names one)."""

from __future__ import annotations

import torch

from models_store.manifest import LATENT_PRIORS as PRIORS  # U[-1, 1]^k (paper); N(0, I)


def check_prior(prior: object) -> str:
    if prior not in PRIORS:
        raise ValueError(f"unknown latent prior {prior!r}; known: {', '.join(PRIORS)}")
    return str(prior)


def draw(
    shape: tuple[int, ...],
    generator: torch.Generator,
    prior: str = "uniform",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One seeded draw from the prior on the CPU (reproducible on every device)."""
    if check_prior(prior) == "normal":
        return torch.randn(shape, generator=generator, dtype=dtype)
    return torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1


def sample_latents(
    n: int, k: int, seed: int, prior: str = "uniform", device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(n, k) latents from the prior, seeded; uniform matches `solvers.uniform_latents`."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return draw((n, k), g, prior).to(device)
