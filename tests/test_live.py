"""Cameras as `cmg stream` sources: a real MJPEG-over-HTTP camera (as IP cameras serve it) read
by OpenCV's FFmpeg, which stops, stalls, comes back, or sends faster than it is read."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from cmg.errors import CMGError  # noqa: E402
from cmg_clients.planning import plan_sources, source_name  # noqa: E402
from cmg_clients.scorer import StreamSummary  # noqa: E402
from cmg_clients.sources import LiveOptions, LiveSource, is_live, open_source, redact  # noqa: E402
from cmg_clients.stream import StreamOptions, run_stream  # noqa: E402

QUICK = LiveOptions(reconnects=20, backoff_max_s=0.2, open_timeout_s=2.0, read_timeout_s=1.0)


class Camera:
    """An MJPEG camera on 127.0.0.1: frame i is grey level i % 250 (its number, read back
    from the pixels); `stall` keeps the connection open and sends nothing."""

    def __init__(self, fps: float = 50.0, size: int = 32, corrupt_every: int = 0) -> None:
        self.fps, self.size, self.stall, self.sent = fps, size, False, 0
        self.corrupt_every = corrupt_every  # every n-th JPEG cut short (a damaged frame)
        self.server: ThreadingHTTPServer | None = None
        self.port = 0

    def start(self) -> Camera:
        cam = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    while cam.server is not None:
                        if cam.stall:
                            time.sleep(0.05)
                            continue
                        img = np.full((cam.size, cam.size, 3), cam.sent % 250, np.uint8)
                        jpg = cv2.imencode(".jpg", img)[1].tobytes()
                        if cam.corrupt_every and cam.sent % cam.corrupt_every == cam.corrupt_every - 1:
                            jpg = jpg[: len(jpg) // 3]
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(jpg) + jpg + b"\r\n")
                        cam.sent += 1
                        time.sleep(1.0 / cam.fps)
                except OSError:  # the reader went away
                    pass

            def log_message(self, *args) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/cam.mjpg"


@pytest.fixture
def camera() -> Iterator[Camera]:
    cam = Camera().start()
    yield cam
    cam.stop()


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _level(item) -> int:
    return int(item.load((8, 8)).mean().round())


def test_camera_specs_are_named_without_their_password():
    assert is_live("rtsp://10.0.0.9/stream?channel=1") and is_live("camera:0") and is_live("/dev/video2")
    assert not is_live("cam.mp4") and not is_live("synth:tiny") and not is_live("ftp://host/x")
    assert redact("rtsp://admin:s3cret@10.0.0.9:554/live") == "rtsp://admin:***@10.0.0.9:554/live"
    assert redact("rtsp://10.0.0.9/live") == "rtsp://10.0.0.9/live"
    assert source_name("rtsp://admin:s3cret@10.0.0.9:554/h264/ch1") == ("10.0.0.9_554_ch1", "rtsp://admin:s3cret@10.0.0.9:554/h264/ch1")
    # query secrets (Foscam-style), and two channels of one recorder get two names
    assert redact("http://h/videostream.cgi?user=admin&pwd=s3cret&token=t0k") == "http://h/videostream.cgi?user=admin&pwd=***&token=***"
    dahua = "rtsp://admin:s3cret@10.0.0.9:554/cam/realmonitor?channel={}&subtype=0"
    assert source_name(dahua.format(1))[0].startswith("10.0.0.9_554_realmonitor_")
    assert source_name(dahua.format(1))[0] != source_name(dahua.format(2))[0]
    assert redact("rtsp://admin:pw@[fe80::1/live") == "rtsp://admin:***@[fe80::1/live"  # no URL parser to raise
    # an @ in the password (FFmpeg splits at the last), SRT's passphrase, token-like keys, and no
    # query value in a name (a file name and every frame id): a hash of the query instead
    assert redact("rtsp://admin:p@ss@10.0.0.9/live") == "rtsp://admin:***@10.0.0.9/live"
    srt = "srt://10.0.0.9:9000?mode=caller&passphrase=TopSecret123"
    assert redact(srt) == "srt://10.0.0.9:9000?mode=caller&passphrase=***"
    assert "TopSecret" not in source_name(srt)[0] and source_name(srt)[0].startswith("10.0.0.9_9000_")
    cloud = "https://h/x.mjpg?access_token=a1&X-Amz-Signature=b2&SessionToken=c3&apikey=d4&channel=1"
    assert redact(cloud) == "https://h/x.mjpg?access_token=***&X-Amz-Signature=***&SessionToken=***&apikey=***&channel=1"
    assert len(source_name(f"rtsp://h/ch1?SessionToken={'x' * 400}")[0]) <= 80
    # a user name with an @, the CGI forms of Foscam clones, and a hash that does not depend on
    # the secret (a 24-bit hash of a 4-digit PIN gives the PIN back)
    assert redact("rtsp://ops@corp.com:s3cret@10.0.0.9/live") == "rtsp://ops@corp.com:***@10.0.0.9/live"
    assert redact("http://h/c.cgi?loginuse=admin&loginpas=1&pw=2&p=3&channel=4") == \
        "http://h/c.cgi?loginuse=admin&loginpas=***&pw=***&p=***&channel=4"
    assert source_name("http://h/x?user=admin&pwd=4821")[0] == source_name("http://h/x?user=admin&pwd=1234")[0]
    long_host = f"rtsp://{'h' * 100}/ch1?channel="
    assert source_name(long_host + "1")[0] != source_name(long_host + "2")[0]  # the hash survives the cut
    assert source_name("rtsp://10.0.0.9/live?notify=ops@corp.com")[0].startswith("10.0.0.9_live_")
    assert source_name("line2=rtsp://10.0.0.9/x?a=b")[0] == "line2"
    assert source_name("camera:1")[0] == "camera1"
    assert StreamOptions(url="u", source="rtsp://a:s3cret@h/x", out=Path("o")).source_name == "rtsp://a:***@h/x"


def test_a_camera_that_cannot_be_opened_is_refused_before_any_output(tmp_path):
    with pytest.raises(CMGError, match=r"live source http://u:\*\*\*@127\.0\.0\.1:9/x: cannot be opened") as exc:
        open_source("http://u:s3cret@127.0.0.1:9/x", live=QUICK)
    assert "s3cret" not in str(exc.value)
    with pytest.raises(CMGError, match="live source camera:97: cannot be opened"):
        open_source("camera:97", live=QUICK)
    with pytest.raises(CMGError, match=r"not a scheme a camera streams over \(read: rtsp://"):
        open_source("ftp://u:s3cret@host/x")
    for spec in ("cam 1=rtsp://admin:s3cret@10.0.0.9/live", "ftp://u:s3cret@host/x"):  # a mistyped NAME=
        with pytest.raises(CMGError) as exc:
            open_source(spec)
        assert "s3cret" not in str(exc.value)
    with pytest.raises(CMGError) as exc:  # two sources that would share a file
        plan_sources(["rtsp://admin:s3cret@10.0.0.9/live", "rtsp://admin:s3cret@10.0.0.9/live"], tmp_path / "o")
    assert "would both write 10.0.0.9_live.jsonl" in str(exc.value) and "s3cret" not in str(exc.value)


def test_frames_come_in_order_with_their_time_and_close_stops_the_reader(camera):
    source = open_source(camera.url, live=QUICK)
    assert isinstance(source, LiveSource) and source.count is None and source.fps is None
    items = []
    for item in source.items(0):
        items.append(item)
        if len(items) == 10:
            break
    assert [i.frame_id for i in items] == [f"127.0.0.1_{camera.port}_cam.mjpg#{n}" for n in range(10)]
    levels = [_level(i) for i in items]
    assert levels == sorted(levels) and len(set(levels)) == 10  # the camera's own order, each frame once
    times = [i.extra["captured_at"] for i in items]
    assert times == sorted(times) and abs(times[-1] - time.time()) < 5
    assert all(i.source == camera.url for i in items)
    t0 = time.monotonic()
    source.close()
    source._thread.join(2.0)
    assert time.monotonic() - t0 < 1.5 and not source._thread.is_alive()
    assert source.warnings == [] and source.failure is None


def test_a_camera_is_read_from_when_it_is_opened_with_each_frames_own_time(camera):
    """The frames sent while the servers are greeted are the buffer's, stamped when read: the
    first frame was read at open but stamped when the scorer took it, 3 s late."""
    source = open_source(camera.url, live=LiveOptions(buffer=64, read_timeout_s=1.0))
    opened = time.time()
    time.sleep(1.0)
    try:
        first = list(itertools.islice(source.items(0), 10))
    finally:
        source.close()
    times = [i.extra["captured_at"] for i in first]
    assert abs(times[0] - opened) < 0.3  # read then, 1 s before it was taken
    assert 0.1 < times[-1] - times[0] < 0.5 and source.dropped == 0  # 10 frames of a 50 frames/s camera
    small = open_source(camera.url, live=LiveOptions(buffer=4, read_timeout_s=1.0))
    time.sleep(1.0)
    small.close()
    assert small.dropped > 20  # what a 4-frame buffer could not hold meanwhile: counted


def test_fps_samples_the_camera_and_a_damaged_frame_is_not_an_outage(camera):
    """--fps keeps one frame per 1/fps s as the camera is read (nothing dropped, nothing
    queued); a JPEG cut short is skipped, not a reason to reopen the stream."""
    camera.corrupt_every = 10
    source = open_source(camera.url, live=LiveOptions(fps=10.0, read_timeout_s=1.0))
    got = []
    try:
        for item in source.items(0):
            got.append(item.extra["captured_at"])
            if len(got) == 12:
                break
    finally:
        source.close()
    gaps = np.diff(got)
    assert 0.07 < np.median(gaps) < 0.13, gaps  # 10 frames/s of a 50 frames/s camera
    assert source.dropped == 0 and source.outages == [] and source.warnings == []


def test_a_video_file_over_http_is_refused_as_not_a_camera(tmp_path):
    """Read as a camera, its end was an outage: replayed forever, most frames dropped."""
    import functools

    writer = cv2.VideoWriter(str(tmp_path / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
    for i in range(20):
        writer.write(np.full((32, 32, 3), i * 10, np.uint8))
    writer.release()
    handler = functools.partial(_QuietFiles, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(CMGError, match=r"a recorded video \(20 frames\), not a camera's stream: download it"):
            open_source(f"http://127.0.0.1:{server.server_address[1]}/clip.avi", live=QUICK)
    finally:
        server.shutdown()
        server.server_close()


def test_a_reader_that_fails_ends_the_source_with_its_reason(camera, monkeypatch):
    source = open_source(camera.url, live=QUICK)
    calls = []

    def fail(*args):
        calls.append(1)
        if len(calls) > 3:
            raise MemoryError("no room for the frame")
        return LiveSource._put(source, *args)

    monkeypatch.setattr(source, "_put", fail)
    got = list(source.items(0))  # ends: no endless wait for frames that will not come
    source.close()
    assert got and len(calls) == 4
    assert source.failure is not None and "reading failed after frame" in source.failure
    assert "MemoryError: no room for the frame" in source.failure


def test_a_camera_that_stops_or_stalls_is_reopened_and_its_numbers_go_on(camera):
    source = open_source(camera.url, live=QUICK)
    got = []
    try:
        for item in source.items(0):
            got.append(item)
            if len(got) == 5:  # the camera restarts: the connection is closed, the port opens again
                camera.stop()
                time.sleep(0.5)
                camera.start()
            if len(got) == 15:  # it stalls with the connection open: read past the read timeout
                camera.stall = True
                threading.Timer(1.5, setattr, (camera, "stall", False)).start()
            if len(got) == 25:
                break
    finally:
        source.close()
    assert [i.frame_id.rpartition("#")[2] for i in got] == [str(n) for n in range(25)]
    back = [i for i in got if "after_outage_s" in i.extra]
    assert len(back) == 2 and all(i.extra["after_outage_s"] >= 0.5 for i in back)
    assert len(source.outages) == 2 and source.failure is None
    assert re.search(r"lost 2 times and reopened \(after frame \d+ for \d+\.\d s, after frame \d+ for", source.warnings[0])


def test_a_camera_gone_for_good_ends_the_source_with_its_reason(camera):
    source = open_source(camera.url, live=LiveOptions(reconnects=2, backoff_max_s=0.1, open_timeout_s=1.0,
                                                         read_timeout_s=1.0))
    got = []
    for item in source.items(0):
        got.append(item)
        if len(got) == 3:
            camera.stop()
    source.close()
    assert len(got) >= 3
    assert re.fullmatch(rf"live source {re.escape(camera.url)} lost after frame {len(got) - 1}; not back after 2 "
                        r"tries in \d+ s \(--reconnects\)", source.failure)


def test_a_reader_slower_than_the_camera_drops_the_oldest_frames_and_says_so(camera):
    source = open_source(camera.url, live=LiveOptions(buffer=2, read_timeout_s=1.0))
    got = []
    try:
        for item in source.items(0):
            got.append(int(item.frame_id.rpartition("#")[2]))
            time.sleep(0.1)  # 10 frames/s read, 50 sent
            if len(got) == 8:
                break
    finally:
        source.close()
    assert got == sorted(got) and got[-1] - got[0] > 20  # the freshest frames, with the gaps in their ids
    assert source.dropped >= 20
    gaps = got[-1] - got[0] + 1 - len(got)  # what the lines' ids miss: what the warning counts
    assert f"live source {camera.url}: {gaps} frames dropped unsent" in source.warnings[0]


@pytest.mark.slow
def test_stream_scores_a_camera_and_resume_appends_without_repeating_an_id(triton, camera, tmp_path):
    out = tmp_path / "cam.jsonl"
    opts = dict(url=triton.grpc_url, source=camera.url, out=out, progress=False, live=QUICK)
    first = run_stream(StreamOptions(**opts, limit=12))
    lines = [json.loads(s) for s in out.read_text().splitlines()]
    assert first.frames == first.results == 12 and first.aborted is None
    assert [x["seq"] for x in lines] == list(range(12))
    assert all("score" in x and "captured_at" in x and x["queued_ms"] >= 0 for x in lines)
    second = run_stream(StreamOptions(**opts, limit=20, resume=True))
    lines = [json.loads(s) for s in out.read_text().splitlines()]
    assert second.skipped == 12 and second.frames == 8
    assert [x["seq"] for x in lines] == list(range(20))
    numbers = [int(x["frame_id"].rpartition("#")[2]) for x in lines]
    assert numbers == sorted(set(numbers))  # the resumed run numbers after the last id: none twice
    with pytest.raises(CMGError, match="cannot send them again"):
        with out.open("a") as fh:
            fh.write(json.dumps({"seq": 20, "frame_id": "x#99", "source": camera.url, "error": "e"}) + "\n")
        run_stream(StreamOptions(**opts, resume=True, retry_errors=True))
    other = Camera().start()
    try:
        with pytest.raises(CMGError, match="its lines come from source"):
            run_stream(StreamOptions(**{**opts, "source": other.url}, resume=True, limit=30))
    finally:
        other.stop()


@pytest.mark.slow
def test_a_camera_lost_for_good_aborts_the_stream_with_every_line_kept(triton, camera, tmp_path):
    out = tmp_path / "cam.jsonl"
    summary = StreamSummary(out=str(out))
    threading.Timer(1.0, camera.stop).start()
    run_stream(StreamOptions(url=triton.grpc_url, source=camera.url, out=out, progress=False,
                             live=LiveOptions(reconnects=2, backoff_max_s=0.1, open_timeout_s=1.0,
                                              read_timeout_s=1.0)), summary)
    lines = out.read_text().splitlines()
    assert summary.frames == len(lines) > 5 and summary.results == summary.frames
    assert summary.aborted is not None and "not back after 2 tries" in summary.aborted
    assert "ABORTED: live source" in summary.line()


@pytest.mark.slow
def test_silent_cameras_do_not_hold_up_the_others(triton, tmp_path, monkeypatch):
    """Six of seven cameras stall: each waits for its next frame on a thread of its own. On the
    shared worker pool (6 threads on 2 cores) they had held every thread, and the seventh
    camera's frames could not be loaded: no line for 14 s, 170 frames dropped."""
    from cmg_clients.stream import run_streams

    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # asyncio's shared pool: 6 threads, as on the 2-core CI
    monkeypatch.setattr(os, "process_cpu_count", lambda: 2, raising=False)  # what Python 3.13 sizes it by
    cams = [Camera(fps=10).start() for _ in range(7)]

    def stall_the_others(line: dict) -> None:  # once the seventh camera streams: the others go silent for 4 s
        if line["seq"] == 5:
            for c in cams[:6]:
                c.stall = True
            threading.Timer(4.0, lambda: [setattr(c, "stall", False) for c in cams[:6]]).start()

    try:
        live = LiveOptions(read_timeout_s=20.0, buffer=64)
        options = [StreamOptions(url=triton.grpc_url, source=c.url, out=tmp_path / f"c{i}.jsonl", progress=False,
                                 live=live, limit=80 if i < 6 else 70, name=f"c{i}",
                                 on_line=stall_the_others if i == 6 else None) for i, c in enumerate(cams)]
        summaries, _ = run_streams([triton.grpc_url], options)
    finally:
        for c in cams:
            c.stop()
    healthy = [json.loads(s) for s in (tmp_path / "c6.jsonl").read_text().splitlines()]
    assert len(healthy) == 70 and summaries[6].aborted is None
    sent = np.array([x["captured_at"] + x["queued_ms"] / 1000 for x in healthy])
    assert np.diff(sent).max() < 1.5, np.diff(sent)  # sent as it came, through the others' stall (4 s before)
    assert summaries[6].warnings == []  # nothing dropped


