"""Where `cmg stream`'s frames come from: a folder, a glob, a video, synth:PRESET, frames in
memory (each a Source of lazily read frames in a fixed order, seq = position), or a camera."""

from __future__ import annotations

import atexit
import collections
import hashlib
import os
import re
import sys
import threading
import time
import weakref
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
    read_at: float | None = None  # a camera's frame: when it was read (monotonic), for the line's queued_ms


# -- sources ------------------------------------------------------------------------------
class Source:
    """Frames in a fixed order; `items(start)` begins at frame `start` (seq numbers are
    positions in this order), `pick(seqs)` gives chosen earlier frames again."""

    count: int | None = None  # None: unknown or endless
    fps: float | None = None  # the source's own rate, if it has one
    replayable = True  # a frame can be read again (resume checks, --retry-errors); not a camera's
    reads_in_thread = False  # reading the next item blocks (decodes, waits for a camera): off the event loop
    failure: str | None = None  # why it ended before its end (a camera lost for good): the stream aborts

    @property
    def warnings(self) -> list[str]:
        """What reading it found short of an error line (a video shorter than its header says)."""
        return self.__dict__.setdefault("_warnings", [])

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        raise NotImplementedError

    def close(self) -> None:
        """Let go of what reading holds (a camera's thread and connection)."""

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


def opencv(what: object):
    """cv2, or an error naming the source that needs it (the optional 'video' extra). OpenCV's and
    FFmpeg's own log lines are off unless asked for: a camera's reopen tries would print them
    on every try, and what failed is said in our own messages (set OPENCV_LOG_LEVEL=INFO and
    OPENCV_FFMPEG_LOGLEVEL=32 to see them)."""
    asked = "OPENCV_LOG_LEVEL" in os.environ
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    try:
        import cv2
    except ImportError as exc:
        raise CMGError(f"{what}: video and camera sources need OpenCV (pip install 'cmg-triton[video]')") from exc
    if not asked:  # also when something imported cv2 before: its level is read at import
        cv2.setLogLevel(2)  # LOG_LEVEL_ERROR
    return cv2


class VideoSource(Source):
    reads_in_thread = True  # a frame is decoded as the next item is read

    def __init__(self, path: Path) -> None:
        self.cv2, self.path = opencv(path), path
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


# -- cameras ------------------------------------------------------------------------------
# A network camera (rtsp://, http://, tcp://, udp://, rtmp://, srt://) or a camera on this
# machine (/dev/videoN, camera:N), read by OpenCV (FFmpeg, V4L2).
#
# A camera sends at its own rate whether the scorer is ready or not, so it is read from the
# moment it is opened, on a thread of its own, into a small buffer (the scorer takes frames
# from it on a worker thread of its own too: one silent camera must not hold up another's).
# When the servers score slower than the camera sends, the oldest frame waiting is dropped:
# latency and memory stay bounded, every dropped frame is counted and said, the frame ids show
# the gaps, and each line says how long its frame waited (`queued_ms`). `--fps` samples the
# camera as it is read rather than pacing the sends. A stream that stops (a switch reboots, the
# camera restarts, the server closes the connection, it stalls) is opened again with a
# backoff, and the frame numbers go on; its outages are said too. Nothing here can be read
# twice: `--resume` appends new frames, and `--retry-errors` is refused.
LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "tcp", "udp", "srt")
_CAMERA = re.compile(r"camera:(\d+)|/dev/video(\d+)")
# ://user:password@host: the password runs to the authority's last @ (FFmpeg splits there, so
# a password with an @ in it works as typed); the authority ends at the first / ? or #
_USERINFO = re.compile(r"(://[^/?#:\s]*):[^/?#\s]*@")
# a query value whose key names a secret (pwd, pw, loginpas, passphrase, access_token, apikey,
# X-Amz-Signature ..., and the bare p= of some camera CGIs)
_SECRET_PARAM = re.compile(r"([?&;](?:[^=&;#\s]*(?:pas|pw|token|key|secret|sig|auth|cred)[^=&;#\s]*|p)=)[^&;#\s]*",
                           re.IGNORECASE)
BUFFER_FRAMES = 8  # read, not yet sent: a quarter second of a 30 fps camera before the oldest is dropped
BAD_READS = 5  # reads in a row that fail before the read timeout (damaged frames) before it counts as lost


