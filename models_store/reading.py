"""Reading a checkpoint file: checked against the manifest once per file version, copied once.

Reading each file into bytes and parsing a second copy paid two copies per checkpoint, and a
second pass over the same files (a rescue pass) hashed them all again (docs/performance.md,
"Streaming"). Here the hash streams the file through a small buffer, safetensors maps the
tensors and each is copied once into torch's own memory (so no tensor stays backed by the file:
a file truncated later cannot fault a running solve). A file whose version (device, inode,
size, mtime) was verified before is not hashed again: the store writes each file once and
replaces files only by atomic rename, so a changed file is a new inode or a new mtime.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import BinaryIO

import safetensors.torch
import torch

from .errors import CorruptCheckpoint

Version = tuple[int, int, int, int]
CHUNK = 1 << 20  # bytes hashed per read: the buffer stays in the CPU's caches
REMEMBERED = 100_000  # verified file versions kept (about 100 bytes each)


def _version(st: os.stat_result) -> Version:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


WILL_NEED_AHEAD = 3  # files a stream read when due asks the kernel to bring in ahead of time


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
        advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
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
    """Reads checkpoint files, checking each file version's size and sha256 once; thread-safe
    (the store's prefetch reads several files at once)."""

    def __init__(self) -> None:
        self._verified: dict[Path, tuple[Version, str]] = {}
        self._lock = threading.Lock()

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
            if _sha256(fh) != sha256:
                raise CorruptCheckpoint(f"{where}: sha256 does not match the manifest")
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
