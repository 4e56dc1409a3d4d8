"""Train the example generator as a VAE decoder on the digits, with its own loop, while
surfing's TrajectoryRecorder records the trajectory (one added line in the loop).

    python3 -m surfing_digits.train --id digits-vae --models-dir data/models --steps 3000
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surfing.record import TrajectoryRecorder

from .data import load_digits_split
from .model import DigitsGenerator, arch


class Encoder(nn.Module):
    """q(z | image): mean and log-variance of a diagonal Gaussian."""

    def __init__(self, latent_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.ELU(), nn.Linear(hidden, 2 * latent_dim)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=1)
        return mu, logvar


def negative_elbo(
    G: nn.Module, E: Encoder, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bernoulli reconstruction term + KL to N(0, I), per image; also G's reconstruction."""
    mu, logvar = E(x)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    recon = G(z)
    bce = F.binary_cross_entropy(recon, x, reduction="sum") / len(x)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum() / len(x)
    return bce + kl, bce, kl


def train(
    models_dir: str,
    model_id: str,
    steps: int = 3000,
    every: int = 40,
    latent_dim: int = 8,
    hidden: int = 128,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    overwrite: bool = False,
    log_every: int = 0,
) -> dict[str, Any]:
    """Train and record; returns losses and held-out errors so a caller can see it learnt."""
    torch.manual_seed(seed)
    images, _, test_images, _ = load_digits_split()
    G, E = DigitsGenerator(latent_dim, hidden), Encoder(latent_dim, hidden)
    opt = torch.optim.Adam([*G.parameters(), *E.parameters()], lr=lr)
    draw = torch.Generator().manual_seed(seed)
    config = {"method": "vae", "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}
    losses: list[float] = []
    t0 = time.perf_counter()
    with TrajectoryRecorder(
        models_dir,
        model_id,
        G,
        every=every,
        arch=arch(latent_dim, hidden),
        latent="normal",  # a VAE decoder is trained on N(0, I) latents
        value_range=(0.0, 1.0),
        dataset="sklearn-digits",
        training=config,
        overwrite=overwrite,
    ) as rec:
        if rec.resumed:
            # This loop keeps no state of its own to resume from (encoder, optimizer), and
            # appending a fresh run to an old trajectory would splice two different runs.
            raise SystemExit(
                f"model {model_id!r} is an interrupted recording; pass --overwrite to start over"
            )
        for step in range(1, steps + 1):
            x = images[torch.randint(len(images), (batch_size,), generator=draw)]
            loss, _, _ = negative_elbo(G, E, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(step)  # <- the one line surfing needs
            losses.append(loss.item())
            if log_every and step % log_every == 0:
                print(f"step {step:5d}  -ELBO {sum(losses[-log_every:]) / log_every:8.2f}")
    window = max(1, min(50, steps // 4))
    with torch.no_grad():
        G.eval()
        mu, _ = E(test_images)
        test_mse = F.mse_loss(G(mu), test_images).item()
        mean_mse = F.mse_loss(images.mean(0).expand_as(test_images), test_images).item()
    return {
        "steps": steps,
        "checkpoints": len(rec.manifest.checkpoints),
        "seconds": time.perf_counter() - t0,
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "test_recon_mse": test_mse,  # held-out digits through encoder and decoder
        "mean_digit_mse": mean_mse,  # the trivial guess, for comparison
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--id", required=True, help="model id in the store")
    p.add_argument("--models-dir", required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=40, help="record theta every N steps")
    p.add_argument("--latent-dim", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    summary = train(
        args.models_dir,
        args.id,
        steps=args.steps,
        every=args.every,
        latent_dim=args.latent_dim,
        hidden=args.hidden,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        overwrite=args.overwrite,
        log_every=max(1, args.steps // 10),
    )
    for key, value in summary.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
