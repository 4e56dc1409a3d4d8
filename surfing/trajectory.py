"""Stream a stored trajectory as ready-to-use generators, one checkpoint at a time."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from models_store import Manifest, ModelStore
from surfing.nets import build_generator


def load_into(G: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Swap a checkpoint's parameters and batch-norm buffers into G (in place, eval mode)."""
    G.load_state_dict(tensors, strict=True)
    return G.eval()


def frozen(G: nn.Module) -> nn.Module:
    """Inversion differentiates w.r.t. the latent only: skip parameter gradients."""
    for p in G.parameters():
        p.requires_grad_(False)
    return G.eval()


class Generators:
    """Iterable of (index, step, G) over a trajectory with a known length.

    One module is built and its weights replaced per checkpoint, so memory stays at one
    network plus the store's one-checkpoint prefetch.
    """

    def __init__(
        self,
        store: ModelStore,
        model_id: str,
        stride: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        self.store, self.model_id, self.stride = store, model_id, stride
        self.device = torch.device(device)
        self.manifest: Manifest = store.manifest(model_id)
        n = len(self.manifest.checkpoints)
        self.indices = sorted(set(range(0, n, stride)) | {n - 1}) if n else []

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, int, nn.Module]]:
        G = frozen(build_generator(self.manifest.arch).to(self.device))
        for ckpt in self.store.checkpoints(self.model_id, stride=self.stride):
            tensors = {
                name: t.to(self.device, non_blocking=True) for name, t in ckpt.tensors.items()
            }
            yield ckpt.index, ckpt.step, load_into(G, tensors)


def generators(
    store: ModelStore, model_id: str, stride: int = 1, device: torch.device | str = "cpu"
) -> Generators:
    return Generators(store, model_id, stride, device)


def final_generator(
    store: ModelStore, model_id: str, device: torch.device | str = "cpu"
) -> nn.Module:
    """G_T, the last recorded network of the trajectory."""
    manifest = store.manifest(model_id)
    G = frozen(build_generator(manifest.arch).to(device))
    tensors = store.load(model_id, len(manifest.checkpoints) - 1)
    return load_into(G, {k: v.to(device) for k, v in tensors.items()})
