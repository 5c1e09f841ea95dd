"""Image -> contract frame (UINT8 RGB HWC at the model's size). The one implementation.

The dataset loader, the clients, the stream client and the benchmarks all call this,
so what is trained on is byte-for-byte what is served.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Pixels an image file may declare before it is refused unread: a PNG header can claim
# 20000 x 20000 in a few bytes and decoding it would take gigabytes. Pillow's own limit
# by default; `--max-pixels` on `cmg infer` / `cmg stream` changes it.
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
# The check below replaces Pillow's warning for images between its limit and twice it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class FrameError(ValueError):
    """An image could not be turned into a frame; the message names the source."""


def to_frame(image: Image.Image | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Convert a PIL image or an HWC/HW array to UINT8 RGB of `size` = (height, width)."""
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim >= 2 and (arr.shape[0] == 0 or arr.shape[1] == 0):
            raise FrameError(f"array of shape {list(image.shape)} is an empty image")
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
    if image.width == 0 or image.height == 0:
        raise FrameError(f"image of size {image.width} x {image.height} is empty")
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8).copy()


def load_frame(source: str | Path | bytes, size: tuple[int, int], max_pixels: int | None = None) -> np.ndarray:
    """Read an image file (or encoded bytes) into a frame; errors name the file.

    Every problem with the file (missing, unreadable, truncated, not an image, empty,
    more than `max_pixels` pixels declared) is a FrameError, so callers can give that
    one frame an error and go on.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    if limit < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if limit > 2 * (Image.MAX_IMAGE_PIXELS or 0) and Image.MAX_IMAGE_PIXELS is not None:
        Image.MAX_IMAGE_PIXELS = limit  # a larger limit asked for explicitly; Pillow must not refuse first
    try:
        if isinstance(source, bytes):
            img = Image.open(io.BytesIO(source))
        else:
            if not Path(source).is_file():
                raise FrameError(f"image not found: {name}")
            img = Image.open(source)
        with img:
            width, height = img.size
            if width * height > limit:
                raise FrameError(f"image {name} declares {width} x {height} = {width * height} pixels, "
                                 f"over the limit of {limit} (--max-pixels)")
            if width == 0 or height == 0:
                raise FrameError(f"image {name} is empty ({width} x {height})")
            img.load()
            return to_frame(img, size)
    except FrameError:
        raise
    except Image.DecompressionBombError as exc:
        raise FrameError(f"image {name} is over the pixel limit of {limit} (--max-pixels): {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise FrameError(f"unreadable image {name}: {exc}") from exc
