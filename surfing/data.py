"""Fashion-MNIST from the gzipped IDX files of Debian's `dataset-fashion-mnist` package."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

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
