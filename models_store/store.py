"""ModelStore: one folder per model id holding manifest.json and ckpt-NNNNNN.safetensors files.

Writers stream (one checkpoint in memory at a time) and make every step atomic, so a crash
mid-training leaves a readable prefix of the trajectory. Readers stream checkpoints in order
through a background pipeline (parallel reads, in-order decoding). Safetensors only: nothing
here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from ._atomic import fsync_dir, write_atomic
from .codec import (
    DELTA,
    DELTA_LEVELS,
    ENCODINGS,
    KEYFRAME_EVERY,
    Encoder,
    checkpoint_kind,
    decode_checkpoint,
)
from .errors import (
    CorruptCheckpoint,
    MalformedManifest,
    MissingCheckpoint,
    ModelExists,
    ModelNotFound,
    StoreError,
)
from .manifest import FORMAT_VERSION, MANIFEST_NAME, CheckpointInfo, Manifest, validate_model_id
from .reading import WILL_NEED_AHEAD, CheckedReader, will_need
from .recovery import check_resumable, remove_orphans

log = logging.getLogger(__name__)


def default_store_root() -> Path:
    """Store root from $SURFING_MODELS_DIR, else ./data/models (relative to the cwd)."""
    return Path(os.environ.get("SURFING_MODELS_DIR") or "./data/models")


def checkpoint_file_name(index: int) -> str:
    """Files are named by position in the trajectory, so names sort in training order."""
    return f"ckpt-{index:06d}.safetensors"


def select_indices(n: int, stride: int = 1) -> list[int]:
    """Every stride-th index of range(n), plus the last: surfing must end on the final net."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    indices = list(range(0, n, stride))
    if n and indices[-1] != n - 1:
        indices.append(n - 1)
    return indices


@dataclass
class Checkpoint:
    """One point of the trajectory: position in the manifest, training step, weights."""

    index: int
    step: int
    tensors: dict[str, torch.Tensor]


# What a reader may do to each checkpoint's tensors in the prefetch pipeline (e.g. move them to
# the GPU), off the caller's thread.
Transform = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _dump_manifest(manifest: Manifest) -> bytes:
    # allow_nan=False: manifests are read by other tools too, so keep them strict JSON.
    return (json.dumps(manifest.to_dict(), indent=2, allow_nan=False) + "\n").encode()


