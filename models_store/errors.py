"""Store exceptions: one base class so callers (API, worker) can catch the whole family."""

from __future__ import annotations


class StoreError(Exception):
    """Base class for every error the models store raises on purpose."""


class InvalidModelId(StoreError):
    """The id cannot name a folder safely (pattern, length or path traversal)."""


class ModelNotFound(StoreError):
    """No model with this id exists under the store root."""


class ModelExists(StoreError):
    """create() was asked for an id that already exists (pass overwrite=True to replace it)."""


class MalformedManifest(StoreError):
    """manifest.json is missing, is not JSON, or does not describe a trajectory we can read."""


class MissingCheckpoint(StoreError):
    """The manifest lists a checkpoint file that is not on disk."""


class CorruptCheckpoint(StoreError):
    """A checkpoint file does not match its recorded size/hash or cannot be parsed."""
