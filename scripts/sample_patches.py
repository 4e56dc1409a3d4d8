"""Cut 32 x 32 RGB patches from the two photographs scikit-learn ships (no download).

china.jpg and flower.jpg (427 x 640 x 3) are downscaled x2 first, so a patch holds structure
(an edge, a petal, a roof) rather than flat colour. The right-most `--test-frac` of each image's
columns is held out: test patches lie wholly inside it and training patches wholly left of it,
so no test pixel was ever seen in training. Writes train.npy and test.npy (uint8, N x S x S x 3,
the layout `surfing train --data` reads) and patches.json (seed, split, crop positions).

    python3 scripts/sample_patches.py [OUT_DIR] [--train 16000 --test 400 --seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image


def photographs(downscale: int = 2) -> dict[str, np.ndarray]:
    """scikit-learn's bundled sample photographs, (H, W, 3) uint8, shrunk by `downscale`."""
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    out = {}
    for name, img in zip(bunch.filenames, bunch.images, strict=True):
        im = Image.fromarray(img)
        if downscale > 1:
            size = (im.width // downscale, im.height // downscale)
            im = im.resize(size, Image.LANCZOS)
        out[Path(name).stem] = np.asarray(im)
    return out


def sample_patches(
    images: dict[str, np.ndarray],
    n_train: int,
    n_test: int,
    size: int = 32,
    test_frac: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Random crops, split by columns: (train, test) uint8 (N, size, size, 3) and the crops.

    Each image gives an equal share (the remainder goes to the first ones); crop records are
    {"split", "image", "row", "col", "split_col"} so disjointness can be checked.
    """
    rng = np.random.default_rng(seed)
    names = sorted(images)
    train, test, crops = [], [], []
    for split, total in (("train", n_train), ("test", n_test)):
        for i, name in enumerate(names):
            img = images[name]
            h, w = img.shape[:2]
            split_col = int(round(w * (1 - test_frac)))
            lo, hi = (0, split_col - size) if split == "train" else (split_col, w - size)
            if hi < lo or h < size:
                raise ValueError(f"{name} ({h} x {w}) has no room for {split} patches of {size}")
            n = total // len(names) + (i < total % len(names))
            rows = rng.integers(0, h - size + 1, n)
            cols = rng.integers(lo, hi + 1, n)
            for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
                (train if split == "train" else test).append(img[r : r + size, c : c + size])
                crops.append(
                    {"split": split, "image": name, "row": r, "col": c, "split_col": split_col}
                )

    def stack(patches: list[np.ndarray]) -> np.ndarray:
        return np.stack(patches) if patches else np.zeros((0, size, size, 3), np.uint8)

    return stack(train), stack(test), crops


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", default="data/patches", help="output folder")
    p.add_argument("--train", type=int, default=16000, help="training patches (all images)")
    p.add_argument("--test", type=int, default=400, help="held-out test patches")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--downscale", type=int, default=2)
    p.add_argument("--test-frac", type=float, default=0.2, help="right-most share of columns")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    images = photographs(args.downscale)
    train, test, crops = sample_patches(
        images, args.train, args.test, args.size, args.test_frac, args.seed
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "train.npy", train)
    np.save(out / "test.npy", test)
    meta = {
        "source": "sklearn.datasets.load_sample_images",
        "images": {k: list(v.shape) for k, v in images.items()},
        **{k: getattr(args, k) for k in ("size", "downscale", "test_frac", "seed")},
        "crops": crops,
    }
    (out / "patches.json").write_text(json.dumps(meta))
    print(f"{out}: train {train.shape}, test {test.shape}")


if __name__ == "__main__":
    main()
