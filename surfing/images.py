"""PNG/JPEG in and PNG out for grayscale and RGB images in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

_WIDE = ("I;16", "I;16B", "I;16L", "I")  # 16-bit grayscale PNGs


def load_png(path: Path | str, shape: tuple[int, int] = (28, 28)) -> torch.Tensor:
    """A grayscale image resized to `shape`, as (1, H, W) float32 in [0, 1]."""
    return load_image(path, (1, *shape))


def load_image(path: Path | str, shape: Sequence[int]) -> torch.Tensor:
    """A PNG/JPEG as (C, H, W) float32 in [0, 1] for a model of output shape C x H x W:
    colour converted to C (1: luminance, 3: RGB), size resized (bilinear) to H x W."""
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(
            f"output shape {list(shape)} is not a 1- or 3-channel image; give a .npy array"
        )
    c, h, w = (int(s) for s in shape)
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im) if im.format == "JPEG" else im
        if im.mode in _WIDE:  # keep 16 bits: resize as float, then scale
            plane = Image.fromarray(np.asarray(im, dtype=np.float32).clip(0, 65535) / 65535)
            if plane.size != (w, h):
                plane = plane.resize((w, h), Image.BILINEAR)
            arr = np.repeat(np.asarray(plane, dtype=np.float32)[None], c, axis=0)
            return torch.from_numpy(np.ascontiguousarray(arr))
        im = im.convert("L" if c == 1 else "RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    arr = arr[None] if c == 1 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def to_png(image: torch.Tensor, path: Path | str, scale: int = 1) -> None:
    """Write a (1, H, W), (H, W) or RGB (3, H, W) image in [0, 1] as an 8-bit PNG."""
    x = image.detach().cpu()
    rgb = x.ndim == 3 and x.shape[0] == 3
    x = x.permute(1, 2, 0) if rgb else x.squeeze()
    arr = (x.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    im = Image.fromarray(arr, mode="RGB" if rgb else "L")
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def save_grid(images: torch.Tensor, path: Path | str, ncol: int = 8, pad: int = 2) -> None:
    """Tile a batch (N, C, H, W), C = 1 or 3, into one PNG."""
    n, ch, h, w = images.shape
    nrow = (n + ncol - 1) // ncol
    grid = torch.ones(ch, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[
            :,
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + c * (w + pad) : pad + c * (w + pad) + w,
        ] = images[i]
    to_png(grid, path, scale=2)
