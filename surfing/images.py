"""PNG in/out for single-channel images in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def load_png(path: Path | str, shape: tuple[int, int] = (28, 28)) -> torch.Tensor:
    """A grayscale image resized to `shape`, as (1, H, W) float32 in [0, 1]."""
    with Image.open(path) as im:
        im = im.convert("L")
        if im.size != (shape[1], shape[0]):
            im = im.resize((shape[1], shape[0]), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).unsqueeze(0)


def to_png(image: torch.Tensor, path: Path | str, scale: int = 1) -> None:
    """Write a (1, H, W) or (H, W) image in [0, 1] as an 8-bit PNG."""
    arr = (image.detach().cpu().squeeze().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    im = Image.fromarray(arr, mode="L")
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def save_grid(images: torch.Tensor, path: Path | str, ncol: int = 8, pad: int = 2) -> None:
    """Tile a batch (N, 1, H, W) into one PNG."""
    n, _, h, w = images.shape
    nrow = (n + ncol - 1) // ncol
    grid = torch.ones(1, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[
            :,
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + c * (w + pad) : pad + c * (w + pad) + w,
        ] = images[i]
    to_png(grid, path, scale=2)
