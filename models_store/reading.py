"""Reading a checkpoint file: checked against the manifest once per file version, copied once.

Reading each file into bytes and parsing a second copy paid two copies per checkpoint, and a
second pass over the same files (a rescue pass) hashed them all again (docs/performance.md,
"Streaming"). Here the hash streams the file through a small buffer, safetensors maps the
tensors and each is copied once into torch's own memory (so no tensor stays backed by the file:
a file truncated later cannot fault a running solve). A file whose version (device, inode,
size, mtime, ctime) was verified before is not hashed again: any write or replacement gives a
new ctime (which no user can set) or a new inode. A store also leaves a seal beside each file it
verified (`.<file>.verified`: that version and its sha256), so the next process skips the hash
too; a seal is written only for a file unchanged for SEAL_AFTER_S, so an edit in the same clock
tick as the hash cannot hide behind it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import BinaryIO

import safetensors.torch
import torch

from ._atomic import TMP_SUFFIX
from .errors import CorruptCheckpoint

Version = tuple[int, int, int, int, int]
CHUNK = 1 << 20  # bytes hashed per read: the buffer stays in the CPU's caches
REMEMBERED = 100_000  # verified file versions kept (about 100 bytes each)
SEAL_SUFFIX = ".verified"
# A file changed less than this long ago gets no seal: file clocks tick coarsely (ms), and a
# write in the tick the file was hashed in would leave its ctime, so its version, unchanged.
SEAL_AFTER_S = 2.0


def _version(st: os.stat_result) -> Version:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def seal_path(path: Path) -> Path:
    """Where the seal of checkpoint file `path` lives: a hidden file beside it."""
    return path.with_name(f".{path.name}{SEAL_SUFFIX}")


def _sealed(path: Path, version: Version, sha256: str) -> bool:
    """Whether a seal says this very file version was verified against this sha256."""
    try:
        seal = json.loads(seal_path(path).read_bytes())
        return seal == {"sha256": sha256, "version": list(version)}
    except (OSError, ValueError):
        return False  # none, unreadable or torn: hash the file


def is_sealed(path: Path, sha256: str) -> bool:
    """Whether a fresh process would skip hashing `path` (its seal matches the file as it is)."""
    try:
        return _sealed(path, _version(os.stat(path)), sha256)
    except OSError:
        return False


def _write_seal(path: Path, version: Version, sha256: str) -> None:
    """Best effort (a read-only store just hashes again next time); no fsync: a seal lost in a
    crash costs one hash, a torn one does not parse."""
    if time.time_ns() - version[4] < SEAL_AFTER_S * 1e9:
        return
    seal = seal_path(path)
    tmp = seal.with_name(f"{seal.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    try:
        tmp.write_text(json.dumps({"sha256": sha256, "version": list(version)}))
        os.replace(tmp, seal)
    except OSError:
        tmp.unlink(missing_ok=True)


WILL_NEED_AHEAD = 3  # files a stream read when due asks the kernel to bring in ahead of time


# One WILLNEED reads at most the kernel's readahead window (8 MB here, of a 26 MB checkpoint),
# so a whole file is asked for in pieces.
ADVISE_CHUNK = 4 << 20


def _advise_whole(fd: int) -> None:
    """Queue the whole file for reading now, in large requests. Without the hash's sequential
    read, the map alone faults the file in a few pages at a time: on this VM, whose page cache
    empties itself while idle, a bench row then waited 47 % of its time on the disk."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    try:
        for offset in range(0, os.fstat(fd).st_size, ADVISE_CHUNK):
            advise(fd, offset, ADVISE_CHUNK, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass


def will_need(path: Path) -> None:
    """Ask the kernel to read `path` into the page cache in the background (no thread of ours
    waits on the disk); a no-op where posix_fadvise is missing or the file is not there."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # reading it when due reports what is wrong
    try:
        _advise_whole(fd)
    finally:
        os.close(fd)


def _owned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies in torch's memory of tensors safetensors mapped from the file. Also 64-byte
    aligned, as torch allocates: a mapped tensor starts wherever the file puts it, and MKL
    rounds differently at another alignment, enough to change a hard target's basin
    (docs/performance.md, "Streaming")."""
    return {k: t.clone() for k, t in tensors.items()}


def _sha256(fh: BinaryIO) -> str:
    digest, buf = hashlib.sha256(), bytearray(CHUNK)
    view = memoryview(buf)
    while n := fh.readinto(buf):
        digest.update(view[:n])
    return digest.hexdigest()


class CheckedReader:
    """Reads checkpoint files, checking each file version's size and sha256 once (and, with
    `seals`, once across processes); thread-safe (the store's prefetch reads several files at
    once)."""

    def __init__(self, seals: bool = True) -> None:
        self._verified: dict[Path, tuple[Version, str]] = {}
        self._lock = threading.Lock()
        self._seals = seals

    def _check(self, path: Path, size: int, sha256: str, where: str) -> Version:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            version = _version(st)
            with self._lock:
                if self._verified.get(path) == (version, sha256):
                    return version
            if st.st_size != size:
                raise CorruptCheckpoint(
                    f"{where}: {st.st_size} bytes on disk, manifest says {size}"
                )
            if self._seals and _sealed(path, version, sha256):
                _advise_whole(fh.fileno())
            else:
                if _sha256(fh) != sha256:
                    raise CorruptCheckpoint(f"{where}: sha256 does not match the manifest")
                if self._seals:
                    _write_seal(path, version, sha256)
        with self._lock:
            if len(self._verified) >= REMEMBERED:
                self._verified.clear()
            self._verified[path] = (version, sha256)
        return version

    def read(
        self, path: Path, size: int, sha256: str, where: str, verify: bool = True
    ) -> dict[str, torch.Tensor]:
        """The file's tensors (safetensors only: nothing is unpickled). With `verify`, the file
        must match the manifest's size and sha256, and must be the same version after it was
        mapped (a file replaced in between is reported, never half-read)."""
        if not verify:
            return _owned(safetensors.torch.load_file(path))
        version = self._check(path, size, sha256, where)
        tensors = safetensors.torch.load_file(path)
        if _version(os.stat(path)) != version:
            with self._lock:
                self._verified.pop(path, None)
            raise CorruptCheckpoint(f"{where}: the file changed while it was read")
        return _owned(tensors)