class TrajectoryWriter:
    """Appends checkpoints to a model created by ModelStore.create(); use it as a context manager.

    Leaving the `with` block normally marks the manifest complete; leaving it by an exception
    keeps complete=False, with every checkpoint added so far still readable.
    """

    def __init__(self, folder: Path, manifest: Manifest, encoder: Encoder | None = None) -> None:
        self.folder = folder
        self._manifest = manifest
        self._closed = False
        self._encoder = encoder or Encoder(manifest.encoding)
        # Lossy encodings keep the last checkpoint's weights so close() can rewrite it exactly.
        self._last: tuple[int, Mapping[str, torch.Tensor]] | None = None
        self._last_exact = False

    @property
    def manifest(self) -> Manifest:
        """The manifest as last written to disk."""
        return self._manifest

    def add(
        self, step: int, tensors: Mapping[str, torch.Tensor], exact: bool = False
    ) -> CheckpointInfo:
        """Write one checkpoint file atomically, then the manifest that lists it.

        `exact=True` stores it losslessly under a lossy encoding; the last checkpoint is made
        exact by close() anyway (it is the network the inversion objective is defined by).
        """
        if self._closed:
            raise StoreError(f"model {self._manifest.model_id!r}: writer is already closed")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        done = self._manifest.checkpoints
        if done and step <= done[-1].step:
            raise ValueError(f"steps must increase: got {step} after {done[-1].step}")
        index = len(done)
        info = self._write_checkpoint(index, step, tensors, exact)
        self._write_manifest(replace(self._manifest, checkpoints=[*done, info]))
        if self._encoder.lossy:
            self._last = (index, {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()})
            self._last_exact = exact
        return info

    def _write_checkpoint(
        self, index: int, step: int, tensors: Mapping[str, torch.Tensor], exact: bool
    ) -> CheckpointInfo:
        encoded = self._encoder.encode(index, tensors, exact=exact)
        meta = {"model_id": self._manifest.model_id, "index": str(index), "step": str(step)}
        data = safetensors.torch.save(encoded, metadata=meta)
        del encoded
        name = checkpoint_file_name(index)
        write_atomic(self.folder / name, data)
        return CheckpointInfo(step, name, hashlib.sha256(data).hexdigest(), len(data))

    def close(self) -> None:
        """Mark the trajectory complete: readers may treat it as a finished model."""
        if self._closed:
            return
        checkpoints = self._manifest.checkpoints
        if self._last is not None and not self._last_exact:
            # No checkpoint depends on the last one, so rewriting it in place is safe; the
            # manifest swap below makes the new file's hash the one readers check.
            index, tensors = self._last
            info = self._write_checkpoint(index, checkpoints[index].step, tensors, exact=True)
            checkpoints = [*checkpoints[:index], info]
        self._last = None
        self._write_manifest(replace(self._manifest, checkpoints=checkpoints, complete=True))
        self._closed = True

    def _write_manifest(self, manifest: Manifest) -> None:
        write_atomic(self.folder / MANIFEST_NAME, _dump_manifest(manifest))
        self._manifest = manifest  # only after it is safely on disk

    def __enter__(self) -> TrajectoryWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True  # leave complete=False: the run did not finish