@dataclass(frozen=True)
class LiveOptions:
    """How a live source is read: reopening a lost stream, how long a silent one is waited for,
    the buffer, and the rate it is sampled at (None: every frame)."""

    reconnects: int = 30  # reopen tries in a row before the stream ends (-1: forever)
    backoff_max_s: float = 5.0  # longest wait between tries (the first is at once, then 0.5 s, doubling)
    open_timeout_s: float = 10.0
    read_timeout_s: float = 5.0  # a stream silent this long is lost (FFmpeg's own wait is forever)
    buffer: int = BUFFER_FRAMES
    fps: float | None = None  # keep one frame per 1/fps s of the camera's time (--fps)


def is_live(spec: str) -> bool:
    """A camera: a URL of a streaming scheme, /dev/videoN or camera:N."""
    scheme = spec.partition("://")[0].lower() if "://" in spec else ""
    return scheme in LIVE_SCHEMES or _CAMERA.fullmatch(spec) is not None


def redact(text: str) -> str:
    """`text` without the passwords a camera URL in it may hold (user:password@, and query
    values such as pwd= or token=): it goes into every output line, log and message."""
    return _SECRET_PARAM.sub(r"\1***", _USERINFO.sub(r"\1:***@", text))


def live_name(spec: str) -> str:
    """A short name for ids and file names: the camera's index, or the URL's host, port, last
    path part and a hash of its query (two channels of one recorder differ only there)."""
    m = _CAMERA.fullmatch(spec)
    if m:
        return f"camera{m.group(1) or m.group(2)}"
    rest = spec.partition("://")[2]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    rest = rest[len(authority):]
    host_port = authority.rpartition("@")[2]
    path, _, query = rest.partition("#")[0].partition("?")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{host_port.replace(':', '_')}_{path.rstrip('/').rpartition('/')[2]}")
    name = name.strip("_.")[:72] or "camera"
    # the query only as a short hash of its redacted form (a hash of a secret can be searched
    # for): two channels of one recorder differ there
    return f"{name}_{hashlib.sha256(redact('?' + query).encode()).hexdigest()[:6]}" if query else name


