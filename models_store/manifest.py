"""Manifest: the JSON description of one trajectory (what the model is, which checkpoints exist).

Parsing is strict because the manifest is the only thing readers trust: a file that does not
validate raises MalformedManifest instead of producing half-filled objects.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InvalidModelId, MalformedManifest

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a plain name: no separators, no "/.."


def validate_model_id(model_id: object) -> str:
    """Return the id unchanged if it is safe to use as a folder name, else raise InvalidModelId."""
    if not isinstance(model_id, str) or not _ID_RE.fullmatch(model_id) or ".." in model_id:
        raise InvalidModelId(
            f"invalid model id {model_id!r}: use 1-64 characters from [a-z0-9._-], "
            "starting with a lowercase letter or digit, without '..'"
        )
    return model_id


@dataclass
class CheckpointInfo:
    """One checkpoint file: the training step it was taken at and how to check its bytes."""

    step: int
    file: str
    sha256: str
    bytes: int

    @classmethod
    def from_dict(cls, d: Any) -> CheckpointInfo:
        if not isinstance(d, dict):
            raise MalformedManifest(f"checkpoint entry must be an object, got {d!r}")
        info = cls(
            step=_get(d, "step", int),
            file=_get(d, "file", str),
            sha256=_get(d, "sha256", str),
            bytes=_get(d, "bytes", int),
        )
        if info.step < 0 or info.bytes < 0:
            raise MalformedManifest(f"checkpoint {info.file!r}: step and bytes must be >= 0")
        if not _FILE_RE.fullmatch(info.file) or ".." in info.file:
            raise MalformedManifest(f"checkpoint file name {info.file!r} is not a plain file name")
        if not _SHA256_RE.fullmatch(info.sha256):
            raise MalformedManifest(f"checkpoint {info.file!r}: sha256 must be 64 hex digits")
        return info


@dataclass
class Manifest:
    """Everything a reader needs to rebuild the generator and walk its training trajectory."""

    model_id: str
    format_version: int
    arch: dict[str, Any]
    latent_dim: int
    output_shape: list[int]
    value_range: list[float]
    training: dict[str, Any]
    dataset: str
    created_at: str
    complete: bool
    checkpoints: list[CheckpointInfo]
    # How checkpoint tensors are stored; decode_checkpoint() turns them back into weights.
    encoding: str = field(default="fp32")
    # Where starts and restarts are drawn: "uniform" on [-1, 1]^k (the paper) or "normal".
    latent_prior: str = field(default="uniform")

    @property
    def n_pixels(self) -> int:
        """Number of output values per sample (product of output_shape)."""
        return math.prod(self.output_shape)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict, the exact content of manifest.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Validate and build; raise MalformedManifest naming the first bad field."""
        if not isinstance(d, dict):
            raise MalformedManifest(f"manifest must be a JSON object, got {type(d).__name__}")
        version = _get(d, "format_version", int)
        if version > FORMAT_VERSION or version < 1:
            raise MalformedManifest(
                f"manifest format_version {version} is not supported (this reader knows "
                f"1..{FORMAT_VERSION})"
            )
        try:
            model_id = validate_model_id(_get(d, "model_id", str))
        except InvalidModelId as e:
            raise MalformedManifest(str(e)) from None
        output_shape = _get(d, "output_shape", list)
        if not output_shape or not all(_is_int(s) and s > 0 for s in output_shape):
            raise MalformedManifest(f"output_shape must be positive ints, got {output_shape!r}")
        value_range = _get(d, "value_range", list)
        if len(value_range) != 2 or not all(_is_number(v) for v in value_range):
            raise MalformedManifest(f"value_range must be [low, high], got {value_range!r}")
        if not value_range[0] < value_range[1]:
            raise MalformedManifest(f"value_range must have low < high, got {value_range!r}")
        latent_dim = _get(d, "latent_dim", int)
        if latent_dim <= 0:
            raise MalformedManifest(f"latent_dim must be positive, got {latent_dim}")
        return cls(
            model_id=model_id,
            format_version=version,
            arch=_get(d, "arch", dict),
            latent_dim=latent_dim,
            output_shape=list(output_shape),
            value_range=[float(v) for v in value_range],
            training=_get(d, "training", dict),
            dataset=_get(d, "dataset", str),
            created_at=_get(d, "created_at", str),
            complete=_get(d, "complete", bool),
            checkpoints=[CheckpointInfo.from_dict(c) for c in _get(d, "checkpoints", list)],
            encoding=_get(d, "encoding", str) if "encoding" in d else "fp32",
            latent_prior=_latent_prior(d),
        )


LATENT_PRIORS = ("uniform", "normal")


def _latent_prior(d: dict[str, Any]) -> str:
    prior = _get(d, "latent_prior", str) if "latent_prior" in d else "uniform"
    if prior not in LATENT_PRIORS:
        raise MalformedManifest(
            f"latent_prior must be one of {', '.join(LATENT_PRIORS)}, got {prior!r}"
        )
    return prior


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _get(d: dict[str, Any], key: str, kind: type) -> Any:
    """Fetch a required field of the given JSON type (bools are not ints here)."""
    if key not in d:
        raise MalformedManifest(f"manifest field {key!r} is missing")
    value = d[key]
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise MalformedManifest(
            f"manifest field {key!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value