def test_a_stream_that_ends_while_the_camera_sends_exits_cleanly(camera, tmp_path):
    """The reader thread, back from OpenCV's C++ read while the interpreter tore down, was killed
    there: SIGABRT, exit 134, in every run of a stream that had ended well."""
    script = tmp_path / "take5.py"
    script.write_text(
        "import sys, itertools\n"
        "import tritonclient.grpc.aio  # noqa: F401 - what `cmg stream` imports\n"
        "from cmg_clients.sources import open_source\n"
        "source = open_source(sys.argv[1])\n"
        "print(len(list(itertools.islice(source.items(0), 5))))\n"
        "source.close()\n")
    for _ in range(3):
        proc = subprocess.run([sys.executable, str(script), camera.url], capture_output=True, text=True, timeout=60)
        assert (proc.returncode, proc.stdout.strip()) == (0, "5"), proc.stderr[-2000:]


@pytest.mark.slow
def test_a_stream_closed_while_its_camera_is_being_reopened_exits_cleanly(tmp_path):
    """The exit join waited the read timeout and 1 s; a reader in a reopen's open (here a
    listener that accepts and says nothing, as an unreachable camera makes FFmpeg wait) came
    back after it: SIGABRT again."""
    script = tmp_path / "reopen.py"
    script.write_text(
        "import itertools, socket, sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_live import Camera\n"
        "from cmg_clients.sources import LiveOptions, open_source\n"
        "cam = Camera().start()\n"
        "source = open_source(cam.url, live=LiveOptions(open_timeout_s=3.0, read_timeout_s=1.0))\n"
        "print(len(list(itertools.islice(source.items(0), 5))))\n"
        "port = cam.port\n"
        "cam.stop()\n"
        "silent = socket.socket()\n"
        "silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "silent.bind(('127.0.0.1', port))\n"
        "silent.listen()\n"
        "time.sleep(1.5)  # the stream is lost; its reopen waits in the open\n"
        "source.close()\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, "5"), proc.stderr[-2000:]
    assert time.monotonic() - t0 < 20
