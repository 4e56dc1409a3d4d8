"""Measurement operators for f(x) = 1/2 ||A G(x) - A y||^2.

The Gaussian matrix is regenerated from (seed, m, n) so a client can reproduce it exactly:
    g = torch.Generator(device="cpu").manual_seed(seed)
    A = torch.randn(m, n, generator=g, dtype=torch.float32) / sqrt(m)
i.e. i.i.d. N(0, 1/m) entries, row-major, drawn on the CPU in float32.
"""

from __future__ import annotations

import math

import torch


def gaussian_matrix(seed: int, m: int, n: int) -> torch.Tensor:
    """A in R^{m x n} with i.i.d. N(0, 1/m) entries, identical for the same (seed, m, n)."""
    if m < 1 or n < 1:
        raise ValueError(f"matrix shape must be positive, got ({m}, {n})")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(m, n, generator=g, dtype=torch.float32) / math.sqrt(m)


def measure(y: torch.Tensor, A: torch.Tensor | None) -> torch.Tensor:
    """b = A y for a batch of targets (B, ...) -> (B, m); A = None is the identity."""
    flat = y.flatten(1)
    return flat if A is None else flat @ A.T.to(flat)
