"""Trajectory storage: a model id names an ordered series of training checkpoints.

See docs/architecture.md (section models_store) for the contract.
"""

from .codec import ENCODINGS, Encoder, decode_checkpoint
from .errors import (
    CorruptCheckpoint,
    InvalidModelId,
    MalformedManifest,
    MissingCheckpoint,
    ModelExists,
    ModelNotFound,
    StoreError,
)
from .manifest import FORMAT_VERSION, CheckpointInfo, Manifest, validate_model_id
from .store import (
    Checkpoint,
    ModelStore,
    TrajectoryWriter,
    Transform,
    convert,
    default_store_root,
    select_indices,
)

__all__ = [
    "ENCODINGS",
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointInfo",
    "CorruptCheckpoint",
    "InvalidModelId",
    "MalformedManifest",
    "Manifest",
    "MissingCheckpoint",
    "ModelExists",
    "ModelNotFound",
    "ModelStore",
    "StoreError",
    "TrajectoryWriter",
    "Transform",
    "Encoder",
    "convert",
    "decode_checkpoint",
    "default_store_root",
    "select_indices",
    "validate_model_id",
]