class ModelStore:
    """Trajectory storage rooted at one folder; safe to share between threads (its only state
    is which checkpoint files it has already hash-checked, see models_store.reading).

    With `seals` (the default) a file verified once is not hashed again by any process while it
    stays the same file; seals=False hashes every file once per store, as before seals."""

    def __init__(self, root: str | os.PathLike[str], seals: bool = True) -> None:
        self.root = Path(root)
        self._reader = CheckedReader(seals)

    def path(self, model_id: str) -> Path:
        """Folder of a model (validated id; the folder may not exist)."""
        return self.root / validate_model_id(model_id)

    # ---- writing -------------------------------------------------------------------------

    def create(
        self,
        model_id: str,
        *,
        arch: dict[str, Any],
        latent_dim: int,
        output_shape: list[int],
        value_range: list[float],
        training: dict[str, Any],
        dataset: str,
        encoding: str = "fp32",
        overwrite: bool = False,
        encoder: Encoder | None = None,
        latent_prior: str = "uniform",
    ) -> TrajectoryWriter:
        """Start a new trajectory; the folder appears (with an empty manifest) in one rename.

        `encoder` sets a lossy encoding's precision (default: Encoder(encoding))."""
        folder = self.path(model_id)
        if folder.exists() and not overwrite:
            raise ModelExists(
                f"model {model_id!r} already exists in {self.root} "
                "(delete it or pass overwrite=True)"
            )
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
        if encoder is not None and encoder.encoding != encoding:
            raise ValueError(f"encoder is for {encoder.encoding!r}, not {encoding!r}")
        d = {
            "model_id": model_id,
            "format_version": FORMAT_VERSION,
            "arch": arch,
            "latent_dim": latent_dim,
            "output_shape": list(output_shape),
            "value_range": list(value_range),
            "training": training,
            "dataset": dataset,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "complete": False,
            "checkpoints": [],
            "encoding": encoding,
            "latent_prior": latent_prior,
        }
        try:
            manifest = Manifest.from_dict(json.loads(json.dumps(d, allow_nan=False)))
        except (TypeError, ValueError, MalformedManifest) as e:
            raise ValueError(f"cannot create model {model_id!r}: {e}") from e

        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".creating-{model_id}-{uuid.uuid4().hex[:12]}"
        staging.mkdir()
        try:
            write_atomic(staging / MANIFEST_NAME, _dump_manifest(manifest))
            if overwrite and folder.exists():
                self._remove(folder)
            try:
                os.rename(staging, folder)  # fails if a non-empty folder appeared meanwhile
            except OSError as e:
                raise ModelExists(f"model {model_id!r} already exists in {self.root}") from e
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(self.root)
        return TrajectoryWriter(folder, manifest, encoder)

    def reopen(self, model_id: str) -> TrajectoryWriter:
        """A writer appending to an incomplete trajectory, after its last listed checkpoint.

        For a training run resumed after a crash. Refuses complete and lossy-encoded
        trajectories, checks the listed files are there, and removes checkpoint files the
        manifest does not list (a crash between a file write and its manifest write)."""
        manifest = self.manifest(model_id)
        folder = self.path(model_id)
        check_resumable(manifest, folder)
        remove_orphans(manifest, folder)
        return TrajectoryWriter(folder, manifest)

    def delete(self, model_id: str) -> None:
        """Remove a model; it disappears from listings at once (rename first, then rmtree)."""
        folder = self.path(model_id)
        if not folder.is_dir():
            raise ModelNotFound(f"model {model_id!r} not found in {self.root}")
        self._remove(folder)

    def _remove(self, folder: Path) -> None:
        trash = self.root / f".deleting-{folder.name}-{uuid.uuid4().hex[:12]}"
        os.rename(folder, trash)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    # ---- reading -------------------------------------------------------------------------

    def manifest(self, model_id: str) -> Manifest:
        """Load and validate a model's manifest."""
        folder = self.path(model_id)
        if not folder.is_dir():
            raise ModelNotFound(f"model {model_id!r} not found in {self.root}")
        path = folder / MANIFEST_NAME
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise MalformedManifest(f"model {model_id!r}: {path} is missing") from None
        except (OSError, ValueError) as e:  # ValueError covers JSON and UTF-8 decode errors
            raise MalformedManifest(f"model {model_id!r}: cannot read {path}: {e}") from None
        try:
            manifest = Manifest.from_dict(raw)
        except MalformedManifest as e:
            raise MalformedManifest(f"model {model_id!r}: {e}") from None
        if manifest.model_id != model_id:
            raise MalformedManifest(
                f"model {model_id!r}: manifest names model {manifest.model_id!r}"
            )
        return manifest

    def list_models(self) -> list[Manifest]:
        """Valid manifests sorted by id; broken folders are skipped with a logged warning."""
        if not self.root.is_dir():
            return []
        manifests = []
        for entry in sorted(self.root.iterdir(), key=lambda p: p.name):
            if entry.name.startswith(".") or not entry.is_dir():
                continue  # staging/trash folders and stray files are not models
            try:
                manifests.append(self.manifest(entry.name))
            except ModelNotFound:
                continue  # deleted while we were listing
            except StoreError as e:
                log.warning("models store %s: skipping %r: %s", self.root, entry.name, e)
        return manifests

    def load(self, model_id: str, index: int, verify: bool = True) -> dict[str, torch.Tensor]:
        """Weights of one checkpoint; negative indices count from the end (-1 = final net)."""
        manifest = self.manifest(model_id)
        n = len(manifest.checkpoints)
        if not -n <= index < n:
            raise IndexError(f"model {model_id!r} has {n} checkpoints, no index {index}")
        return _Decoder(self, manifest, verify).get(index % n).tensors

    def checkpoints(
        self,
        model_id: str,
        stride: int = 1,
        prefetch: bool = True,
        verify: bool = True,
        transform: Transform | None = None,
        readers: int | None = None,
    ) -> Iterator[Checkpoint]:
        """Stream checkpoints in training order (see select_indices for the stride rule).

        With prefetch, background threads work ahead while the caller computes: `readers`
        threads (default: half the CPU cores, at most 4) read and hash-check the next files in
        parallel, and one thread decodes them in order and applies `transform` (e.g. the copy
        to a GPU), so the caller receives ready tensors. Errors about the model itself
        (unknown id, bad manifest, bad stride) are raised here, not at the first next(); an
        error about one checkpoint is raised when the caller reaches it.
        """
        manifest = self.manifest(model_id)
        indices = select_indices(len(manifest.checkpoints), stride)
        decoder = _Decoder(self, manifest, verify)  # decodes in index order (one thread)

        def finish(index: int, raw: dict[str, torch.Tensor] | None) -> Checkpoint:
            ckpt = decoder.get(index, raw)
            if transform is not None:
                ckpt = Checkpoint(ckpt.index, ckpt.step, transform(ckpt.tensors))
            return ckpt

        if prefetch:
            return _prefetched(decoder.read, finish, indices, readers or default_readers())
        folder = self.root / manifest.model_id
        files = [folder / manifest.checkpoints[i].file for i in indices]
        return _when_due(finish, indices, files)

    def _read_raw(self, manifest: Manifest, index: int, verify: bool) -> dict[str, torch.Tensor]:
        info = manifest.checkpoints[index]
        path = self.root / manifest.model_id / info.file
        where = f"model {manifest.model_id!r} checkpoint {index} ({info.file})"
        try:
            raw = self._reader.read(path, info.bytes, info.sha256, where, verify)
        except FileNotFoundError:
            raise MissingCheckpoint(f"{where}: file {path} is missing") from None
        except SafetensorError as e:
            raise CorruptCheckpoint(f"{where}: not a readable safetensors file: {e}") from None
        # safetensors hands tensors back in no fixed order; sorted names make every read of a
        # checkpoint iterate identically (reproducible code downstream depends on it).
        return dict(sorted(raw.items()))


