"""Where `cmg stream`'s frames come from: a folder, a glob, a video, synth:PRESET or frames
in memory, each a Source of lazily read frames in a fixed order (seq = position)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np

from cmg.argtypes import MAX_SEED
from cmg.errors import CMGError
from cmg.frames import (
    DEFAULT_MAX_PIXELS,
    FrameError,
    batch_scale,
    frame_on_scale,
    load_frame,
    to_frame,
)
from cmg_clients.client import glob_files, is_pattern, iter_image_paths, no_match
from cmg_data import synth

VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg", ".y4m",
              ".flv", ".wmv", ".3gp", ".ogv"}
COUNTED_EXTS = {".mp4", ".mov", ".m4v", ".avi", ".3gp"}  # their header counts the frames stored (others estimate)
MAX_UNREADABLE_RUN = 50  # reads in a row that give no frame: the end of the file
Loader = Callable[[tuple[int, int]], np.ndarray]  # (height, width) -> UINT8 frame


@dataclass(frozen=True)
class SourceItem:
    """A frame to come: its id, where it comes from, and how to read it (lazily)."""

    frame_id: str
    source: str
    load: Loader
    extra: dict = field(default_factory=dict)  # e.g. the synthetic scene's label


# -- sources ------------------------------------------------------------------------------
class Source:
    """Frames in a fixed order; `items(start)` begins at frame `start` (seq numbers are
    positions in this order), `pick(seqs)` gives chosen earlier frames again."""

    count: int | None = None  # None: unknown or endless
    fps: float | None = None  # the source's own rate, if it has one

    @property
    def warnings(self) -> list[str]:
        """What reading it found short of an error line (a video shorter than its header says)."""
        return self.__dict__.setdefault("_warnings", [])

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        raise NotImplementedError

    def pick(self, seqs: Iterable[int]) -> Iterator[tuple[int, SourceItem]]:
        """(seq, item) for the wanted seqs, in order (generic: read through)."""
        wanted = sorted(set(seqs))
        if not wanted:
            return
        todo = iter(wanted)
        target = next(todo)
        for seq, item in enumerate(self.items(0)):
            if seq == target:
                yield seq, item
                target = next(todo, None)
                if target is None:
                    return


class FileSource(Source):
    def __init__(self, paths: list[Path], root: Path | None, max_pixels: int) -> None:
        self.paths, self.root, self.max_pixels = paths, root, max_pixels
        self.count = len(paths)

    def _item(self, p: Path) -> SourceItem:
        fid = str(p.relative_to(self.root)) if self.root is not None else str(p)
        return SourceItem(fid, str(p), lambda size, p=p: load_frame(p, size, max_pixels=self.max_pixels))

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        return (self._item(p) for p in self.paths[start:])

    def pick(self, seqs: Iterable[int]) -> Iterator[tuple[int, SourceItem]]:
        return ((s, self._item(self.paths[s])) for s in sorted(set(seqs)) if 0 <= s < len(self.paths))


class VideoSource(Source):
    def __init__(self, path: Path) -> None:
        try:
            import cv2  # optional 'video' extra: only video sources need OpenCV
        except ImportError as exc:
            raise CMGError(f"{path}: video sources need OpenCV (pip install 'cmg-triton[video]')") from exc
        self.cv2, self.path = cv2, path
        # Checked now, before any output is opened: a file OpenCV cannot read, or one without
        # a frame, is refused like an empty folder.
        cap = self._open()
        try:
            if not cap.grab():
                raise CMGError(f"video {path} has no frame OpenCV can read")
        finally:
            cap.release()

    def _open(self):
        cap = self.cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            raise CMGError(f"cannot open video {self.path}")
        return cap

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        """Every frame position the file has: a decoded frame, or an error line where OpenCV
        could not decode one (a damaged file said, not ended short with exit 0)."""
        cap = self._open()
        try:
            declared = int(cap.get(self.cv2.CAP_PROP_FRAME_COUNT))
            index, failed = 0, 0  # failed: reads that gave nothing since the last frame
            while failed < MAX_UNREADABLE_RUN:
                ok, bgr = cap.read() if index + failed >= start else (cap.grab(), None)
                if not ok:
                    failed += 1
                    continue
                for seq in range(index, index + failed):  # a frame came after them: they were damaged, not the end
                    if seq >= start:
                        yield self._error(seq, "could not be decoded (a damaged file; OpenCV numbers the frames after "
                                               "it as it decodes them, so their ids may be shifted)")
                index += failed
                failed = 0
                if index >= start:
                    rgb = np.ascontiguousarray(bgr[..., ::-1])
                    yield SourceItem(f"{self.path.name}#{index}", str(self.path), lambda size, a=rgb: to_frame(a, size))
                index += 1
            if ends_short(self.path, declared, index):
                self.warnings.append(f"video {self.path}: {index} frames decoded of the {declared} its header "
                                     "declares (a truncated or damaged file? or frames an edit list hides)")
        finally:
            cap.release()

    def _error(self, seq: int, why: str) -> SourceItem:
        """A frame position without a frame: its line says why, the stream goes on."""
        message = f"video {self.path}: frame {seq} {why}"

        def load(size: tuple[int, int]) -> np.ndarray:
            raise FrameError(message)

        return SourceItem(f"{self.path.name}#{seq}", str(self.path), load)


def ends_short(path: Path, declared: int, decoded: int) -> bool:
    """A video that ends short enough of its header's count to say so. Said, not error lines:
    the count is a hint (an .mp4 an edit list trims, a clip cut without re-encoding, counts
    frames it never shows, so such a file warns though whole; .mkv and the like estimate it
    from the duration, so only 5% short is said there)."""
    return declared - decoded > (2 if path.suffix.lower() in COUNTED_EXTS else max(2, declared // 20))


def parse_synth(spec: str) -> dict:
    """`synth:PRESET[?fps=..&seed=..&n=..]` -> {"preset", "fps", "seed", "n"}."""
    body = spec[len("synth:") :]
    preset, _, query = body.partition("?")
    try:
        given = parse_qs(query, strict_parsing=bool(query)) if query else {}
    except ValueError as exc:
        raise CMGError(f"{spec}: malformed parameters ({exc})") from exc
    twice = sorted(k for k, v in given.items() if len(v) > 1)
    if twice:
        raise CMGError(f"{spec}: parameter(s) given twice: {', '.join(twice)}")
    params = {k: v[0] for k, v in given.items()}
    unknown = set(params) - {"fps", "seed", "n"}
    if unknown:
        raise CMGError(f"{spec}: unknown parameter(s) {', '.join(sorted(unknown))} (expected fps, seed, n)")
    try:
        opts = {
            "preset": preset or "tiny",
            "fps": float(params["fps"]) if "fps" in params else None,
            "seed": int(params.get("seed", 0)),
            "n": int(params["n"]) if "n" in params else None,
        }
    except ValueError as exc:
        raise CMGError(f"{spec}: {exc}") from exc
    if opts["fps"] is not None and not (np.isfinite(opts["fps"]) and opts["fps"] > 0):
        raise CMGError(f"{spec}: fps must be a finite number > 0")
    if opts["n"] is not None and opts["n"] < 0:
        raise CMGError(f"{spec}: n must be >= 0")
    if not 0 <= opts["seed"] <= MAX_SEED:
        raise CMGError(f"{spec}: seed must be 0 ... {MAX_SEED}")
    return opts


class SynthSource(Source):
    """Frames from the synthetic factory generator (cmg_data.synth), deterministic per index."""

    def __init__(self, spec: str) -> None:
        self.opts = parse_synth(spec)
        if self.opts["preset"] not in synth.PRESETS:
            raise CMGError(f"{spec}: unknown preset {self.opts['preset']!r} (known: {', '.join(synth.PRESETS)})")
        self.synth = synth
        self.count, self.fps = self.opts["n"], self.opts["fps"]
        self.label = f"synth:{self.opts['preset']}?seed={self.opts['seed']}"

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        o = self.opts
        frames = self.synth.stream_frames(o["preset"], seed=o["seed"], n=o["n"], start=start)
        for index, (image, info) in enumerate(frames, start):
            yield SourceItem(f"{index:06d}", self.label, lambda size, a=image: to_frame(a, size), dict(info))

    def pick(self, seqs: Iterable[int]) -> Iterator[tuple[int, SourceItem]]:
        for s in sorted(set(seqs)):
            item = next(self.items(s), None)
            if item is not None:
                yield s, item


class ArraySource(Source):
    """Frames already in memory (UINT8 [N, H, W, 3] at the model's size), cycled `count`
    times over; `cmg bench --soak` streams the test split this way without decoding files."""

    def __init__(self, frames: np.ndarray, count: int, label: str = "memory") -> None:
        if frames.ndim != 4 or not len(frames):
            raise CMGError(f"ArraySource needs frames [N, H, W, 3], got shape {list(frames.shape)}")
        self.frames, self.count, self.label = frames, int(count), label
        self.scale = batch_scale(frames)  # one range reading for the array; each frame converted when sent

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        n = len(self.frames)
        for i in range(start, self.count):
            yield SourceItem(f"{i:07d}", self.label,
                             lambda size, a=self.frames[i % n]: to_frame(frame_on_scale(a, self.scale), size))


def open_source(spec: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Source:
    """SRC (folder, glob, video file, a single image, synth:PRESET) -> Source."""
    if spec.startswith("synth:"):
        return SynthSource(spec)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", spec) and not Path(spec).exists():
        raise CMGError(f"source {spec}: URLs (rtsp://, http://) and camera devices are not read; record the camera "
                       "to a file and stream that, or score its frames from your own code (CMGClient)")
    path = Path(spec)
    if path.is_file() and path.suffix.lower() not in VIDEO_EXTS:  # a name with [ ] is that file, not a glob
        return FileSource([path], path.parent, max_pixels)
    if path.is_dir():
        paths = iter_image_paths([path])
        if not paths:
            raise CMGError(f"no images in folder {path}")
        return FileSource(paths, path, max_pixels)
    if path.is_file() and path.suffix.lower() in VIDEO_EXTS:
        return VideoSource(path)
    if is_pattern(spec):
        paths = glob_files(spec)
        if not paths:
            raise no_match(spec)
        videos = [p.name for p in paths if p.suffix.lower() in VIDEO_EXTS]
        if videos:
            raise CMGError(f"glob {spec} matches video files ({', '.join(videos[:3])}{', ...' if len(videos) > 3 else ''}): "
                           "give each video as a --source of its own")
        return FileSource(paths, None, max_pixels)
    if not path.exists():
        raise CMGError(f"source {spec}: no such file or folder")
    # every file, folder and pattern is taken above: what is left is no regular file
    raise CMGError(f"source {spec}: not a regular file (camera devices and pipes are not read; record the camera "
                   "to a file and stream that)")


