"""Decode client arrays and images into validated float32 numpy arrays.

Everything here is hostile-input code: sizes are checked from headers *before* decoding
(PNG/JPEG dimensions, .npy shapes), pickled .npy files are refused, and every failure is an
`InvalidInput` (422) naming the field and what is wrong. No torch here: the API process only
validates; the worker does the numerical work.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.problems import InvalidInput

NPY_MAGIC = b"\x93NUMPY"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
_DATA_URL = re.compile(r"^data:[\w.+/-]*;base64,", re.IGNORECASE)


# ---- trusted round trip (database columns) ---------------------------------------------------


def to_npy(arr: np.ndarray) -> bytes:
    """Serialise an array for a LargeBinary column."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def from_npy(data: bytes) -> np.ndarray:
    """Read an array written by `to_npy` (never unpickles)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


# ---- untrusted input ------------------------------------------------------------------------


def check_finite(arr: np.ndarray, what: str) -> None:
    """422 naming the first non-finite entry: NaN/Inf would poison the whole solve."""
    bad = ~np.isfinite(arr)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        index = where[0] if len(where) == 1 else list(where)
        raise InvalidInput(f"{what} contains NaN or Inf (first at index {index})", field=what)


def as_float32(arr: np.ndarray, what: str) -> np.ndarray:
    """float32 copy, refusing non-finite values before and after the cast (overflow)."""
    check_finite(arr, what)
    with np.errstate(over="ignore"):
        out = np.asarray(arr, dtype=np.float32)
    check_finite(out, what)
    return out


def parse_nested(value: Any, what: str) -> np.ndarray:
    """A JSON nested list of numbers -> rectangular float64 array (finiteness checked later)."""
    if not isinstance(value, list):
        raise InvalidInput(f"{what} must be a (nested) list of numbers", field=what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError, Warning) as e:
        raise InvalidInput(
            f"{what} must be a rectangular nested list of numbers ({e})", field=what
        ) from None
    if arr.size == 0:
        raise InvalidInput(f"{what} is empty", field=what)
    if arr.dtype.kind not in "iuf":
        raise InvalidInput(
            f"{what} must contain only numbers (found {arr.dtype.name} values)", field=what
        )
    return arr.astype(np.float64)


def load_npy(data: bytes, what: str, max_elements: int) -> np.ndarray:
    """Parse a .npy upload: header first (dtype, shape, size), then the data, never pickle."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise InvalidInput(f"{what}: .npy format version {version} is not supported")
    except InvalidInput:
        raise
    except (ValueError, SyntaxError, TypeError, EOFError) as e:
        raise InvalidInput(f"{what} is not a readable .npy file ({e})", field=what) from None
    if dtype.hasobject or dtype.kind != "f":
        raise InvalidInput(
            f"{what} must be a float .npy array (float16/32/64), got dtype {dtype}", field=what
        )
    count = math.prod(shape)
    if count == 0:
        raise InvalidInput(f"{what} is empty (shape {list(shape)})", field=what)
    if count > max_elements:
        raise InvalidInput(
            f"{what} has {count} elements (shape {list(shape)}); the limit is {max_elements}",
            field=what,
        )
    if len(data) - f.tell() < count * dtype.itemsize:
        raise InvalidInput(f"{what}: .npy data is truncated", field=what)
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InvalidInput(f"{what} is not a readable .npy file ({e})", field=what) from None
    return np.asarray(arr, dtype=np.float64)


def decode_base64(value: str, what: str) -> bytes:
    """Strict base64 (an optional data: URL prefix is accepted)."""
    text = _DATA_URL.sub("", value.strip())
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"{what} is not valid base64 ({e})", field=what) from None


