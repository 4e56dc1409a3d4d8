"""Trainers (VAE, DCGAN, WGAN, WGAN-GP) that record the generator's trajectory as they go.

The generator -- parameters and batch-norm buffers -- is written to the store at step 0 (the
random initialisation theta_0) and every `every` generator steps after it, then once more at
the end if the last step was not already recorded. Each checkpoint is streamed to disk as soon
as it is made, so the trajectory is never held in memory and a crash keeps what was written.

The generator is the paper's InfoGAN net on 1 x 28 x 28 images (Fashion-MNIST by default) or the
generic DCGAN-style "conv" net on any C x S x S the user's images have (`surfing.nets`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models_store import ModelStore
from surfing.architectures import build_generator
from surfing.data import load_fashion_mnist
from surfing.nets import ConvTrunk

METHODS = ("vae", "dcgan", "wgan", "wgan-gp")
ARCHS = ("infogan", "conv")  # the trainable image generators


@dataclass
class TrainConfig:
    method: str
    latent_dim: int
    epochs: float = 1.0
    every: int = 40
    width: float = 1.0
    batch_size: int = 64
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    n_critic: int = 5  # critic steps per generator step (WGAN, WGAN-GP)
    clip: float = 0.01  # WGAN weight clipping
    gp_lambda: float = 10.0  # WGAN-GP gradient penalty
    seed: int = 0
    max_steps: int | None = None  # stop early (tests, smoke runs)
    arch: str = "infogan"  # "conv" for images other than 1 x 28 x 28

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, not {self.arch!r}")
        if self.latent_dim < 1 or self.every < 1 or self.batch_size < 1:
            raise ValueError("latent_dim, every and batch_size must be positive")


def prior_name(method: str) -> str:
    """The latent distribution a method trains on, as the manifest's `latent_prior` names it."""
    return "normal" if method == "vae" else "uniform"


def generator_arch(cfg: TrainConfig, channels: int, size: int) -> dict:
    """The manifest's `arch` for images of shape (channels, size, size)."""
    if cfg.arch == "infogan":
        if (channels, size) != (1, 28):
            raise ValueError(
                f"the infogan generator makes 1 x 28 x 28 images, not {channels} x {size} x "
                f"{size}; use the conv generator (--arch conv)"
            )
        return {"kind": "infogan", "latent_dim": cfg.latent_dim, "width": cfg.width}
    return {
        "kind": "conv",
        "latent_dim": cfg.latent_dim,
        "channels": channels,
        "size": size,
        "width": cfg.width,
    }


def latent_prior(cfg: TrainConfig, n: int, device: torch.device) -> torch.Tensor:
    """U[-1, 1]^k for the GANs (the paper's x* prior), N(0, I) for the VAE."""
    if prior_name(cfg.method) == "normal":
        return torch.randn(n, cfg.latent_dim, device=device)
    return torch.rand(n, cfg.latent_dim, device=device) * 2 - 1


