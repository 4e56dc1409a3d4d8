"""Reading a checkpoint file: checked against the manifest once per file version, copied once.

Reading each file into bytes and parsing a second copy paid two copies per checkpoint, and a
second pass over the same files (a rescue pass) hashed them all again (docs/performance.md,
"Streaming"). Here the hash reads a read-only map of the file, safetensors maps the tensors,
and only tensors the file leaves misaligned are copied. A file whose version (device, inode,
size, mtime) was verified before is not hashed again: the store writes each file once and
replaces files only by atomic rename, so a changed file is a new inode or a new mtime.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from pathlib import Path

import safetensors.torch
import torch

from .errors import CorruptCheckpoint

Version = tuple[int, int, int, int]
# torch's CPU allocator aligns to 64 bytes; a tensor mapped from a file starts wherever the file
# puts it, and MKL rounds differently at another alignment, enough to change a hard target's
# basin (docs/performance.md, "Streaming"). Misaligned tensors are copied, so a checkpoint
# computes exactly what the same weights built in memory do.
ALIGN = 64
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


def _aligned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t if t.data_ptr() % ALIGN == 0 else t.clone() for k, t in tensors.items()}


def _sha256(fd: int, size: int) -> str:
    if size == 0:  # mmap refuses an empty file
        return hashlib.sha256(b"").hexdigest()
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as view:
        return hashlib.sha256(view).hexdigest()


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
            if _sha256(fh.fileno(), st.st_size) != sha256:
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
            return _aligned(safetensors.torch.load_file(path))
        version = self._check(path, size, sha256, where)
        tensors = safetensors.torch.load_file(path)
        if _version(os.stat(path)) != version:
            with self._lock:
                self._verified.pop(path, None)
            raise CorruptCheckpoint(f"{where}: the file changed while it was read")
        return _aligned(tensors)
