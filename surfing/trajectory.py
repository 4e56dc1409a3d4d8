"""Stream a stored trajectory as ready-to-use generators, one checkpoint at a time."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from models_store import Manifest, ModelStore
from surfing.architectures import StateMismatch, build_generator, check_state


def load_into(G: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Swap a checkpoint's parameters and batch-norm buffers into G (eval mode).

    The tensors become G's parameters (`assign`, no copy: copying 26 MB per checkpoint was
    most of what a surfing pass still waited for); G keeps its requires_grad flags. Safe
    because nothing mutates decoded checkpoint tensors (the store decodes into new tensors).
    """
    G.load_state_dict(tensors, strict=True, assign=True)
    return G.eval()


def frozen(G: nn.Module) -> nn.Module:
    """Inversion differentiates w.r.t. the latent only: skip parameter gradients."""
    for p in G.parameters():
        p.requires_grad_(False)
    return G.eval()


def meta_generator(arch: dict) -> nn.Module:
    """The architecture on the meta device: no memory, no random initialisation."""
    with torch.device("meta"):
        return frozen(build_generator(arch))


def checkpoint_generator(
    arch: dict, tensors: dict[str, torch.Tensor], template: nn.Module | None = None
) -> nn.Module:
    """A frozen generator holding exactly `tensors`, given to a meta-device copy of the
    architecture, so making one copies no weights (a copy of `template`, if given, is ~4x
    cheaper than building the architecture again). A checkpoint that does not fit the
    architecture raises StateMismatch naming the first bad key and both shapes."""
    G = copy.deepcopy(template) if template is not None else meta_generator(arch)
    try:
        load_into(G, tensors)
    except RuntimeError as e:  # torch's message lists every key; name the first one plainly
        check_state(arch, tensors)
        kind = arch.get("kind")
        raise StateMismatch(f"checkpoint does not fit architecture {kind!r}: {e}") from e
    left = [n for n, t in [*G.named_parameters(), *G.named_buffers()] if t.is_meta]
    if left:  # a tensor the checkpoint does not store (a non-persistent buffer)
        raise ValueError(f"checkpoint leaves {left[0]!r} of {arch.get('kind')!r} unset")
    return G


class Generators:
    """Iterable of (index, step, G) over a trajectory with a known length.

    Every checkpoint gets its own module, holding that checkpoint's tensors and nothing else:
    a consumer may read ahead (the solver looks one stage ahead to know which one is last)
    and each G it holds still is the network of its own index. Memory stays at the networks
    the consumer holds plus the store's prefetch.
    """

    def __init__(
        self,
        store: ModelStore,
        model_id: str,
        stride: int = 1,
        device: torch.device | str = "cpu",
        readers: int | None = None,
    ) -> None:
        self.store, self.model_id, self.stride = store, model_id, stride
        self.device = torch.device(device)
        # Parallel file readers of the store's prefetch (None: its default). 0: each checkpoint
        # is read in the consumer's thread when due: on a CPU whose cores the solver's threads
        # fill, that was faster for a big batch and slower for a few targets
        # (docs/performance.md, "Streaming").
        self.readers = readers
        self.manifest: Manifest = store.manifest(model_id)
        n = len(self.manifest.checkpoints)
        self.indices = sorted(set(range(0, n, stride)) | {n - 1}) if n else []

    def __len__(self) -> int:
        return len(self.indices)

    def _to_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Runs on the store's prefetch thread: the host-to-device copy of the next checkpoint
        # overlaps the solver's work on this one (on a GPU it was 41-47 % of surfing's time
        # when done here in the loop; docs/performance.md).
        return {name: t.to(self.device) for name, t in tensors.items()}

    def final(self) -> tuple[int, int, nn.Module]:
        """The last stage (index, step, G_T), loaded on its own: a solver that starts on the
        final network (schedule "portfolio") need not walk the stream to reach it."""
        if not self.indices:
            raise ValueError("surfing needs at least one checkpoint")
        index = self.indices[-1]
        tensors = self._to_device(self.store.load(self.model_id, index))
        G = checkpoint_generator(self.manifest.arch, tensors)
        return index, self.manifest.checkpoints[index].step, G

    def __iter__(self) -> Iterator[tuple[int, int, nn.Module]]:
        stream = self.store.checkpoints(
            self.model_id,
            stride=self.stride,
            prefetch=self.readers != 0,
            transform=None if self.device.type == "cpu" else self._to_device,
            readers=self.readers or None,
        )
        template = meta_generator(self.manifest.arch)
        for ckpt in stream:
            G = checkpoint_generator(self.manifest.arch, ckpt.tensors, template)
            yield ckpt.index, ckpt.step, G


def generators(
    store: ModelStore, model_id: str, stride: int = 1, device: torch.device | str = "cpu"
) -> Generators:
    return Generators(store, model_id, stride, device)


def final_generator(
    store: ModelStore, model_id: str, device: torch.device | str = "cpu"
) -> nn.Module:
    """G_T, the last recorded network of the trajectory."""
    manifest = store.manifest(model_id)
    tensors = store.load(model_id, len(manifest.checkpoints) - 1)
    return checkpoint_generator(manifest.arch, {k: v.to(device) for k, v in tensors.items()})
