"""`cmg stream`: exactly one line per frame, in order, through a server kill and restart."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmg.errors import CMGError
from cmg_clients.output import read_existing
from cmg_clients.sources import open_source, parse_synth
from cmg_clients.stream import StreamOptions, run_stream


def _write_frames(folder: Path, n: int, size: int = 16, seed: int = 0) -> list[Path]:
    """Tiny PNGs (the client resizes them to the contract's frame)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"f{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _lines(out: Path) -> list[dict]:
    return [json.loads(s) for s in out.read_text().splitlines()]


# -- no server needed -------------------------------------------------------------------
def test_read_existing_truncates_torn_line(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"seq": 0, "frame_id": "a"}\n{"seq": 1, "frame_id": "b"}\n{"seq": 2, "fr')
    assert read_existing(out) == (2, "b")
    assert out.read_text().endswith('"b"}\n')


def test_read_existing_rejects_foreign_file(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"seq": 0}\n{"seq": 2}\n')
    with pytest.raises(CMGError, match="seq 2 where 1"):
        read_existing(out)


def test_sources(tmp_path):
    _write_frames(tmp_path / "d", 3)
    src = open_source(str(tmp_path / "d"))
    assert src.count == 3 and src.fps is None
    assert [i.frame_id for i in src.items()] == ["f0000.png", "f0001.png", "f0002.png"]
    assert [i.frame_id for i in src.items(1)] == ["f0001.png", "f0002.png"]
    assert [(s, i.frame_id) for s, i in src.pick([2, 0])] == [(0, "f0000.png"), (2, "f0002.png")]
    assert [s for s, _ in src.pick([0, 3, 99, -1])] == [0]  # a resumed file's seqs past the folder's end
    globbed = open_source(str(tmp_path / "d" / "f000[21].png"))
    assert [Path(i.frame_id).name for i in globbed.items()] == ["f0001.png", "f0002.png"]  # sorted, as listed
    with pytest.raises(CMGError, match="matches no files"):
        open_source(str(tmp_path / "*.jpg"))
    (tmp_path / "d" / "f0000.json").write_text("{}")  # a sidecar beside each frame is no frame
    (tmp_path / "d" / "f0009.png").symlink_to(tmp_path / "gone.png")  # kept: its error line says so
    everything = open_source(str(tmp_path / "d" / "*"))
    assert [Path(i.frame_id).name for i in everything.items()] == ["f0000.png", "f0001.png", "f0002.png",
                                                                   "f0009.png"]
    (tmp_path / "d" / "f0009.png").unlink()
    (tmp_path / "d" / "f0000.png").rename(tmp_path / "d" / "f0000.jfif")  # a suffix the pattern spells
    assert [Path(i.frame_id).name for i in open_source(str(tmp_path / "d" / "*.jfif")).items()] == ["f0000.jfif"]
    with pytest.raises(CMGError, match="no such file or folder"):
        open_source(str(tmp_path / "nothing"))
    assert parse_synth("synth:tiny?fps=5&seed=3&n=10") == {"preset": "tiny", "fps": 5.0, "seed": 3, "n": 10}
    with pytest.raises(CMGError, match="unknown parameter"):
        parse_synth("synth:tiny?speed=3")


def test_a_glob_in_a_folder_named_like_a_pattern_and_one_with_an_equals_sign(tmp_path, monkeypatch):
    """`cam [1]/*.png`: the folder is that folder; `line=2/*.png` is a glob, not NAME=SRC."""
    from cmg_clients.planning import source_name

    _write_frames(tmp_path / "cam [1]", 2)
    _write_frames(tmp_path / "line=2", 2)
    monkeypatch.chdir(tmp_path)
    assert [Path(i.frame_id).name for i in open_source("cam [1]/*.png").items()] == ["f0000.png", "f0001.png"]
    assert source_name("line=2/*.png")[1] == "line=2/*.png"  # the whole spec is the source
    assert source_name("cam1=synth:tiny") == ("cam1", "synth:tiny")


def test_a_file_named_like_a_glob_is_that_file(tmp_path):
    """`cam[1].png` had been read as the glob `cam1.png` and scored another file."""
    a, b = _write_frames(tmp_path / "d", 2)
    named = a.rename(tmp_path / "d" / "cam[1].png")
    b.rename(tmp_path / "d" / "cam1.png")
    src = open_source(str(named))
    assert [i.frame_id for i in src.items()] == ["cam[1].png"]


def test_symlinked_folders_are_followed_once_and_a_dangling_image_link_is_kept(tmp_path):
    """rglob had skipped linked folders and dropped dangling links silently (no error line)."""
    from cmg_clients.client import iter_image_paths

    real = tmp_path / "real"
    _write_frames(real, 2)
    line = tmp_path / "line"
    _write_frames(line, 1)
    (line / "linked").symlink_to(real)
    (line / "loop").symlink_to(line)
    (line / "gone.png").symlink_to(tmp_path / "nowhere.png")
    got = [p.relative_to(line).as_posix() for p in iter_image_paths([line])]
    assert got == ["f0000.png", "gone.png", "linked/f0000.png", "linked/f0001.png"]


def test_a_recursive_glob_reads_each_real_folder_once_as_the_folder_walk_does(tmp_path, monkeypatch):
    """`'line/**/*.png'` through two links back to a parent: glob followed them into the loop
    (exponentially many paths: `cmg infer` and `cmg stream` hung expanding the pattern); with
    one link it named the same frame 41 times. Without links it matches what glob matches."""
    import glob
    import os

    from cmg_clients.client import glob_files, iter_image_paths

    line = tmp_path / "line"
    _write_frames(line / "a", 1)
    _write_frames(line / "b" / "c", 1)
    _write_frames(line / ".hidden", 1)
    monkeypatch.chdir(tmp_path)
    plain = ["line/**/*.png", "line/*/**/*.png", "**/*.png", "line/**/c/*", "line/**/.hidden/*.png"]
    expected = {pat: sorted(Path(p) for p in glob.glob(pat, recursive=True) if not os.path.isdir(p)) for pat in plain}
    (line / "a" / "up").symlink_to("..")
    (line / "a" / "up2").symlink_to("..")
    assert [p.as_posix() for p in glob_files("line/**/*.png")] == ["line/a/f0000.png", "line/b/c/f0000.png"]
    assert iter_image_paths(["line/**/*.png"]) == iter_image_paths(["line"])
    (line / "a" / "up").unlink()
    (line / "a" / "up2").unlink()
    assert {pat: glob_files(pat) for pat in plain} == expected and expected["line/**/.hidden/*.png"]


def test_a_video_is_checked_when_opened_before_any_output(tmp_path):
    """A file OpenCV cannot read, or one without a frame, had emptied --overwrite's OUT first,
    or streamed 0 frames with exit 0."""
    cv2 = pytest.importorskip("cv2")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 100)
    empty = tmp_path / "empty.avi"
    cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24)).release()
    for path in (garbage, empty):
        with pytest.raises(CMGError, match="video"):
            open_source(str(path))


