"""A few held-out test images of a model's dataset, for the page's "pick an example" row.

Made on first request from data already on disk (never downloaded) and cached: the
Fashion-MNIST test split, scikit-learn's bundled digits (the split examples/digits trains
on: its last 297 images are never trained on), and for `npy:DIR/train` models a `test.npy`
beside the training array under the data folder next to the models store. A dataset with
none of these on disk simply has no examples.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from app.arrays import to_png
from models_store import Manifest

log = logging.getLogger(__name__)

PER_MODEL = 10  # one per class where the dataset has labels
FASHION_CLASSES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle boot")  # fmt: skip
DIGITS_HELD_OUT = 297  # examples/digits: the last 297 of sklearn's digits are the test split
_NPY_DATASET = re.compile(r"^npy:([A-Za-z0-9_-][A-Za-z0-9._-]{0,63})/train$")


@dataclass(frozen=True)
class Example:
    label: str
    png: bytes  # 8-bit gray or RGB, the dataset's own size


def examples_for(manifest: Manifest, models_dir: Path) -> tuple[Example, ...]:
    """Up to PER_MODEL held-out images for this model's dataset (empty when none on disk)."""
    return _examples(manifest.dataset, str(Path(models_dir).resolve()))


@lru_cache(maxsize=16)
def _examples(dataset: str, models_dir: str) -> tuple[Example, ...]:
    try:
        picked = _load(dataset, Path(models_dir))
    except Exception as e:  # a missing or unreadable file means no examples, not a 500
        log.info("no example images for dataset %r: %s", dataset, e)
        return ()
    return tuple(Example(label, to_png(image, (0.0, 1.0))) for label, image in picked)


def _load(dataset: str, models_dir: Path) -> list[tuple[str, np.ndarray]]:
    """(label, (C, H, W) float image in [0, 1]) pairs."""
    if dataset == "fashion-mnist":
        from surfing.data import load_fashion_mnist

        images, labels = load_fashion_mnist("test")
        return _one_per_class(images.numpy(), labels.numpy(), FASHION_CLASSES)
    if dataset == "sklearn-digits":
        from sklearn.datasets import load_digits  # bundled inside scikit-learn

        digits = load_digits()
        images = digits.images[-DIGITS_HELD_OUT:, None].astype(np.float32) / 16.0
        names = tuple(f"digit {d}" for d in range(10))
        return _one_per_class(images, digits.target[-DIGITS_HELD_OUT:], names)
    match = _NPY_DATASET.match(dataset)
    if match and ".." not in match.group(1):
        path = models_dir.parent / match.group(1) / "test.npy"
        return [(f"test {i}", im) for i, im in enumerate(_first_of_npy(path, PER_MODEL))]
    return []


def _one_per_class(
    images: np.ndarray, labels: np.ndarray, names: tuple[str, ...]
) -> list[tuple[str, np.ndarray]]:
    out = []
    for cls, name in enumerate(names[:PER_MODEL]):
        hits = np.flatnonzero(labels == cls)
        if hits.size:
            out.append((name, images[hits[0]]))
    return out


def _first_of_npy(path: Path, n: int) -> list[np.ndarray]:
    """The first n images of an (N, H, W), (N, C, H, W) or (N, H, W, C) array, uint8 0..255
    or float in [0, 1] (the layouts `surfing train --data` reads), without reading the rest."""
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    a = np.asarray(arr[:n])
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[-1] in (1, 3) and a.shape[1] not in (1, 3):
        a = a.transpose(0, 3, 1, 2)
    if a.ndim != 4 or a.shape[1] not in (1, 3):
        raise ValueError(f"{path}: shape {list(arr.shape)} is not a stack of images")
    a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
    return list(np.clip(a, 0.0, 1.0))
