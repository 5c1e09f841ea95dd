"""Overlay PNG for a flagged frame: the frame, the anomaly map as a heatmap, the keep-mask outline.

Drawn with Pillow and a matplotlib colormap only (no pyplot figure): it runs per frame in
the serving path, so it must be cheap and headless.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cmg.errors import CMGError, check_parent_folders
from cmg.files import write_atomic
from cmg_clients.core import Result


def check_overlay_dir(folder: Path | None) -> None:
    """Fail before any request when overlays could not be written."""
    if folder is None:
        return
    if folder.exists() and not folder.is_dir():
        raise CMGError(f"--overlays {folder} is a file, not a folder")
    check_parent_folders(folder, "--overlays")


OWNER_FILE = ".cmg-stream-out"  # in a stream's overlay folder: the output file whose overlays it holds


def claim_overlay_dir(folder: Path, out: Path) -> None:
    """One output file's overlays per folder, said in it: streams whose `--out` share a name
    (a/line3.jsonl, b/line3.jsonl) with one `--overlays` DIR would write the same file names
    (sequence numbers start at 0 in each) over each other's."""
    folder.mkdir(parents=True, exist_ok=True)
    mine = str(Path(out).resolve())
    try:
        theirs = (folder / OWNER_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        write_atomic(folder / OWNER_FILE, mine + "\n")
        return
    if theirs != mine:
        raise CMGError(f"--overlays: {folder} holds the overlays of the stream into {theirs}: give this one "
                       f"(--out {out}) another --overlays folder")


def stream_overlay_name(seq: int, frame_id: str) -> str:
    """A stream's overlay file: its sequence number first (unique, in stream order), then the
    frame's own name made safe for a file name (a glob's frame_id is a path)."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(frame_id).stem)[:80]
    return f"{seq:07d}_{stem or 'frame'}.png"


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest upsampling of a G x G map to pixels, as the graph does for the keep-mask."""
    g_h, g_w = grid.shape
    rows = (np.arange(height) * g_h) // height
    cols = (np.arange(width) * g_w) // width
    return grid[rows][:, cols]


def overlay_image(frame: np.ndarray, result: Result, alpha: float = 0.45) -> Image.Image:
    """Frame blended with the anomaly heatmap (only inside kept patches) and the keep-mask outline."""
    from matplotlib import colormaps  # heavy: only drawing an overlay needs it

    h, w = frame.shape[:2]
    amap = np.asarray(result.anomaly_map, dtype=np.float32)
    keep = _upsample(np.asarray(result.keep_mask) > 0, h, w)
    peak = float(amap.max()) if amap.size and amap.max() > 0 else 1.0
    heat = colormaps["inferno"](_upsample(amap / peak, h, w))[..., :3]
    base = frame.astype(np.float32) / 255.0
    blend = np.where(keep[..., None], (1 - alpha) * base + alpha * heat, 0.5 * base)
    out = (np.clip(blend, 0, 1) * 255).astype(np.uint8)
    # Outline: kept pixels with a discarded (or out-of-frame) 4-neighbour.
    pad = np.pad(keep, 1, constant_values=False)
    interior = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    out[keep & ~interior] = (0, 255, 0)
    img = Image.fromarray(out)
    scale = max(1, 256 // max(h, w))  # tiny frames are unreadable at 1:1
    if scale > 1:
        img = img.resize((w * scale, h * scale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    label = f"score {result.score:.4f}" + (" ANOMALY" if result.is_anomaly else "")
    draw.text((4, 4), label, fill=(255, 64, 64) if result.is_anomaly else (255, 255, 255))
    return img


def save_overlay(frame: np.ndarray, result: Result, path: str | Path) -> Path:
    """Write the overlay PNG (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay_image(frame, result).save(path, format="PNG")
    return path


def overlay_into(line: dict, frame: np.ndarray, result: Result, path: str | Path) -> bool:
    """Write the overlay and name it in the frame's output `line` (`overlay`), or say there why
    it was not written (`overlay_error`): the frame's score stands either way. True if written."""
    try:
        line["overlay"] = str(save_overlay(frame, result, path))
        return True
    except OSError as exc:
        line["overlay_error"] = f"{type(exc).__name__}: {exc}"
        return False