def _video(path: Path, fourcc: str, n: int) -> bytes:
    """A video of n noise frames (noise: every frame its own, so a lost one shows)."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (64, 48))
    for _ in range(n):
        writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    writer.release()
    return path.read_bytes()


def _loads(items) -> list[str | None]:
    """Each item's error (None where it gives a frame)."""
    said = []
    for item in items:
        try:
            item.load((16, 16))
            said.append(None)
        except CMGError as exc:
            said.append(str(exc))
    return said


def test_a_damaged_video_gives_an_error_line_per_frame_it_lost_and_a_short_one_a_warning(tmp_path):
    """A read that failed mid-file ended the stream there with exit 0 (frames after it never
    scored); a cut file streamed its first half as if that were all. A file shorter than its
    header says is a warning, not error lines: an .mp4 an edit list trims is whole."""
    from cmg_clients.scorer import StreamSummary

    data = _video(tmp_path / "line.mp4", "mp4v", 60)
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(data[: len(data) // 2] + os.urandom(4096) + data[len(data) // 2 + 4096:])
    source = open_source(str(damaged))
    said = _loads(source.items())
    lost = [i for i, e in enumerate(said) if e]
    assert len(said) == 60 and 0 < len(lost) < 30 and max(lost) < 59, said  # frames after the damage come
    assert "could not be decoded" in said[lost[0]] and f"frame {lost[0]}" in said[lost[0]]
    resumed = list(source.items(lost[0] - 1))  # resume: the same frame ids, lost ones included
    assert [i.frame_id for i in resumed] == [f"damaged.mp4#{i}" for i in range(lost[0] - 1, 60)]
    assert _loads(resumed) == said[lost[0] - 1:]

    data = _video(tmp_path / "line.avi", "MJPG", 60)
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    source = open_source(str(cut))
    said = _loads(source.items())
    assert 20 < len(said) < 40 and not any(said) and source.warnings == [
        f"video {cut}: {len(said)} frames decoded of the 60 its header declares (a truncated or damaged file? "
        "or frames an edit list hides)"]
    assert "WARNING: video" in StreamSummary(out="o", warnings=source.warnings).line()


def test_retry_errors_rewrites_a_linked_output_through_its_link(tmp_path):
    """--retry-errors replaced a linked --out by a regular file: a later stream on the link
    then took a lock of its own beside the first's, both appending to one file."""
    from cmg.locks import OutputLock
    from cmg_clients.output import replace_lines

    real = tmp_path / "real.jsonl"
    real.write_text('{"seq": 0, "frame_id": "a", "error": "x"}\n{"seq": 1, "frame_id": "b"}\n')
    link = tmp_path / "link.jsonl"
    link.symlink_to(real.name)
    replace_lines(link, {0: {"seq": 0, "frame_id": "a", "score": 1.0}})
    assert link.is_symlink() and [json.loads(s)["frame_id"] for s in real.read_text().splitlines()] == ["a", "b"]
    assert "score" in _lines(real)[0]
    with OutputLock(real), pytest.raises(CMGError, match="being written"):
        OutputLock(link).acquire()


def test_a_short_video_is_said_by_its_containers_kind_of_count():
    """Containers that count their frames warn 3 short; those whose count is estimated from
    the duration only past 5% (a whole .mkv may be a frame or two off)."""
    from cmg_clients.sources import ends_short

    assert ends_short(Path("a.mp4"), 100, 97) and not ends_short(Path("a.mp4"), 100, 98)
    assert not ends_short(Path("a.mkv"), 100, 97) and ends_short(Path("a.MKV"), 100, 94)


def test_video_suffixes_urls_and_missing_sources_are_named(tmp_path):
    """A .ts recording was read as one unreadable image; a glob of videos gave an image error
    per video; a URL with ? got a glob error; a mistyped file no 'not found'."""
    data = _video(tmp_path / "cam.avi", "MJPG", 3)
    (tmp_path / "cam.ts").write_bytes(data)
    assert len(list(open_source(str(tmp_path / "cam.ts")).items())) == 3
    for spec, said in [("ftp://10.0.0.9/stream?channel=1", "not a scheme a camera streams over"),
                       (str(tmp_path / "*.ts"), "matches video files (cam.ts): give each video as a --source"),
                       (str(tmp_path / "missing.mp4"), "no such file or folder"),
                       ("/dev/null", "not a regular file")]:
        with pytest.raises(CMGError, match=re.escape(said)):
            open_source(spec)


def test_a_paced_stream_that_falls_behind_says_so():
    """--fps above what the servers answer: latencies start at the send, so frames that waited
    for their send did not show anywhere."""
    from cmg_clients.scorer import StreamSummary

    assert "behind the --fps schedule" in StreamSummary(out="o", behind_s=11.8).line()
    assert "behind" not in StreamSummary(out="o", behind_s=0.1).line()


def test_synth_parameters_given_twice_or_a_seed_out_of_range_are_refused():
    with pytest.raises(CMGError, match="given twice: n"):
        parse_synth("synth:tiny?n=2&n=3")
    for seed in ("-1", "99999999999999999999"):
        with pytest.raises(CMGError, match=r"seed must be 0 \.\.\. 2147483647"):
            parse_synth(f"synth:tiny?seed={seed}")


def test_an_unquoted_glob_is_named_with_its_likely_cause(capsys, tmp_path):
    """Files the shell expanded get the glob hint; a mistyped option's value does not."""
    from cmg_app.cli import main

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.touch()
    b.touch()
    assert main(["stream", "--source", str(a), str(b), "--out", "x.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cmg stream: error: unrecognized arguments: {b} (a pattern the shell expanded")
    assert main(["demo", "--out", str(tmp_path / "demoA")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"cmg demo: error: unrecognized arguments: --out {tmp_path / 'demoA'}"


def test_a_deadline_past_what_grpc_can_hold_is_refused():
    from cmg_clients import core

    assert core.positive_seconds(1e6) == 1e6
    with pytest.raises(CMGError, match="at most 1e"):
        core.positive_seconds(1e10, "--timeout")


def test_an_interrupted_stream_says_what_its_files_hold(capsys):
    from cmg_clients.scorer import StreamSummary
    from cmg_clients.stream import _said_when_interrupted

    summary = StreamSummary(out="cam.jsonl", frames=54, results=53, errors=1)
    with pytest.raises(KeyboardInterrupt), _said_when_interrupted([summary], lambda: asdict(summary)):
        raise KeyboardInterrupt
    said = capsys.readouterr()
    assert said.err == ("cmg stream: stopped with 54 frames written to cam.jsonl by this run (53 "
                        "results, 1 errors; every line whole): `--resume` continues it\n")
    # stdout still gets the JSON summary a script reads, marked as cut short
    printed = json.loads(said.out)
    assert printed["frames"] == 54 and printed["errors"] == 1 and printed["aborted"] == "interrupted"


def test_synth_source_skips_and_picks_without_redrawing():
    """Frame i depends only on (seed, i): a resumed stream starts at i, a re-score picks i."""
    src = open_source("synth:tiny?n=6&seed=2")
    full = list(src.items())
    later = list(src.items(4))
    assert [i.frame_id for i in later] == ["000004", "000005"]
    for a, b in zip(full[4:], later, strict=True):
        np.testing.assert_array_equal(a.load((64, 64)), b.load((64, 64)))
        assert a.extra == b.extra
    picked = dict(src.pick([5, 1]))
    np.testing.assert_array_equal(picked[1].load((64, 64)), full[1].load((64, 64)))


# -- real server --------------------------------------------------------------------------
def _opts(triton, source, out, **kw) -> StreamOptions:
    kw.setdefault("progress", False)
    return StreamOptions(url=triton.grpc_url, source=str(source), out=out, **kw)


BUSY = "; past the deadline: the server may be busy rather than down (queued frames wait): lower --window or raise --timeout"  # a deadline may be a queue, not an outage


def test_outage_notice_per_server_at_most_every_interval(capsys):
    """A server that stops answering is said once, then at most every `every` seconds, and
    once when it answers again; another server's answers do not end its outage."""
    from cmg_clients import scorer

    clock = iter([0.0, 1.0, 1.5, 2.0, 12.5, 13.0, 13.5, 14.5, 23.6, 23.7])
    notice = scorer.OutageNotice("cam1", every=10.0, clock=lambda: next(clock))
    notice.failed("a:1", 5, 1, 30, "UNAVAILABLE")  # t=0: said
    notice.failed("a:1", 6, 2, 30, "UNAVAILABLE")  # t=1: within 10 s, quiet
    notice.failed("b:2", 6, 1, -1, "UNAVAILABLE")  # t=1.5: another server, said
    notice.answered("b:2")  # t=2
    notice.answered("c:3")  # no outage: quiet, no clock read
    notice.failed("a:1", 9, 3, 30, "deadline")  # t=12.5: said again
    notice.answered("a:1")  # t=13
    notice.failed("a:1", 10, 1, 30, "deadline")  # t=13.5: a new outage within 10 s of the last line: quiet
    notice.answered("a:1")  # an outage never said is not "answering again" (no clock read)
    notice.failed("a:1", 11, 1, 30, "deadline")  # t=14.5: quiet again (a server slower than --timeout)
    notice.failed("a:1", 11, 2, 30, "deadline")  # t=23.6: 10 s after the last line: said
    notice.answered("a:1")  # t=23.7
    assert capsys.readouterr().err.splitlines() == [
        "cmg stream [cam1]: a:1 not answering for 0 s; frame 5 retry 1 of 30; last: UNAVAILABLE",
        "cmg stream [cam1]: b:2 not answering for 0 s; frame 6 retry 1 (no limit); last: UNAVAILABLE",
        "cmg stream [cam1]: b:2 answering again after 0 s",
        "cmg stream [cam1]: a:1 not answering for 12 s; frame 9 retry 3 of 30; last: deadline" + BUSY,
        "cmg stream [cam1]: a:1 answering again after 13 s",
        "cmg stream [cam1]: a:1 not answering for 9 s; frame 11 retry 2 of 30; last: deadline" + BUSY,
        "cmg stream [cam1]: a:1 answering again after 9 s",
    ]


def test_progress_bar_ends_on_the_last_figures():
    """A stream shorter than the bar's refresh interval used to keep the first frame's fps and
    latency on the bar (the demo showed 18.7 fps beside 290 frames/s)."""
    from cmg_clients.scorer import Latencies, Progress, StreamSummary

    bar = Progress(total=2, initial=0, enabled=True)
    summary = StreamSummary(out="x.jsonl")
    latencies = Latencies()
    latencies.append(10.0)
    bar.update(latencies, summary)  # the first frame refreshes the postfix
    latencies.append(30.0)
    bar.update(latencies, summary)  # within the refresh interval: not shown yet
    assert "p99=10.0ms" in bar.bar.postfix
    bar.close()
    assert "p99=29.8ms" in bar.bar.postfix


def test_stream_unreadable_image_is_an_error_line(triton, tmp_path):
    paths = _write_frames(tmp_path / "src", 12)
    paths[5].write_bytes(b"\x89PNG truncated")
    out = tmp_path / "out.jsonl"
    summary = run_stream(_opts(triton, tmp_path / "src", out, window=4))
    lines = _lines(out)
    assert [r["seq"] for r in lines] == list(range(12))
    assert "error" in lines[5] and "f0005.png" in lines[5]["error"] and "score" not in lines[5]
    assert all("score" in r and r["latency_ms"] > 0 for i, r in enumerate(lines) if i != 5)
    assert summary.errors == 1 and summary.results == 11 and summary.aborted is None


def test_stream_resume_continues_without_duplicates(triton, tmp_path):
    _write_frames(tmp_path / "src", 40, seed=1)
    out = tmp_path / "out.jsonl"
    first = run_stream(_opts(triton, tmp_path / "src", out, limit=15))
    assert first.frames == 15
    head = out.read_text()
    with pytest.raises(CMGError, match="--resume"):
        run_stream(_opts(triton, tmp_path / "src", out))
    with out.open("a") as fh:  # a crash in the middle of a line
        fh.write('{"seq": 15, "frame_id": "f00')
    second = run_stream(_opts(triton, tmp_path / "src", out, resume=True))
    lines = _lines(out)
    assert out.read_text().startswith(head)
    assert [r["seq"] for r in lines] == list(range(40))
    assert [r["frame_id"] for r in lines] == [f"f{i:04d}.png" for i in range(40)]
    assert second.skipped == 15 and second.frames == 25
    again = run_stream(_opts(triton, tmp_path / "src", out, resume=True))
    assert again.frames == 0 and len(_lines(out)) == 40
    # Resuming from another source is refused rather than mixed in.
    _write_frames(tmp_path / "other", 41, seed=2)
    (tmp_path / "other" / "f0039.png").rename(tmp_path / "other" / "x.png")
    with pytest.raises(CMGError, match="another source"):
        run_stream(_opts(triton, tmp_path / "other", out, resume=True))
    # ... also when the other source's frames have the same names (only frame_id was compared).
    _write_frames(tmp_path / "twin", 45, seed=3)
    with pytest.raises(CMGError, match="its lines come from source"):
        run_stream(_opts(triton, tmp_path / "twin", out, resume=True))
    # ... and a shorter source names the one that wrote the file.
    _write_frames(tmp_path / "short", 5, seed=4)
    with pytest.raises(CMGError, match=r"has 40 lines \(the last from .*src.*\) but source .*short has fewer frames; resume"):
        run_stream(_opts(triton, tmp_path / "short", out, resume=True))
    assert len(_lines(out)) == 40
    # The same folder spelled another way is the same source.
    spelled = Path(os.path.relpath(tmp_path / "src")) if tmp_path.is_relative_to(Path.cwd()) else tmp_path / "." / "src"
    assert run_stream(_opts(triton, spelled, out, resume=True)).frames == 0


def test_stream_survives_server_kill_and_restart(triton, tmp_path):
    """300 frames; the server is killed mid-stream and restarted on the same ports."""
    n = 300
    _write_frames(tmp_path / "src", n, size=8)
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable, "-m", "cmg_app.cli", "stream", "--url", triton.grpc_url, "--source", str(tmp_path / "src"),
        "--out", str(out), "--window", "16", "--fps", "100", "--timeout", "5", "--no-progress",
        "--backoff-max", "1", "--max-retries", "200",
    ]
    with _reaped(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) as proc:
        _wait_for_lines(proc, out, 50)
        written_before_kill = len(out.read_text().splitlines())
        assert written_before_kill < n, "stream finished before the kill; the test proves nothing"
        triton.kill()
        time.sleep(0.5)
        triton.start()
        stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    # The outage is said on stderr as it starts and as it ends (retries alone are silent).
    notices = [s for s in stderr.splitlines() if s.startswith("cmg stream:")]
    assert notices and f"{triton.grpc_url} not answering for 0 s; frame" in notices[0], stderr
    assert "retry 1 of 200" in notices[0] and "answering again after" in notices[-2], notices  # [-1]: the summary
    summary = json.loads(stdout.strip().splitlines()[-1])
    lines = _lines(out)
    assert len(lines) == n
    assert [r["seq"] for r in lines] == list(range(n))
    assert [r["frame_id"] for r in lines] == [f"f{i:04d}.png" for i in range(n)]
    assert all("score" in r for r in lines), [r for r in lines if "score" not in r][:3]
    assert summary["retries"] > 0 and summary["reconnects"] > 0, summary
    assert summary["frames"] == n and summary["p99_ms"] >= summary["p50_ms"] > 0
    # latency_ms runs from the first send (retries and the restart included), attempt_ms is
    # the last attempt alone; the summary's percentiles are over latency_ms.
    retried = [r for r in lines if r["retries"] > 0]
    assert retried and all(r["latency_ms"] >= r["attempt_ms"] for r in lines)
    assert max(r["latency_ms"] - r["attempt_ms"] for r in retried) >= 500, retried[:3]  # the 0.5 s outage
    assert summary["p99_ms"] == pytest.approx(np.percentile([r["latency_ms"] for r in lines], 99), abs=0.01)


@contextlib.contextmanager
def _reaped(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """The stream process, killed and reaped however the block ends (a failed assert too)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _wait_for_lines(proc: subprocess.Popen, out: Path, n: int, timeout: float = 60) -> None:
    """Until OUT holds `n` lines, while the stream that writes it still runs."""
    deadline = time.monotonic() + timeout
    while (not out.exists() or out.read_bytes().count(b"\n") < n) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)


def _stream_proc(triton, source: str, out: Path, *extra: str) -> subprocess.Popen:
    # -X faulthandler: a stream that hangs is made to say where (`_exits`: SIGABRT dumps every thread)
    cmd = [sys.executable, "-X", "faulthandler", "-m", "cmg_app.cli", "stream", "--url", triton.grpc_url, "--source", source,
           "--out", str(out), "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _exits(proc: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    """The process's stdout and stderr once it exits; one that has not within `timeout` is
    aborted, and the test fails with the stack of every thread it was stuck in."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"the stream did not exit within {timeout:g} s; where it was:\n{err[-8000:]}")


def test_one_writer_per_output_file(triton, tmp_path):
    """A second `cmg stream` on the same --out (afresh or --resume) while the first runs:
    exit 2 naming the first's pid, and the first ends complete (every frame once, no torn
    line); once it has ended, --resume takes the file again."""
    n = 300  # 12 s at 25 fps: the second writer starts while the first still streams, even on a loaded machine
    source = f"synth:tiny?n={n}&fps=25&seed=4"
    out = tmp_path / "out.jsonl"
    with _reaped(_stream_proc(triton, source, out)) as first:
        _wait_for_lines(first, out, 5)
        for extra in (["--overwrite"], ["--resume"], []):
            second = _stream_proc(triton, source, out, *extra)
            _, err = second.communicate(timeout=60)
            last = err.strip().splitlines()[-1]
            assert second.returncode == 2, err
            assert f"pid {first.pid}" in last and "another process" in last, last
            assert first.poll() is None, "the first stream ended before the second tried: the test proves nothing"
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    lines = _lines(out)
    assert [r["seq"] for r in lines] == list(range(n)) and all("score" in r for r in lines)
    assert out.read_bytes().endswith(b"\n") and not list(tmp_path.glob(".*.lock"))
    again = _stream_proc(triton, source, out, "--resume")
    again.communicate(timeout=60)
    assert again.returncode == 0 and len(_lines(out)) == n


def test_ctrl_c_still_prints_the_json_summary_that_matches_the_file(triton, tmp_path):
    """SIGINT mid-stream: exit 130, and stdout carries the summary a finished run prints
    (marked `aborted: interrupted`), whose frame count is the file's line count."""
    out = tmp_path / "out.jsonl"
    with _reaped(_stream_proc(triton, "synth:tiny?n=100000&fps=25&seed=1", out)) as proc:
        _wait_for_lines(proc, out, 5)
        proc.send_signal(signal.SIGINT)
        stdout, err = _exits(proc)
    assert proc.returncode == 130, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["aborted"] == "interrupted" and summary["frames"] == len(_lines(out)) >= 5, (summary, err)


def test_stream_full_disk_names_the_file(triton, tmp_path):
    """[Errno 28] names the output file (here /dev/full, where every write fails)."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    proc = _stream_proc(triton, "synth:tiny?n=3", Path("/dev/full"))
    _, err = proc.communicate(timeout=60)
    last = err.strip().splitlines()[-1]
    assert proc.returncode in (1, 2) and "No space left on device" in last and "/dev/full" in last, err


def test_stream_aborts_when_server_stays_away_then_resumes(triton, tmp_path):
    """Retries exhausted: the stream stops with every line so far intact; --resume finishes it."""
    import threading

    n = 60
    _write_frames(tmp_path / "src", n, seed=3)
    out = tmp_path / "out.jsonl"

    def kill_soon() -> None:
        deadline = time.monotonic() + 30
        while (not out.exists() or len(out.read_text().splitlines()) < 10) and time.monotonic() < deadline:
            time.sleep(0.01)
        triton.kill()

    killer = threading.Thread(target=kill_soon)
    killer.start()
    try:
        aborted = run_stream(_opts(triton, tmp_path / "src", out, fps=50, window=8, max_retries=2,
                                   backoff_s=0.05, backoff_max_s=0.1, timeout_s=2))
    finally:
        killer.join()
    try:
        assert aborted.aborted and "failed 3 times" in aborted.aborted
        head = _lines(out)
        assert 10 <= len(head) < n and [r["seq"] for r in head] == list(range(len(head)))
    finally:
        triton.start()
    done = run_stream(_opts(triton, tmp_path / "src", out, resume=True))
    lines = _lines(out)
    assert done.aborted is None and done.skipped == len(head)
    assert [r["seq"] for r in lines] == list(range(n)) and all("score" in r for r in lines)


def test_stream_gives_up_cleanly_when_server_stays_away(tmp_path):
    """Without a server the CLI names it and exits non-zero; nothing half-written."""
    from cmg_app.cli import main
    from cmg_build.server import free_port

    _write_frames(tmp_path / "src", 3)
    out = tmp_path / "out.jsonl"
    rc = main(["stream", "--url", f"127.0.0.1:{free_port()}", "--source", str(tmp_path / "src"),
               "--out", str(out), "--timeout", "2", "--no-progress"])
    assert rc == 2 and not out.exists()


def test_a_server_down_at_the_start_is_said_and_counted(triton, tmp_path, capsys):
    """Two --url, the second never up: every frame goes to the first, and the second is named
    at once and "marked down 1 times" (it had been silent, marked down 0 times)."""
    from cmg_build.server import free_port
    from cmg_clients.stream import run_streams

    dead = f"127.0.0.1:{free_port()}"
    out = tmp_path / "out.jsonl"
    summaries, servers = run_streams([triton.grpc_url, dead], [_opts(triton, "synth:tiny?n=6", out)])
    assert summaries[0].results == 6 and len(_lines(out)) == 6
    assert servers[dead]["failures"] == 1 and servers[dead]["frames"] == 0
    err = capsys.readouterr().err
    assert f"cmg stream: {dead}: " in err and "not answering at the start: streaming to the others" in err


def test_stream_synthetic_source(triton, tmp_path):
    pytest.importorskip("cmg_data.synth")
    out = tmp_path / "out.jsonl"
    summary = run_stream(_opts(triton, "synth:tiny?fps=200&seed=1&n=20", out))
    lines = _lines(out)
    assert [r["seq"] for r in lines] == list(range(20)) and summary.results == 20
    assert all(r["source"].startswith("synth:tiny") for r in lines)
    assert summary.flagged == sum(r["is_anomaly"] for r in lines)  # the summary says how many were flagged
    assert f"; {summary.flagged} flagged = {summary.flagged / 20:.0%})" in summary.line()


def test_stream_writes_an_overlay_per_flagged_frame(triton, tmp_path, capsys):
    """`--overlays DIR`: each flagged line names its PNG (sequence number first), unflagged
    lines name none; several sources write a folder each; a folder that is a file is refused."""
    pytest.importorskip("cmg_data.synth")
    from cmg_app.cli import main

    out, folder = tmp_path / "out.jsonl", tmp_path / "ov"
    summary = run_stream(_opts(triton, "synth:tiny?seed=2&n=12", out, overlays=folder))
    lines = _lines(out)
    flagged = [x for x in lines if x["is_anomaly"]]
    assert summary.flagged == len(flagged) > 0, "nothing flagged: the test proves nothing"
    assert all("overlay" not in x for x in lines if not x["is_anomaly"])
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(Path(x["overlay"]).name for x in flagged)
    for x in flagged:
        assert Path(x["overlay"]).name.startswith(f"{x['seq']:07d}_")
        with Image.open(x["overlay"]) as im:
            assert im.format == "PNG" and im.size[0] > 0
    low = tmp_path / "low.jsonl"
    every = run_stream(_opts(triton, "synth:tiny?seed=2&n=4", low, overlays=tmp_path / "all", threshold=-1e30))
    assert every.flagged == 4 and len(list((tmp_path / "all").glob("*.png"))) == 4  # a given threshold flags all
    rc = main(["stream", "--url", triton.grpc_url, "--source", "a=synth:tiny?n=2&seed=1",
               "--source", "b=synth:tiny?n=2&seed=2", "--out", str(tmp_path / "multi"), "--overlays", str(tmp_path / "mov"), "--threshold=-1e30",
               "--no-progress"])
    assert rc == 0 and {p.name for p in (tmp_path / "mov").iterdir()} == {"a", "b"}
    for cam in ("c1", "c2"):  # two streams, one DIR: a folder per output file, nothing overwritten
        assert main(["stream", "--url", triton.grpc_url, "--source", f"synth:tiny?n=2&seed={cam[1]}",
                     "--out", str(tmp_path / f"{cam}.jsonl"), "--overlays", str(tmp_path / "shared"),
                     "--threshold=-1e30", "--no-progress"]) == 0
    assert {p.name: len(list(p.glob("*.png"))) for p in (tmp_path / "shared").iterdir()} == {"c1": 2, "c2": 2}
    (tmp_path / "elsewhere").mkdir()  # another line3.jsonl of the same name: refused, nothing overwritten
    assert main(["stream", "--url", triton.grpc_url, "--source", "synth:tiny?n=2&seed=5",
                 "--out", str(tmp_path / "elsewhere" / "c1.jsonl"), "--overlays", str(tmp_path / "shared"),
                 "--threshold=-1e30", "--no-progress"]) == 2
    assert "holds the overlays of the stream into" in capsys.readouterr().err
    from cmg_clients.overlay import stream_overlay_name

    assert stream_overlay_name(7, "../../etc/x y?.png") == "0000007_x_y_.png"  # a name, never a path
    assert stream_overlay_name(7, "") == "0000007_frame.png"
    (tmp_path / "afile").write_text("")
    capsys.readouterr()
    assert main(["stream", "--url", triton.grpc_url, "--source", "synth:tiny?n=1", "--out", str(tmp_path / "x.jsonl"),
                 "--overlays", str(tmp_path / "afile")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()


def test_stream_imports_no_torch():
    code = "import sys, cmg_clients.stream; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env={**os.environ})


def test_stream_video_source(triton, tmp_path):
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    for i in range(7):
        writer.write(np.full((24, 32, 3), 30 * i, dtype=np.uint8))
    writer.release()
    out = tmp_path / "out.jsonl"
    summary = run_stream(_opts(triton, path, out))
    lines = _lines(out)
    assert summary.results == 7 and [r["frame_id"] for r in lines] == [f"line.avi#{i}" for i in range(7)]
    assert summary.behind_s == 0.0  # unpaced: no schedule to fall behind
    paced = run_stream(_opts(triton, path, tmp_path / "paced.jsonl", fps=1e6, window=1))
    assert paced.results == 7 and paced.behind_s > 0  # one frame at a time cannot keep a microsecond apart


def test_a_resumed_source_is_the_same_source_however_its_path_is_written(tmp_path, monkeypatch):
    """--resume checks the file's `source` against today's: `cam1`, `./cam1/` and its absolute
    path are one folder; another folder, or a synthetic source against a path, is not."""
    from cmg_clients.output import same_source

    (tmp_path / "cam1").mkdir()
    (tmp_path / "cam2").mkdir()
    monkeypatch.chdir(tmp_path)
    assert same_source("cam1", "./cam1/") and same_source(str(tmp_path / "cam1"), "cam1")
    assert not same_source("cam1", "cam2") and not same_source(None, "cam1")
    assert same_source("synth:tiny?seed=1", "synth:tiny?seed=1") and not same_source("synth:tiny", "cam1")


def test_latencies_are_exact_then_a_fixed_size_uniform_sample():
    """A line's stream runs for weeks: the summary's percentiles keep `cap` latencies (4 bytes
    each), exact while fewer frames came, a uniform sample of all of them after."""
    from cmg_clients.scorer import Latencies

    rng = np.random.default_rng(5)
    few = rng.exponential(20.0, 500)
    exact = Latencies(cap=1000)
    for v in few:
        exact.append(float(v))
    assert np.allclose(exact.percentiles([50, 99]), np.percentile(few.astype(np.float32), [50, 99]))
    many = Latencies(cap=1000)
    values = rng.uniform(0.0, 100.0, 50_000)
    for v in values:
        many.append(float(v))
    assert len(many) == 50_000 and len(many._values) == 1000  # memory stays at the cap
    p50, p99 = many.percentiles([50, 99])
    assert abs(p50 - 50.0) < 5.0 and abs(p99 - 99.0) < 2.0  # the sample spans the whole run
    assert np.array_equal(many.recent(), values[-Latencies.RECENT:].astype(np.float64))
    drift = Latencies(cap=1000)  # a run whose latency rose halfway: the sample keeps both halves
    for v in np.r_[rng.uniform(0.0, 10.0, 25_000), rng.uniform(90.0, 100.0, 25_000)]:
        drift.append(float(v))
    low, high = drift.percentiles([25, 75])
    assert low < 10.0 and high > 90.0


def test_grpcs_own_deadline_words_get_the_busy_hint(capsys):
    """gRPC says "Deadline Exceeded" (capitalised)."""
    from cmg_clients.scorer import OutageNotice

    OutageNotice("cam1", every=10.0, clock=lambda: 0.0).failed("a:1", 1, 1, 3, "Deadline Exceeded")
    assert "busy rather than down" in capsys.readouterr().err


def test_a_recursive_glob_walks_only_where_it_can_match_and_keeps_a_links_own_matches(tmp_path, monkeypatch):
    """A missing leading folder is no match at once (it had walked the working folder, or the
    whole disk for `/missing/**`, and `cmg stream --source cam1='DIR/**/*.png'` asked that of
    `cam1=DIR`); a folder reached by a link that is no loop keeps the matches only its link's
    path makes (`**/latest/*.png`)."""
    import os

    from cmg_clients.client import glob_files

    cam = tmp_path / "cams" / "cam1"
    _write_frames(cam / "2024-05-01", 1)
    (cam / "latest").symlink_to("2024-05-01")
    monkeypatch.chdir(tmp_path)
    assert [p.as_posix() for p in glob_files("cams/**/latest/*.png")] == ["cams/cam1/latest/f0000.png"]
    assert [p.as_posix() for p in glob_files("cams/**/*.png")] == ["cams/cam1/2024-05-01/f0000.png"]  # once
    walked: list[str] = []
    real_walk = os.walk
    monkeypatch.setattr(os, "walk", lambda top, **kw: walked.append(str(top)) or real_walk(top, **kw))
    for pattern in ("/missing_zz/**/*.png", "missing/**/*.png", f"cam1={tmp_path}/cams/**/*.png"):
        assert glob_files(pattern) == [] and walked == [], pattern
