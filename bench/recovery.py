"""The exact-recovery batch the LM studies share: x* from seed, x_init from seed + 1, A as
surfing.experiments.sensing draws it (None: A = I), b = A G_T(x*)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models_store import ModelStore, default_store_root
from surfing.experiments.sensing import measurement_matrix
from surfing.latents import sample_latents
from surfing.trajectory import final_generator


@dataclass
class Recovery:
    G: torch.nn.Module
    x_star: torch.Tensor
    x_init: torch.Tensor
    A: torch.Tensor | None
    b: torch.Tensor
    latent_dim: int
    prior: str


def recovery(model: str, models_dir: str | None, m: int, trials: int, seed: int) -> Recovery:
    store = ModelStore(models_dir or default_store_root())
    manifest = store.manifest(model)
    k, prior = manifest.latent_dim, manifest.latent_prior
    G = final_generator(store, model)
    x_star = sample_latents(trials, k, seed, prior)
    x_init = sample_latents(trials, k, seed + 1, prior)
    A = measurement_matrix(seed, m, manifest.n_pixels, torch.device("cpu")) if m else None
    with torch.no_grad():
        y = G(x_star).flatten(1)
    return Recovery(G, x_star, x_init, A, y if A is None else y @ A.T, k, prior)
