"""Image -> contract frame (UINT8 RGB HWC at the model's size). The one implementation.

The dataset loader, the clients, the stream client and the benchmarks all call this,
so what is trained on is byte-for-byte what is served.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cmg.errors import CMGError

ORIENTATION = 0x0112  # the EXIF tag a phone or camera stores its rotation in

# Pixels an image file may declare before it is refused unread: a PNG header can claim
# 20000 x 20000 in a few bytes and decoding it would take gigabytes. Pillow's own limit
# by default; `--max-pixels` on `cmg infer` / `cmg stream` changes it.
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
# The check below replaces Pillow's warning for images between its limit and twice it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class FrameError(CMGError, ValueError):
    """An image could not be turned into a frame; the message names the source.

    A CMGError (bad input), so `except CMGError` around `CMGClient.infer` covers an
    unreadable image too; still a ValueError for callers that caught it as one."""


# Pillow modes holding one 16-bit channel (camera mono PNG/TIFF): their high byte.
_MODES_16 = ("I;16", "I;16L", "I;16B", "I;16N")


def _array_to_uint8(arr: np.ndarray, what: str, wide_ints: int = 255, scale: float | None = None) -> np.ndarray:
    """Scale an array of any numeric dtype to UINT8 by the dtype's range, never by clipping.

    uint8 as is; bool 0/255; uint16 (either byte order) by its high byte, x >> 8, which is
    how Pillow reads 16-bit colour files, so a 16-bit grey file, a 16-bit colour file and
    the same pixels as an array all read alike; other integers must lie within
    0..`wide_ints` (255 for arrays: as is; 65535 for Pillow's 32-bit mode I, which holds
    16-bit camera data: x >> 8) and are refused otherwise; floats (mode F) must be finite
    and within 0..1 (x 255) or 0..255 (as is).
    Anything else is refused: a frame silently saturated to 255 (the old I;16 path) scores
    as a plausible normal image.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.size == 0:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        sixteen = arr.dtype.kind == "u" and arr.dtype.itemsize == 2  # uint16, big-endian (>u2) too
        top = 65535 if sixteen else wide_ints
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > top:
            fix = ("save the image with 8 or 16 bits per channel" if wide_ints > 255
                   else "give uint8 (0..255) or uint16 (0..65535) pixels")
            raise FrameError(f"{what}: {arr.dtype} pixel values {lo}..{hi} are outside 0..{top}; {fix}")
        if top == 255:
            return arr.astype(np.uint8)
        return (arr.astype(np.uint32) >> 8).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise FrameError(f"{what}: floating-point pixels include NaN or inf")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 255:
            raise FrameError(f"{what}: floating-point pixels {lo:g}..{hi:g} are outside 0..1 and 0..255")
        if scale is None:
            scale = 255.0 if hi <= 1.0 else 1.0
        if hi * scale > 255.0:
            raise FrameError(f"{what}: floating-point pixels up to {hi:g} in a 0..1 batch")
        return _scaled(arr, scale)
    raise FrameError(f"{what}: pixels of dtype {arr.dtype} are not an image")


_SLICE = 1 << 18  # pixels a float64 temporary holds at once (2 MB)


def _scaled(arr: np.ndarray, scale: float) -> np.ndarray:
    """rint(arr x scale) as uint8, in float64 (in float32, 128 values of 0..1 round to the
    other side of .5), a slice at a time: on the whole array at once its temporaries held 16
    bytes a pixel (~1.9 GB for one 9000 x 9000 float TIFF, several decoded at once)."""
    flat = arr.reshape(-1)
    out = np.empty(flat.shape, np.uint8)
    for i in range(0, flat.size, _SLICE):
        out[i : i + _SLICE] = np.rint(flat[i : i + _SLICE].astype(np.float64) * scale)
    return out.reshape(arr.shape)


def to_rgb8(image: Image.Image | np.ndarray, what: str = "image") -> Image.Image:
    """Any image (PIL in any mode, or an HW/HWx1/HWx2/HWx3/HWx4 array) -> 8-bit RGB PIL image.

    The one conversion: frames (`to_frame`, hence training, infer, stream, bench) and the
    ground-truth masks all go through it, so an image reads the same everywhere. 16-bit
    and float pixels are scaled by their type's range (`_array_to_uint8`); alpha is
    dropped (LA, RGBA, PA, palette with transparency, HxWx2 and HxWx4 arrays: the stored
    colours, not composited);
    CMYK and YCbCr use Pillow's conversions; a mode Pillow cannot turn into RGB is a
    FrameError naming it.
    """
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim >= 2 and (arr.shape[0] == 0 or arr.shape[1] == 0):
            raise FrameError(f"{what}: array of shape {list(image.shape)} is an empty image")
        if arr.ndim == 3 and arr.shape[-1] in (1, 2):  # grey, grey + alpha (as an LA file reads)
            arr = arr[..., 0]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
            raise FrameError(f"{what}: array of shape {list(image.shape)} is not an HxW, HxWx1, HxWx2, "
                             "HxWx3 or HxWx4 image")
        arr = _array_to_uint8(np.asarray(arr[..., :3] if arr.ndim == 3 else arr), what)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        return Image.fromarray(np.ascontiguousarray(arr), "RGB")
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _MODES_16 or mode in ("I", "F"):
        arr = _array_to_uint8(np.asarray(image), f"{what} (mode {mode})", wide_ints=65535)
        return Image.fromarray(np.repeat(arr[..., None], 3, axis=-1), "RGB")
    if mode in ("P", "PA"):
        image = image.convert("RGBA")  # the palette's colours; transparency becomes alpha, then dropped
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise FrameError(f"{what}: image mode {mode} cannot be converted to RGB ({exc})") from exc


