"""Keep recently used trajectories warm in a worker.

`WarmStore` is a `ModelStore` whose `checkpoints()` and `load()` serve decoded tensors from an
LRU cache (already on the worker's device), so back-to-back jobs on the same model skip the
disk read, the hash check and the host-to-device copy. Entries are keyed by each checkpoint's
sha256 from the manifest: an overwritten model has new hashes, so stale weights are never
served. A trajectory is cached only if its selected checkpoints fit the budget as a whole;
otherwise it streams as usual (caching part of a sequential scan under LRU only thrashes).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch

from models_store import Checkpoint, ModelStore, Transform, select_indices


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class WarmStore(ModelStore):
    """ModelStore with an in-memory checkpoint cache of `budget_bytes` on `device`."""

    def __init__(self, root: str | Path, budget_bytes: int, device: torch.device | str) -> None:
        super().__init__(root)
        self.budget = budget_bytes
        self.device = torch.device(device)
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._used = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _get(self, sha: str) -> dict[str, torch.Tensor] | None:
        with self._lock:
            tensors = self._cache.get(sha)
            if tensors is not None:
                self._cache.move_to_end(sha)
            return tensors

    def _put(self, sha: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        size = _nbytes(tensors)
        if size > self.budget:
            return tensors
        moved = {k: v.to(self.device) for k, v in tensors.items()}
        with self._lock:
            if sha in self._cache:
                return self._cache[sha]
            while self._used + size > self.budget and self._cache:
                old, _ = self._cache.popitem(last=False)
                self._used -= self._sizes.pop(old)
            self._cache[sha] = moved
            self._sizes[sha] = size
            self._used += size
        return moved

    def checkpoints(
        self,
        model_id: str,
        stride: int = 1,
        prefetch: bool = True,
        verify: bool = True,
        transform: Transform | None = None,
        readers: int | None = None,
    ) -> Iterator[Checkpoint]:
        manifest = self.manifest(model_id)
        indices = select_indices(len(manifest.checkpoints), stride)
        infos = [manifest.checkpoints[i] for i in indices]
        cached = [self._get(info.sha256) for info in infos]
        if all(t is not None for t in cached):
            self.hits += len(indices)
            same = transform or (lambda tensors: tensors)
            return (
                Checkpoint(i, info.step, same(t))  # type: ignore[arg-type]
                for i, info, t in zip(indices, infos, cached, strict=True)
            )
        self.misses += len(indices)
        stream = super().checkpoints(
            model_id, stride, prefetch, verify, transform=transform, readers=readers
        )
        if sum(info.bytes for info in infos) > self.budget:
            return stream
        return self._filling(stream, manifest.checkpoints)

    def _filling(self, stream: Iterator[Checkpoint], infos: list) -> Iterator[Checkpoint]:  # type: ignore[type-arg]
        for ckpt in stream:
            ckpt.tensors = self._put(infos[ckpt.index].sha256, ckpt.tensors)
            yield ckpt

    def load(self, model_id: str, index: int, verify: bool = True) -> dict[str, torch.Tensor]:
        manifest = self.manifest(model_id)
        n = len(manifest.checkpoints)
        if not -n <= index < n:
            raise IndexError(f"model {model_id!r} has {n} checkpoints, no index {index}")
        sha = manifest.checkpoints[index % n].sha256
        tensors = self._get(sha)
        if tensors is not None:
            self.hits += 1
            return tensors
        self.misses += 1
        return self._put(sha, super().load(model_id, index, verify=verify))

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._sizes.clear()
            self._used = 0
