"""Training images: Fashion-MNIST from the gzipped IDX files of Debian's `dataset-fashion-mnist`
package, or the user's own (a folder of PNG/JPEG files, or an `.npy` array)."""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetMissing(FileNotFoundError):
    """The IDX files are absent: nothing is ever downloaded, so say how to install them."""


def data_dir() -> Path:
    return Path(os.environ.get("SURFING_DATA_DIR", DEFAULT_DIR))


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file: magic (0, 0, dtype, ndim), ndim big-endian sizes, then raw data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(
    split: str = "train", directory: Path | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64 of one split.

    The test split is kept apart: its images are the held-out targets of the experiments.
    """
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root = Path(directory) if directory is not None else data_dir()
    images_file, labels_file = (root / name for name in FILES[split])
    missing = [p for p in (images_file, labels_file) if not p.exists()]
    if missing:
        raise DatasetMissing(
            f"Fashion-MNIST files not found: {', '.join(map(str, missing))}. Install them with "
            "`apt-get install -y dataset-fashion-mnist` or point SURFING_DATA_DIR (or --data-dir) "
            "at a folder holding the gzipped IDX files."
        )
    images = torch.from_numpy(_read_idx(images_file).astype(np.float32) / 255.0).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(labels_file).astype(np.int64))
    return images, labels


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_IMAGES = 100_000  # a folder or array above this is refused, not read into memory
MAX_SIZE = 256
MAX_VALUES = 2**29  # floats held in memory (2 GiB)
T = TypeVar("T")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def image_files(folder: Path | str) -> list[Path]:
    """PNG/JPEG files under `folder` (recursively, sorted); other files are skipped."""
    return sorted(
        p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def dataset_name(path: Path | str) -> str:
    """What the manifest's `dataset` says: "folder:NAME" or "npy:PARENT/NAME"."""
    p = Path(path).resolve()
    return f"npy:{p.parent.name}/{p.stem}" if p.suffix.lower() == ".npy" else f"folder:{p.name}"


def load_images(
    path: Path | str,
    size: int | None = None,
    channels: int | None = None,
    max_images: int = MAX_IMAGES,
) -> torch.Tensor:
    """The user's images as (N, C, size, size) float32 in [0, 1].

    `path` is a folder of PNG/JPEG files (non-square ones are centre-cropped, then resized) or
    an `.npy` array (N, H, W), (N, C, H, W) or (N, H, W, C), uint8 0..255 or float in [0, 1].
    `size`/`channels` default to the array's own; for a folder, size is required and channels
    is 1 only when every image is grayscale. RGB -> 1 channel uses luminance, 1 -> 3 repeats.
    """
    p = Path(path)
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    if size is not None and not 1 <= size <= MAX_SIZE:
        raise ValueError(f"image size must be in 1..{MAX_SIZE}, not {size}")
    if p.is_dir():
        return _load_folder(p, size, channels, max_images)
    if p.suffix.lower() == ".npy" and p.is_file():
        return _load_npy(p, size, channels, max_images)
    raise ValueError(f"{p}: expected a folder of PNG/JPEG images or an .npy file")


def _load_folder(folder: Path, size: int | None, channels: int | None, cap: int) -> torch.Tensor:
    files = image_files(folder)
    if not files:
        raise ValueError(f"{folder}: no PNG or JPEG images found")
    if len(files) > cap:
        raise ValueError(f"{folder}: {len(files)} images, more than the cap of {cap}")
    if size is None:
        raise ValueError("give the image size (--image-size) to train on a folder of images")
    if channels is None:  # headers only: PIL decodes pixels lazily
        channels = 1 if all(_read(f, lambda im: im.mode) in _GRAY_MODES for f in files) else 3
    _check_total(folder, len(files), channels, size)
    out = np.empty((len(files), channels, size, size), dtype=np.float32)
    for i, f in enumerate(files):
        out[i] = _read(f, lambda im: _square(im, size, channels))
    return torch.from_numpy(out)


def _read(path: Path, use: Callable[[Image.Image], T]) -> T:
    """Apply `use` to the opened image; a file PIL cannot decode is a clear ValueError."""
    try:
        with Image.open(path) as im:
            return use(im)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read it as an image ({e})") from e


def _check_total(path: Path, n: int, channels: int, size: int) -> None:
    if n * channels * size * size > MAX_VALUES:
        raise ValueError(
            f"{path}: {n} images of {channels} x {size} x {size} exceed the in-memory cap of "
            f"{MAX_VALUES} values; use fewer or smaller images"
        )


def _square(im: Image.Image, size: int, channels: int) -> np.ndarray:
    """Centre-crop to a square, resize (antialiased) and convert: (C, size, size) in [0, 1]."""
    if im.mode in ("I", "I;16", "F"):  # 16-bit / float grayscale: PIL's "L" would clip it
        arr = np.asarray(im, dtype=np.float32)
        top = 65535.0 if im.mode != "F" and arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255, 0, 255).astype(np.uint8), mode="L")
    im = im.convert("L" if channels == 1 else "RGB")
    w, h = im.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    im = im.crop(box).resize((size, size), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _load_npy(path: Path, size: int | None, channels: int | None, cap: int) -> torch.Tensor:
    try:  # memory-mapped: the shape is checked before the data is read
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:  # object arrays need pickle, which is never allowed
        raise ValueError(f"{path}: not a plain numeric array ({e})") from e
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[3] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    elif not (arr.ndim == 4 and arr.shape[1] in (1, 3)):
        raise ValueError(
            f"{path}: shape {list(arr.shape)}; expected (N, H, W), (N, C, H, W) or (N, H, W, C) "
            "with C = 1 or 3"
        )
    if len(arr) == 0:
        raise ValueError(f"{path}: the array holds no images")
    if len(arr) > cap:
        raise ValueError(f"{path}: {len(arr)} images, more than the cap of {cap}")
    _check_total(path, len(arr), max(arr.shape[1], channels or 1), max(*arr.shape[2:], size or 0))
    if arr.dtype == np.uint8:
        x = torch.from_numpy(np.array(arr)).float() / 255.0  # a copy: arr is memory-mapped
    elif arr.dtype.kind == "f":
        x = torch.from_numpy(np.array(arr, dtype=np.float32))
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
            raise ValueError(f"{path}: float values must lie in [0, 1], found [{lo}, {hi}]")
    else:
        raise ValueError(f"{path}: dtype {arr.dtype}; expected uint8 (0..255) or float in [0, 1]")
    n, c, h, w = x.shape
    channels = channels or c
    if c == 3 and channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif c == 1 and channels == 3:
        x = x.expand(n, 3, h, w)
    if size is None:
        if h != w:
            raise ValueError(f"{path}: images are {h} x {w}; give a square size to resize to")
        size = h
    if (h, w) != (size, size):
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[:, :, top : top + side, left : left + side]
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)
    return x.contiguous()