class LiveSource(Source):
    """Frames as a camera sends them, numbered in the order read (`NAME#N`), each line with the
    wall-clock time it was read (`captured_at`, seconds since the epoch)."""

    replayable = False
    reads_in_thread = True

    def __init__(self, spec: str, options: LiveOptions | None = None) -> None:
        self.spec, self.options = spec, options or LiveOptions()
        self.label, self.name = redact(spec), live_name(spec)
        self.cv2 = opencv(self.label)
        m = _CAMERA.fullmatch(spec)
        self.device = int(m.group(1) or m.group(2)) if m else None
        self._cond = threading.Condition()
        self._frames: collections.deque[tuple[int, np.ndarray, float, float, float | None]] = collections.deque()
        self._stop = threading.Event()
        self._done = False
        self._offset: int | None = None  # where items() numbers from (set when it is first read)
        self.dropped = 0  # by the buffer, all told
        self._dropped_first: int | None = None  # ... when the first frame was taken
        self._dropped_sent = 0  # ... between the first frame taken and the last (the gaps in the lines' ids)
        self.outage_count = 0
        self.outages: list[tuple[int, float]] = []  # the first 5: (frames read before it, seconds without frames)
        self._step, self._back_at = 0, float("-inf")  # the last reopen's backoff step, and when it came back
        # Opened now, before any output is opened: a wrong address fails like a missing file.
        how = ("cannot be opened (no such device, or busy)" if self.device is not None else
               f"cannot be opened (wrong address, camera unreachable or busy, or no stream OpenCV's FFmpeg can "
               f"read within {self.options.open_timeout_s:g} s)")
        cap = self._open()
        if cap is None:
            raise CMGError(f"live source {self.label}: {how}")
        declared = cap.get(self.cv2.CAP_PROP_FRAME_COUNT)
        if self.device is None and np.isfinite(declared) and declared > 0:
            cap.release()
            raise CMGError(f"live source {self.label}: a recorded video ({int(declared)} frames), not a camera's "
                           "stream: download it and stream the file (a file is read whole, at its own pace)")
        ok, bgr = cap.read()
        if not ok:
            cap.release()
            waited = (f"{self.options.read_timeout_s:g} s (--camera-timeout)" if self.device is None
                      else "V4L2's wait (OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT, 10 s unless set)")
            raise CMGError(f"live source {self.label}: opened, but no frame came within {waited}")
        # Read from now on: what the camera sends while the servers are greeted is the buffer's,
        # and each frame's time is when it was read, not when the scorer got to it.
        self._thread = threading.Thread(target=self._read, args=(cap, bgr), name=f"live {self.name}", daemon=True)
        _READERS.add(self)
        self._thread.start()

    def _open(self):
        """A capture that is open, or None."""
        cv2, o = self.cv2, self.options
        if self.device is not None:  # V4L2 by name on Linux: OpenCV's other backends say their own errors
            cap = cv2.VideoCapture(self.device, cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY)
        else:
            cap = cv2.VideoCapture(self.spec, cv2.CAP_FFMPEG, [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(o.open_timeout_s * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(o.read_timeout_s * 1000)])
        if cap.isOpened():
            return cap
        cap.release()
        return None

    # -- the reading thread ------------------------------------------------------------------
    def _keep(self, read_at: float, due: float | None) -> tuple[bool, float | None]:
        """--fps: (keep this frame?, when the next one is due), one frame per 1/fps s of reading
        time (monotonic: a clock step must not silence the camera); a quarter step early counts
        as on time."""
        if self.options.fps is None:
            return True, None
        step = 1.0 / self.options.fps
        if due is not None and read_at < due - 0.25 * step:
            return False, due
        # the schedule goes on from this frame's slot, or from the frame itself after a gap
        return True, (due + step) if due is not None and read_at - due < step else read_at + step

    def _put(self, n: int, bgr: np.ndarray, captured: float, read_at: float, after_outage_s: float | None) -> None:
        rgb = np.ascontiguousarray(bgr[..., ::-1])
        with self._cond:
            if len(self._frames) >= max(1, self.options.buffer):
                self._frames.popleft()
                self.dropped += 1
            self._frames.append((n, rgb, captured, read_at, after_outage_s))
            self._cond.notify()

    def _read(self, cap, bgr) -> None:
        n, after, due, bad = 0, None, None, 0
        captured, read_at = time.time(), time.monotonic()
        stalled = 0.8 * self.options.read_timeout_s  # a failed read this slow is a silent stream, not a bad frame
        try:
            while not self._stop.is_set():
                if bgr is not None:
                    keep, due = self._keep(read_at, due)
                    if keep:
                        self._put(n, bgr, captured, read_at, after)
                        n, after = n + 1, None
                    bgr = None
                t0 = time.monotonic()
                ok, frame = cap.read()
                if ok:
                    bgr, captured, read_at, bad = frame, time.time(), time.monotonic(), 0
                    continue
                bad += 1
                if time.monotonic() - t0 < stalled and bad < BAD_READS:  # a frame it could not decode: read on
                    continue
                cap.release()
                cap, bgr, after = self._reopen(n)
                if cap is None:
                    return
                captured, read_at, bad = time.time(), time.monotonic(), 0
        except Exception as exc:  # noqa: BLE001 - said as the stream's end, not a thread's traceback
            self.failure = (f"live source {self.label}: reading failed after frame {self._number(n - 1)}: "
                            f"{type(exc).__name__}: {exc}")
        finally:
            if cap is not None:
                cap.release()
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _reopen(self, n: int):
        """(capture, its first frame, seconds without frames) once the stream is back; (None, ...)
        when `--reconnects` tries are spent or the source is closed. The first try is at once; a
        stream that dies again within 5 s of coming back goes on with the backoff it had (a
        one-frame URL would be asked a thousand times a second), its tries counted afresh."""
        o, lost = self.options, time.monotonic()
        tries, step = 0, (self._step if lost - self._back_at < 5.0 else 0)
        while not self._stop.is_set():
            if 0 <= o.reconnects <= tries:
                self.failure = (f"live source {self.label} lost after frame {self._number(n - 1)}; not back after "
                                f"{tries} tries in {time.monotonic() - lost:.0f} s (--reconnects)")
                return None, None, None
            if step and self._stop.wait(min(o.backoff_max_s, 0.5 * 2 ** (step - 1))):
                break
            tries, step = tries + 1, step + 1
            cap = self._open()
            if cap is None:
                continue
            if self._stop.is_set():  # closed during the open: no read that could outlive the interpreter
                cap.release()
                break
            ok, frame = cap.read()
            if ok:
                gap = time.monotonic() - lost
                self._step, self._back_at = step, time.monotonic()
                self.outage_count += 1
                if len(self.outages) < 5:
                    self.outages.append((n, gap))
                return cap, frame, round(gap, 3)
            cap.release()
        return None, None, None

    def _number(self, n: int) -> int:
        """The id's number of the n-th frame read (items() may number from a resumed file's next)."""
        return n + (self._offset or 0)

    # -- Source ------------------------------------------------------------------------------
    def items(self, start: int = 0) -> Iterator[SourceItem]:
        """Frames as they come, numbered from `start` (a camera has nothing to skip), until the
        source is closed or lost for good."""
        if self._offset is not None:
            raise CMGError(f"live source {self.label} is read once")
        self._offset = start
        while True:
            with self._cond:
                while not self._frames and not self._done and not self._stop.is_set():
                    self._cond.wait(0.1)
                if not self._frames:
                    return
                n, rgb, captured, read_at, after = self._frames.popleft()
                if self._dropped_first is None:  # drops before the first frame taken are nobody's gap either
                    self._dropped_first = self.dropped
                self._dropped_sent = self.dropped - self._dropped_first  # nor those after the last one
            extra = {"captured_at": round(captured, 3)}
            if after is not None:
                extra["after_outage_s"] = after
            yield SourceItem(f"{self.name}#{n + start}", self.label, lambda size, a=rgb: to_frame(a, size), extra,
                             read_at)

    @property
    def warnings(self) -> list[str]:
        said = []
        if self._dropped_sent:
            said.append(f"live source {self.label}: {self._dropped_sent} frames dropped unsent (the servers scored "
                        "slower than the camera sent; the frame ids show the gaps)")
        if self.outage_count:
            times = "once" if self.outage_count == 1 else f"{self.outage_count} times"
            gaps = ", ".join(f"after frame {self._number(n - 1)} for {s:.1f} s" for n, s in self.outages)
            said.append(f"live source {self.label}: lost {times} and reopened "
                        f"({gaps}{', ...' if self.outage_count > len(self.outages) else ''})")
        return said

    def close(self) -> None:
        """Stop reading; the thread lets go of the camera when its current read returns (not
        waited for here, so many cameras close at once; at exit, `_join_readers` waits)."""
        self._stop.set()
        with self._cond:
            self._frames.clear()
            self._cond.notify_all()


_READERS: weakref.WeakSet[LiveSource] = weakref.WeakSet()


@atexit.register
def _join_readers() -> None:
    """Before the interpreter tears down: a reader thread that came back from OpenCV's C++ read
    while it did was killed there and aborted the process (SIGABRT, exit 134) after the stream
    had ended well. Every reader is stopped, then each joined against one deadline."""
    readers = list(_READERS)
    for source in readers:
        source.close()
    if not any(r._thread.is_alive() for r in readers):
        return
    # a reader may be in a reopen's open and then its first read, which nothing interrupts;
    # a device's read waits V4L2's own 10 s
    longest = max(r.options.open_timeout_s + max(r.options.read_timeout_s, 10.0 if r.device is not None else 0.0)
                  for r in readers)
    deadline = time.monotonic() + longest + 1.0
    for source in readers:
        source._thread.join(max(0.0, min(0.5, deadline - time.monotonic())))
    if any(r._thread.is_alive() for r in readers):
        print(f"cmg: waiting up to {longest + 1:.0f} s for cameras to let go of their connections",
              file=sys.stderr)
        for source in readers:
            source._thread.join(max(0.0, deadline - time.monotonic()))


def open_source(spec: str, max_pixels: int = DEFAULT_MAX_PIXELS, live: LiveOptions | None = None) -> Source:
    """SRC (folder, glob, video file, a single image, synth:PRESET, a camera's URL or device) -> Source."""
    if spec.startswith("synth:"):
        return SynthSource(spec)
    if is_live(spec) and not Path(spec).is_file():
        return LiveSource(spec, live)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", spec) and not Path(spec).exists():
        raise CMGError(f"source {redact(spec)}: not a scheme a camera streams over (read: "
                       f"{', '.join(s + '://' for s in LIVE_SCHEMES)}, /dev/videoN and camera:N)")
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
        raise CMGError(f"source {redact(spec)}: no such file or folder")
    # every file, folder and pattern is taken above: what is left is no regular file
    raise CMGError(f"source {redact(spec)}: not a regular file (pipes are not read; a camera is /dev/videoN or camera:N)")