def batches(images: torch.Tensor, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled mini-batches (full batches only, so batch norm always sees 64)."""
    while True:
        perm = torch.randperm(len(images), generator=gen)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            yield images[perm[i : i + batch_size]]


class Method:
    """One training recipe: `step` does one generator update (and its critic updates)."""

    def __init__(
        self,
        cfg: TrainConfig,
        G: nn.Module,
        device: torch.device,
        channels: int = 1,
        size: int = 28,
    ) -> None:
        self.cfg, self.G, self.device = cfg, G, device
        wgan_gp = cfg.method == "wgan-gp"
        out = 2 * cfg.latent_dim if cfg.method == "vae" else 1
        self.D = ConvTrunk(out, cfg.width, not wgan_gp, channels, size).to(device)
        self.opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr, betas=cfg.betas)

    def step(self, data: Iterator[torch.Tensor]) -> dict[str, float]:
        method = self.cfg.method
        if method == "vae":
            return self._vae(next(data).to(self.device))
        if method == "dcgan":
            return self._dcgan(next(data).to(self.device))
        return self._wgan(data)

    def _vae(self, real: torch.Tensor) -> dict[str, float]:
        """ELBO with a Bernoulli decoder; the encoder is the discriminator trunk with 2k outputs."""
        mu, logvar = self.D(real).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = F.binary_cross_entropy(self.G(z), real, reduction="sum") / len(real)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum() / len(real)
        self.opt_g.zero_grad()
        self.opt_d.zero_grad()
        (recon + kl).backward()
        self.opt_g.step()
        self.opt_d.step()
        return {"recon": recon.item(), "kl": kl.item()}

    def _dcgan(self, real: torch.Tensor) -> dict[str, float]:
        """Non-saturating GAN loss with BCE on logits."""
        n = len(real)
        fake = self.G(latent_prior(self.cfg, n, self.device))
        ones, zeros = torch.ones(n, 1, device=self.device), torch.zeros(n, 1, device=self.device)
        d_loss = F.binary_cross_entropy_with_logits(
            self.D(real), ones
        ) + F.binary_cross_entropy_with_logits(self.D(fake.detach()), zeros)
        self.opt_d.zero_grad()
        d_loss.backward()
        self.opt_d.step()
        g_loss = F.binary_cross_entropy_with_logits(self.D(fake), ones)
        self.opt_g.zero_grad()
        g_loss.backward()
        self.opt_g.step()
        return {"d": d_loss.item(), "g": g_loss.item()}

    def _wgan(self, data: Iterator[torch.Tensor]) -> dict[str, float]:
        """n_critic critic updates (clipped weights, or gradient penalty), then one G update."""
        cfg = self.cfg
        for _ in range(cfg.n_critic):
            real = next(data).to(self.device)
            fake = self.G(latent_prior(cfg, len(real), self.device)).detach()
            d_loss = self.D(fake).mean() - self.D(real).mean()
            if cfg.method == "wgan-gp":
                d_loss = d_loss + cfg.gp_lambda * self._gradient_penalty(real, fake)
            self.opt_d.zero_grad()
            d_loss.backward()
            self.opt_d.step()
            if cfg.method == "wgan":
                with torch.no_grad():
                    for p in self.D.parameters():
                        p.clamp_(-cfg.clip, cfg.clip)
        g_loss = -self.D(self.G(latent_prior(cfg, cfg.batch_size, self.device))).mean()
        self.opt_g.zero_grad()
        g_loss.backward()
        self.opt_g.step()
        return {"d": d_loss.item(), "g": g_loss.item()}

    def _gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        eps = torch.rand(len(real), 1, 1, 1, device=self.device)
        mix = (eps * real + (1 - eps) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(self.D(mix).sum(), mix, create_graph=True)
        return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def generator_state(G: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (batch-norm running statistics), detached CPU copies."""
    return {k: v.detach().cpu().clone() for k, v in G.state_dict().items()}


def train(
    cfg: TrainConfig,
    store: ModelStore,
    model_id: str,
    images: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    dataset: str = "fashion-mnist",
) -> dict[str, float]:
    """Train one generator on `images` (N, C, S, S) in [0, 1] (default: Fashion-MNIST's
    training split), recording its trajectory under `model_id`; returns a summary."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    if images is None:
        images, _ = load_fashion_mnist("train")
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be (N, C, S, S), got {list(images.shape)}")
    if len(images) < cfg.batch_size:
        raise ValueError(
            f"{len(images)} training images, fewer than one batch of {cfg.batch_size}; "
            "give more images or a smaller batch size"
        )
    channels, size = int(images.shape[1]), int(images.shape[2])
    arch = generator_arch(cfg, channels, size)
    steps_per_epoch = len(images) // cfg.batch_size
    if cfg.method in ("wgan", "wgan-gp"):
        steps_per_epoch //= cfg.n_critic  # each generator step eats n_critic batches
    steps_per_epoch = max(1, steps_per_epoch)  # a tiny data set still trains for its epochs
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)

    G = build_generator(arch).to(device)
    method = Method(cfg, G, device, channels, size)
    data = batches(images, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    training = {**asdict(cfg), "steps": total, "steps_per_epoch": steps_per_epoch}
    t0 = time.perf_counter()
    with store.create(
        model_id,
        arch=arch,
        latent_dim=cfg.latent_dim,
        output_shape=[channels, size, size],
        value_range=[0.0, 1.0],
        training=training,
        dataset=dataset,
        latent_prior=prior_name(cfg.method),
    ) as writer:
        G.train()
        writer.add(0, generator_state(G))
        bar = tqdm(range(1, total + 1), desc=f"{cfg.method} {model_id}", disable=not progress)
        for step in bar:
            losses = method.step(data)
            if step % cfg.every == 0 or step == total:
                writer.add(step, generator_state(G))
            if step % 10 == 0:
                bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
    return {"steps": total, "seconds": time.perf_counter() - t0}


def save_sample_grid(G: nn.Module, latent: torch.Tensor, path: Path) -> None:
    """An 8x8 grid of samples from G (eval mode) as a PNG: a quick look at what was learnt."""
    from surfing.images import save_grid

    with torch.no_grad():
        save_grid(G.eval()(latent).cpu(), path)
