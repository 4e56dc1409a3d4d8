"""Fashion-MNIST loading from Debian's IDX files, and the error when they are missing."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from surfing.data import DEFAULT_DIR, DatasetMissing, load_fashion_mnist


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_reads_idx_files_and_keeps_splits_apart(tmp_path) -> None:
    rng = np.random.default_rng(0)
    train_imgs, test_imgs = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 256, (3, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_imgs)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(5))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_imgs)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(3))
    images, labels = load_fashion_mnist("train", tmp_path)
    assert images.shape == (5, 1, 28, 28) and labels.tolist() == [0, 1, 2, 3, 4]
    assert np.allclose(images[2, 0].numpy(), train_imgs[2] / 255.0)
    test_images, _ = load_fashion_mnist("test", tmp_path)
    assert test_images.shape == (3, 1, 28, 28)
    assert np.allclose(test_images[0, 0].numpy(), test_imgs[0] / 255.0)


def test_missing_files_name_the_package(tmp_path) -> None:
    with pytest.raises(DatasetMissing, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path / "nowhere")


@pytest.mark.skipif(not DEFAULT_DIR.exists(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist() -> None:
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 1, 28, 28) and labels.max() == 9
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