class _Decoder:
    """Reads and decodes checkpoints of one model, remembering the last one decoded.

    Delta-coded checkpoints need their predecessor: a request for index j reads back from j
    until it reaches the remembered checkpoint (the streaming case, also with a stride) or a
    standalone file (keyframe or exact), then decodes forward. Standalone files decode alone.
    """

    def __init__(self, store: ModelStore, manifest: Manifest, verify: bool) -> None:
        self.store, self.manifest, self.verify = store, manifest, verify
        self.last: tuple[int, dict[str, torch.Tensor]] | None = None

    def read(self, index: int) -> dict[str, torch.Tensor]:
        """The stored (still encoded) tensors of one file; safe to call from any thread."""
        return self.store._read_raw(self.manifest, index, self.verify)

    def get(self, index: int, raw: dict[str, torch.Tensor] | None = None) -> Checkpoint:
        """Checkpoint `index` decoded, from its already-read file `raw` if given."""
        raw = self.read(index) if raw is None else raw
        if checkpoint_kind(self.manifest, raw) == DELTA:
            # Walk back to the remembered checkpoint or to a standalone one, then forward.
            chain = [raw]
            while self.last is None or self.last[0] != index - len(chain):
                i = index - len(chain)
                if i < 0:
                    raise CorruptCheckpoint(
                        f"model {self.manifest.model_id!r}: checkpoint {index} is a delta "
                        "with no keyframe before it"
                    )
                chain.append(self.read(i))
                if checkpoint_kind(self.manifest, chain[-1]) != DELTA:
                    break
            previous = None
            if self.last is not None and self.last[0] == index - len(chain):
                previous = self.last[1]
            for j, r in enumerate(reversed(chain)):
                previous = decode_checkpoint(self.manifest, index - len(chain) + 1 + j, r, previous)
            tensors = previous
        else:
            tensors = decode_checkpoint(self.manifest, index, raw)
        self.last = (index, tensors)
        return Checkpoint(index, self.manifest.checkpoints[index].step, tensors)