def decode_picture(
    data: bytes,
    what: str,
    shape: Sequence[int],
    value_range: Sequence[float],
    max_pixels: int,
) -> np.ndarray:
    """PNG/JPEG -> (1, C, H, W) float64 in the model's value range.

    The pixel count is read from the header and capped before any pixel data is decoded
    (decompression bombs). Colour is converted to the model's channels (1: luminance,
    3: RGB); an image of another size is resized (bilinear) to the model's H x W.
    """
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise InvalidInput(
            f"{what}: this model's output shape {list(shape)} is not a 1- or 3-channel picture; "
            "send a .npy array or a nested list instead",
            field=what,
        )
    c, h, w = (int(s) for s in shape)
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:
        # PIL refuses > 2 * Image.MAX_IMAGE_PIXELS (~179 M) already in open(): still our cap.
        raise InvalidInput(
            f"{what} declares too many pixels ({e}); the limit is {max_pixels}", field=what
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InvalidInput(f"{what} cannot be decoded as PNG or JPEG ({e})", field=what) from None
    if im.format not in ("PNG", "JPEG"):
        raise InvalidInput(f"{what} must be PNG or JPEG, got {im.format}", field=what)
    width, height = im.size
    if width * height > max_pixels:
        raise InvalidInput(
            f"{what} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
            field=what,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            im = ImageOps.exif_transpose(im) if im.format == "JPEG" else im
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                planes = [np.asarray(im, dtype=np.float64).clip(0, 65535) / 65535.0]
            elif c == 1:
                planes = [np.asarray(im.convert("L"), dtype=np.float64) / 255.0]
            else:
                rgb = np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
                planes = [rgb[..., i] for i in range(3)]
    except (OSError, ValueError, SyntaxError, Warning, Image.DecompressionBombError) as e:
        raise InvalidInput(f"{what} cannot be decoded ({e})", field=what) from None
    if c == 3 and len(planes) == 1:
        planes = planes * 3
    if planes[0].shape != (h, w):
        planes = [
            np.asarray(
                Image.fromarray(p.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR),
                dtype=np.float64,
            )
            for p in planes
        ]
    lo, hi = float(value_range[0]), float(value_range[1])
    return (lo + (hi - lo) * np.stack(planes))[None]


def sniff(data: bytes) -> str:
    """'npy', 'png', 'jpeg' or 'unknown' from the leading bytes (never trust file names)."""
    if data.startswith(NPY_MAGIC):
        return "npy"
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    return "unknown"


def as_batch(arr: np.ndarray, shape: Sequence[int], what: str, max_batch: int) -> np.ndarray:
    """Accept one sample (shape S, or S without its channel when C = 1) or a batch (B, *S)."""
    s = tuple(int(d) for d in shape)
    got = tuple(arr.shape)
    if got == s:
        out = arr[None]
    elif len(got) == len(s) + 1 and got[1:] == s:
        out = arr
    elif s[0] == 1 and len(s) > 1 and got == s[1:]:
        out = arr[None, None]
    elif s[0] == 1 and len(s) > 1 and len(got) == len(s) and got[1:] == s[1:]:
        out = arr[:, None]  # (B, H, W) for a one-channel model
    else:
        last = len(s) == 3 and got[-3:] == (*s[1:], s[0]) and len(got) in (3, 4)
        hint = "; channels go first, as in [C, H, W]" if last and s[0] > 1 else ""
        raise InvalidInput(
            f"{what} has shape {list(got)}; the model expects {list(s)} "
            f"(or a batch of shape [B, {', '.join(map(str, s))}]){hint}",
            field=what,
        )
    if not 1 <= out.shape[0] <= max_batch:
        raise InvalidInput(
            f"{what} holds {out.shape[0]} targets; the limit per job is {max_batch}", field=what
        )
    return out


def decode_image(
    value: bytes | str | list[Any],
    what: str,
    shape: Sequence[int],
    value_range: Sequence[float],
    max_pixels: int,
    max_batch: int,
) -> np.ndarray:
    """Any accepted image form -> (B, *shape) float32.

    bytes: an upload (PNG, JPEG or .npy, recognised by content); str: base64 of the same;
    list: nested list of floats. Arrays (.npy, lists) must already be in the model's value
    range and shape; pictures are converted.
    """
    if isinstance(value, list):
        arr = parse_nested(value, what)
    else:
        data = decode_base64(value, what) if isinstance(value, str) else value
        if not data:
            raise InvalidInput(f"{what} is empty", field=what)
        kind = sniff(data)
        if kind == "npy":
            arr = load_npy(data, what, max_elements=max_batch * math.prod(shape))
        elif kind in ("png", "jpeg"):
            arr = decode_picture(data, what, shape, value_range, max_pixels)
        else:
            raise InvalidInput(
                f"{what} is neither PNG, JPEG nor .npy (unrecognised leading bytes)", field=what
            )
    check_finite(arr, what)  # before batching, so the index refers to what the client sent
    return as_float32(as_batch(arr, shape, what, max_batch), what)


def to_png(image: np.ndarray, value_range: Sequence[float], scale: int = 1) -> bytes:
    """(C, H, W) array in the model's value range -> 8-bit PNG bytes (gray or RGB)."""
    lo, hi = float(value_range[0]), float(value_range[1])
    unit = np.clip((np.asarray(image, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
    pixels = (unit * 255.0).round().astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[0] == 3:
        plane = pixels.transpose(1, 2, 0)  # RGB
    elif pixels.ndim == 3:
        plane = pixels[0]  # one channel (or more than 3: show the first)
    elif pixels.ndim == 2:
        plane = pixels
    else:
        plane = pixels.reshape(-1, pixels.shape[-1])  # vectors become one row
    im = Image.fromarray(np.ascontiguousarray(plane))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
