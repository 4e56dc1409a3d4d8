"""Checkpoint encodings: how weights become the tensors in a file, and back.

Each manifest records its encoding, so trajectories written earlier stay readable.

- "fp32": every tensor as float32 (floats) or as is (ints). Lossless, 4 bytes a parameter.
- "qdelta": closed-loop quantised deltas with periodic keyframes, entropy-coded with zlib.
  A trajectory is a slow walk through weight space: consecutive checkpoints (tens of training
  steps apart) differ by a small, noise-like delta. Each large float tensor is stored as
  integer codes q = round(Δ / s), where Δ = w_t − ŵ_{t−1} is taken against the *decoded*
  previous checkpoint (closed loop: the error never accumulates along the chain) and the step
  s = rms(Δ) / DELTA_LEVELS scales with how far the tensor moved. So every decoded weight is
  within s/2 of the original: the error is a fixed fraction of one inter-checkpoint move,
  smaller than the gap between neighbouring checkpoints that surfing already steps across.
  Every KEYFRAME_EVERY-th checkpoint is coded against zero (same step) so a reader can start
  there instead of at checkpoint 0. Vectors and small tensors (biases, batch-norm scales and
  statistics), integer tensors and the *final* checkpoint are stored exactly: the last network
  defines the objective being solved and the direct-descent baselines, so it stays bit-exact.

File layout for a quantised tensor `name`: `name.q` (uint8, the zlib stream of little-endian
int8 or int16 codes), `name.s` (float64 [step]), `name.h` (int64 [code bytes, *shape]). A
file whose tensors are all stored exactly carries `__kind__` = 0 (standalone); keyframes 1;
deltas 2 (they need the previous checkpoint decoded).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np
import torch

from .errors import MalformedManifest
from .manifest import Manifest

ENCODINGS = ("fp32", "qdelta")
LOSSY = ("qdelta",)

KEYFRAME_EVERY = 16  # an encoder setting: readers find keyframes from the files themselves
DELTA_LEVELS = 1.0  # step = rms(delta) / DELTA_LEVELS: max error rms(delta) / 2 per weight
KEY_LEVELS = 256.0  # step of the first checkpoint = rms(w) / KEY_LEVELS
SMALL = 4096  # tensors with fewer elements are stored exactly (they are ~1% of the bytes)
ZLIB_LEVEL = 6

KIND = "__kind__"
EXACT, KEY, DELTA = 0, 1, 2


def _fp32_copy(t: torch.Tensor) -> torch.Tensor:
    dtype = torch.float32 if t.is_floating_point() else t.dtype
    copy = torch.empty(t.shape, dtype=dtype, device="cpu")  # one fresh contiguous copy
    copy.copy_(t.detach())
    return copy


def _check(tensors: Mapping[str, torch.Tensor]) -> None:
    if not tensors:
        raise ValueError("a checkpoint needs at least one tensor")
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint entries must be str -> Tensor, got {name!r}: {type(t)}")


def encode_checkpoint(
    encoding: str, tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Stateless encodings only ("fp32"): contiguous CPU copies, floats as float32, so the file
    never aliases live weights. Use `Encoder` for encodings that depend on earlier checkpoints."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    if encoding != "fp32":
        raise ValueError(f"encoding {encoding!r} is stateful: use codec.Encoder")
    _check(tensors)
    return {name: _fp32_copy(t) for name, t in tensors.items()}


def _quantisable(t: torch.Tensor) -> bool:
    """Weight matrices and kernels only. Vectors (biases, batch-norm scales and statistics)
    are ~1% of the bytes, and a bias that starts at 0 moves by about its own size between
    checkpoints, so quantising it against its move would cost half its value in error."""
    return t.is_floating_point() and t.dim() >= 2 and t.numel() >= SMALL


def _pack(codes: torch.Tensor) -> tuple[torch.Tensor, int]:
    """zlib stream of the codes in the narrowest of int8/int16 that holds them."""
    lo, hi = int(codes.min()), int(codes.max())
    width = 1 if -128 <= lo and hi <= 127 else 2
    if width == 2 and not (-32768 <= lo and hi <= 32767):
        raise ValueError("quantisation codes overflow int16")  # cannot happen with rms steps
    arr = codes.numpy().astype(np.int8 if width == 1 else "<i2")
    blob = zlib.compress(arr.tobytes(), ZLIB_LEVEL)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8), width


def _unpack(blob: torch.Tensor, width: int, shape: list[int]) -> torch.Tensor:
    raw = zlib.decompress(blob.numpy().tobytes())
    arr = np.frombuffer(raw, dtype=np.int8 if width == 1 else "<i2")
    return torch.from_numpy(arr.astype(np.float32)).view(shape)


class Encoder:
    """Encodes one trajectory's checkpoints in order (a stateful encoding remembers the decoded
    previous checkpoint, because deltas are taken against what readers will reconstruct).

    `levels` sets the precision: step = rms(Δ) / levels, so each weight is within
    rms(Δ) / (2·levels) of the original, Δ being the tensor's move since the previous
    checkpoint. Keyframes (every `keyframe_every`-th checkpoint) code the weights themselves
    with that same step, so the error bound is the same for every checkpoint; the very first
    checkpoint, which has no move to measure, uses rms(w) / KEY_LEVELS.
    """

    def __init__(
        self, encoding: str, levels: float = DELTA_LEVELS, keyframe_every: int = KEYFRAME_EVERY
    ) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
        if levels <= 0 or keyframe_every < 1:
            raise ValueError("levels must be > 0 and keyframe_every >= 1")
        self.encoding, self.levels, self.keyframe_every = encoding, levels, keyframe_every
        self.lossy = encoding in LOSSY
        self._previous: dict[str, torch.Tensor] | None = None

    def encode(
        self, index: int, tensors: Mapping[str, torch.Tensor], exact: bool = False
    ) -> dict[str, torch.Tensor]:
        """Tensors for checkpoint `index`; `exact=True` stores this checkpoint losslessly."""
        if self.encoding == "fp32":
            return encode_checkpoint("fp32", tensors)
        _check(tensors)
        weights = {name: _fp32_copy(t) for name, t in tensors.items()}
        if exact:
            self._previous = weights
            return {**weights, KIND: torch.tensor([EXACT])}
        previous = self._previous
        key = previous is None or index % self.keyframe_every == 0
        out, decoded = {}, {}
        for name, w in weights.items():
            if not _quantisable(w):
                out[name] = decoded[name] = w
                continue
            if previous is None:
                step = _rms(w) / KEY_LEVELS
            else:
                step = _rms(w.double() - previous[name].double()) / self.levels
            step = step if step > 0 else 1.0
            ref = torch.zeros_like(w) if key else previous[name]  # type: ignore[index]
            codes = torch.round((w.double() - ref.double()) / step).to(torch.int32)
            out[f"{name}.q"], width = _pack(codes)
            out[f"{name}.s"] = torch.tensor([step], dtype=torch.float64)
            out[f"{name}.h"] = torch.tensor([width, *w.shape], dtype=torch.int64)
            decoded[name] = ref + codes.float() * step  # exactly what the decoder computes
        out[KIND] = torch.tensor([KEY if key else DELTA])
        self._previous = decoded
        return out


def _rms(t: torch.Tensor) -> float:
    return float(t.pow(2).mean().sqrt())


def checkpoint_kind(manifest: Manifest, raw_tensors: Mapping[str, torch.Tensor]) -> int:
    """EXACT or KEY (decodable alone) or DELTA (needs the decoded previous checkpoint)."""
    if manifest.encoding == "fp32":
        return EXACT
    return int(raw_tensors[KIND][0]) if KIND in raw_tensors else EXACT


def decode_checkpoint(
    manifest: Manifest,
    index: int,
    raw_tensors: dict[str, torch.Tensor],
    previous: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Turn the tensors read from checkpoint `index` back into the network's weights;
    a delta checkpoint needs `previous`, the decoded weights of checkpoint `index - 1`."""
    if manifest.encoding == "fp32":
        return raw_tensors
    if manifest.encoding != "qdelta":
        raise MalformedManifest(
            f"model {manifest.model_id!r}: unknown checkpoint encoding {manifest.encoding!r} "
            f"(this reader knows {', '.join(ENCODINGS)})"
        )
    kind = checkpoint_kind(manifest, raw_tensors)
    if kind == DELTA and previous is None:
        raise ValueError(f"checkpoint {index} is a delta: decode checkpoint {index - 1} first")
    out: dict[str, torch.Tensor] = {}
    for name, t in raw_tensors.items():
        if name == KIND or name.endswith((".s", ".h")):
            continue
        if name.endswith(".q"):
            base = name[:-2]
            header = raw_tensors[f"{base}.h"].tolist()
            step = float(raw_tensors[f"{base}.s"][0])
            codes = _unpack(t, int(header[0]), header[1:])
            value = codes.mul_(step)
            if kind == DELTA:
                value = value.add_(previous[base])  # type: ignore[index]
            out[base] = value
        else:
            out[name] = t
    return out


def max_error(manifest: Manifest, raw_tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The stated bound per tensor: |decoded - original| <= step / 2 (0 for exact tensors),
    plus float32 rounding of the reconstruction."""
    if manifest.encoding == "fp32":
        return {}
    return {
        name[:-2]: float(raw_tensors[f"{name[:-2]}.s"][0]) / 2
        for name in raw_tensors
        if name.endswith(".q")
    }
