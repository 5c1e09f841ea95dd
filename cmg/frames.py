"""Image -> contract frame (UINT8 RGB HWC at the model's size). The one implementation.

The dataset loader, the clients, the stream client and the benchmarks all call this,
so what is trained on is byte-for-byte what is served.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class FrameError(ValueError):
    """An image could not be turned into a frame; the message names the source."""


def to_frame(image: Image.Image | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Convert a PIL image or an HWC/HW array to UINT8 RGB of `size` = (height, width)."""
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
            raise FrameError(f"array of shape {list(image.shape)} is not an HxW, HxWx1, HxWx3 or HxWx4 image")
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        arr = arr[..., :3]
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.max() <= 1.0:
                arr = arr * 255.0
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(arr))
    height, width = size
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8).copy()


def load_frame(source: str | Path | bytes, size: tuple[int, int]) -> np.ndarray:
    """Read an image file (or encoded bytes) into a frame; errors name the file."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        if isinstance(source, bytes):
            img = Image.open(io.BytesIO(source))
        else:
            if not Path(source).is_file():
                raise FrameError(f"image not found: {name}")
            img = Image.open(source)
        img.load()
    except FrameError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise FrameError(f"unreadable image {name}: {exc}") from exc
    return to_frame(img, size)
