"""Checkpoint encodings: how weights become the tensors in a file, and back.

Only "fp32" exists today. A new encoding (fp16, deltas against the previous checkpoint, ...)
adds a branch to encode_checkpoint and decode_checkpoint; each manifest records its encoding,
so trajectories written earlier stay readable.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import MalformedManifest
from .manifest import Manifest

ENCODINGS = ("fp32",)


def encode_checkpoint(
    encoding: str, tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies (floats as float32), so the file never aliases live weights."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    if not tensors:
        raise ValueError("a checkpoint needs at least one tensor")
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint entries must be str -> Tensor, got {name!r}: {type(t)}")
        dtype = torch.float32 if t.is_floating_point() else t.dtype
        copy = torch.empty(t.shape, dtype=dtype, device="cpu")  # one fresh contiguous copy
        copy.copy_(t.detach())
        out[name] = copy
    return out


def decode_checkpoint(
    manifest: Manifest, index: int, raw_tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Turn the tensors read from checkpoint `index` back into the network's weights."""
    if manifest.encoding == "fp32":
        return raw_tensors
    raise MalformedManifest(
        f"model {manifest.model_id!r}: unknown checkpoint encoding {manifest.encoding!r} "
        f"(this reader knows {', '.join(ENCODINGS)})"
    )
