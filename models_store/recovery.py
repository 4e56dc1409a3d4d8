"""Checks and clean-up before appending to a trajectory a crashed writer left incomplete.

A writer writes each checkpoint file atomically, then the manifest that lists it; a crash in
between leaves a complete checkpoint file the manifest does not list (an "orphan"), and a kill
during a write can leave a hidden temp file. Neither is ever read, but a resumed writer must
start from exactly what the manifest lists.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ._atomic import TMP_SUFFIX, fsync_dir
from .errors import CorruptCheckpoint, MissingCheckpoint, StoreError
from .manifest import Manifest
from .reading import SEAL_SUFFIX

log = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"ckpt-\d{6}\.safetensors")
_SEAL_RE = re.compile(r"\.(ckpt-\d{6}\.safetensors)" + re.escape(SEAL_SUFFIX))
# write_atomic's temp names: ".<final name>.<12 hex>.tmp"; a seal's: ".<seal name>.<12 hex>.tmp"
_TMP_RE = re.compile(
    r"\.(?:ckpt-\d{6}\.safetensors(?:\.verified)?|manifest\.json)\.[0-9a-f]{12}"
    + re.escape(TMP_SUFFIX)
)


def check_resumable(manifest: Manifest, folder: Path) -> None:
    """Refuse trajectories a writer must not append to; every listed file must be on disk
    with its recorded size (the next checkpoint's index depends on the list being true)."""
    if manifest.complete:
        raise StoreError(
            f"model {manifest.model_id!r} is complete; only an interrupted trajectory can be "
            "resumed (delete it, or record under a new id)"
        )
    if manifest.encoding != "fp32":
        # Lossy encodings chain each checkpoint to the decoded previous one; resuming would
        # need the encoder's state back. Not worth it for a crash path.
        raise StoreError(
            f"model {manifest.model_id!r} uses encoding {manifest.encoding!r}; only 'fp32' "
            "trajectories can be resumed"
        )
    for index, info in enumerate(manifest.checkpoints):
        path = folder / info.file
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise MissingCheckpoint(
                f"model {manifest.model_id!r} checkpoint {index}: file {path} is missing"
            ) from None
        if size != info.bytes:
            raise CorruptCheckpoint(
                f"model {manifest.model_id!r} checkpoint {index} ({info.file}): {size} bytes "
                f"on disk, manifest says {info.bytes}"
            )


def remove_orphans(manifest: Manifest, folder: Path) -> list[str]:
    """Delete checkpoint files the manifest does not list, their seals, and leftover temp files.

    Only names this store writes are touched: anything else in the folder is left alone.
    Returns the names removed.
    """
    listed = {info.file for info in manifest.checkpoints}
    removed = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        name = entry.name
        orphan = _CKPT_RE.fullmatch(name) is not None and name not in listed
        seal = _SEAL_RE.fullmatch(name)
        orphan |= seal is not None and seal.group(1) not in listed
        if (orphan or _TMP_RE.fullmatch(name)) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(name)
    if removed:
        fsync_dir(folder)
        log.warning("model %r: removed %s left by a crash", manifest.model_id, ", ".join(removed))
    return removed