def default_readers() -> int:
    """Parallel file readers for streaming: hashing a 26 MB checkpoint takes tens of ms on one
    core, longer than a GPU needs for a surfing stage, so a many-core host reads several
    files at once; a small one keeps one reader (and its cores for the solver)."""
    return min(4, max(1, (os.cpu_count() or 1) // 2))


def _when_due(
    finish: Callable[[int, dict[str, torch.Tensor] | None], Checkpoint],
    indices: list[int],
    files: list[Path],
) -> Iterator[Checkpoint]:
    """Yield finish(i) in the caller's thread, each checkpoint read when it is due, while the
    kernel brings the next WILL_NEED_AHEAD files into the page cache, so a cold trajectory's
    disk reads can overlap the caller's work without a thread of ours taking a core from it."""
    for path in files[:WILL_NEED_AHEAD]:
        will_need(path)
    for j, index in enumerate(indices):
        if j + WILL_NEED_AHEAD < len(files):
            will_need(files[j + WILL_NEED_AHEAD])
        yield finish(index, None)


def _prefetched(
    read: Callable[[int], dict[str, torch.Tensor]],
    finish: Callable[[int, dict[str, torch.Tensor]], Checkpoint],
    indices: list[int],
    readers: int,
) -> Iterator[Checkpoint]:
    """Yield finish(i, read(i)) for each index while later ones load in the background.

    Up to `readers` files are read at once on a pool (reads are independent); `finish`
    (decoding, which may need the previous checkpoint, and the caller's transform) runs on one
    thread in index order. At most readers + 1 checkpoints are in flight. The pools are created
    on the first next() and always shut down (joined) in `finally`, so a consumer that stops
    early and closes (or drops) the generator leaves no thread behind.
    """
    if not indices:
        return
    reading = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="models_store-prefetch")
    decoding = ThreadPoolExecutor(max_workers=1, thread_name_prefix="models_store-prefetch-dec")
    ahead = iter(indices)
    pending: deque[Future[Checkpoint]] = deque()

    def submit(index: int) -> None:
        raw = reading.submit(read, index)
        pending.append(decoding.submit(lambda: finish(index, raw.result())))

    try:
        for _ in range(min(len(indices), readers + 1)):
            submit(next(ahead))
        while pending:
            ckpt = pending.popleft().result()
            nxt = next(ahead, None)
            if nxt is not None:
                submit(nxt)
            yield ckpt
    finally:
        reading.shutdown(wait=True, cancel_futures=True)
        decoding.shutdown(wait=True, cancel_futures=True)


def convert(
    store: ModelStore,
    src: str,
    dst: str,
    encoding: str = "qdelta",
    overwrite: bool = False,
    dst_store: ModelStore | None = None,
    levels: float = DELTA_LEVELS,
    keyframe_every: int = KEYFRAME_EVERY,
) -> Manifest:
    """Re-encode trajectory `src` as a new model `dst` (same architecture, steps and order).

    Streams one checkpoint at a time; the final checkpoint is stored exactly (see codec).
    Returns the new manifest. The source must be complete: a partial trajectory may still grow.
    """
    manifest = store.manifest(src)
    if not manifest.complete:
        raise StoreError(f"model {src!r} is not complete; convert it once training has finished")
    out = dst_store or store
    n = len(manifest.checkpoints)
    training = {**manifest.training, "converted_from": src}
    if encoding != "fp32":
        training["encoding_levels"], training["keyframe_every"] = levels, keyframe_every
    with out.create(
        dst,
        arch=manifest.arch,
        latent_dim=manifest.latent_dim,
        output_shape=manifest.output_shape,
        value_range=manifest.value_range,
        training=training,
        dataset=manifest.dataset,
        encoding=encoding,
        overwrite=overwrite,
        encoder=Encoder(encoding, levels, keyframe_every),
    ) as writer:
        for ckpt in store.checkpoints(src):
            writer.add(ckpt.step, ckpt.tensors, exact=ckpt.index == n - 1)
    return out.manifest(dst)