def batch_to_uint8(batch: np.ndarray, what: str = "batch") -> np.ndarray:
    """A float [N,H,W,C] batch -> uint8 with one range decision for the whole array (0..1 or
    0..255, `_array_to_uint8`'s rule): decided frame by frame, a nearly black frame (a
    lens cap, lights off) inside a 0..255 batch was read as 0..1, scaled by 255 and flagged.
    Other dtypes are returned as they are (their scale is their type's)."""
    return _array_to_uint8(batch, what) if np.issubdtype(batch.dtype, np.floating) else batch


def batch_scale(batch: np.ndarray) -> float | None:
    """The factor `batch_to_uint8` would apply, from the finite pixels alone (None for
    integer batches): for converting the frames one at a time on the batch's scale, where
    a frame with a NaN must fail alone."""
    if not np.issubdtype(batch.dtype, np.floating) or not batch.size:
        return None
    finite = np.isfinite(batch)
    hi = float(batch.max(where=finite, initial=0.0))
    return 255.0 if hi <= 1.0 else 1.0


def frame_on_scale(frame: np.ndarray, scale: float | None, what: str = "frame") -> np.ndarray:
    """One frame of a batch -> uint8 on the batch's `scale` (`batch_scale`)."""
    return frame if scale is None else _array_to_uint8(frame, what, scale=scale)


def upright(image: Image.Image) -> Image.Image:
    """As a viewer shows it: a phone's or camera's JPEG (and some PNG/TIFF) stores its rotation
    as an EXIF tag, and a mask drawn on the image as displayed must line up with the frame.
    The tag is what a viewer follows, so it is followed here too, also on an image derived
    from the file (`Image.open(p).convert("RGB")` keeps it); `ImageOps.exif_transpose`
    removes it once applied (a caller who rotates by hand should do the same).
    Transposing copies: only where a tag says to."""
    if image.getexif().get(ORIENTATION, 1) != 1:
        return ImageOps.exif_transpose(image)
    return image


def to_frame(image: Image.Image | np.ndarray, size: tuple[int, int], what: str = "image") -> np.ndarray:
    """Convert a PIL image or an HWC/HW array to UINT8 RGB of `size` = (height, width). A PIL
    image is read upright (`upright`) and loaded here, so a truncated file opened lazily is a
    FrameError naming `what`, as its path would be."""
    if not isinstance(image, np.ndarray):
        if image.width == 0 or image.height == 0:
            raise FrameError(f"{what}: size {image.width} x {image.height} is empty")
        try:
            image = upright(image)
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise FrameError(f"unreadable {what}: {exc}") from exc
    height, width = size
    image = to_rgb8(image, what)
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
    # the callers that take a limit (cmg infer, cmg stream, the client) have the option; training does not
    fix = " (--max-pixels)" if max_pixels is not None else " (downscale the image)"
    with opened_image(source, "image", max_pixels, fix) as img:  # a decoding error in the body is said there too
        return to_frame(img, size, f"image {name}")  # upright, as a viewer shows it


@contextmanager
def opened_image(source: str | Path | bytes, kind: str = "image", max_pixels: int | None = None,
                 fix: str = "") -> Iterator[Image.Image]:
    """An image file (or encoded bytes), decoded once its declared size is checked against
    `max_pixels` (Pillow's limit by default); every problem with it a FrameError naming the
    `kind` and the file, errors of the `with` body's decoding included. One rule for frames
    and ground-truth masks (a mask's 30000 x 30000 header had been an internal error with no
    file named, a 12000 x 9000 one 2.3 GB)."""
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
            path = Path(source)
            if not path.is_file():  # a FIFO would block the open; a folder or device is no image either
                raise FrameError(f"{kind} not found: {name}" if not path.exists()
                                 else f"{kind} {name} is not a regular file")
            img = Image.open(source)
        with img:
            width, height = img.size
            if width * height > limit:
                raise FrameError(f"{kind} {name} declares {width} x {height} = {width * height} pixels, "
                                 f"over the limit of {limit}{fix}")
            if width == 0 or height == 0:
                raise FrameError(f"{kind} {name} is empty ({width} x {height})")
            img.load()
            yield img
    except FrameError:
        raise
    except Image.DecompressionBombError as exc:
        raise FrameError(f"{kind} {name} is over the pixel limit of {limit}{fix}: {exc}") from exc
    except UnidentifiedImageError:  # Pillow's text names its BytesIO object, not the file
        raise FrameError(f"unreadable {kind} {name}: not an image format Pillow reads") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise FrameError(f"unreadable {kind} {name}: {exc}") from exc
