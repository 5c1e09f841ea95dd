"""Every image problem is one error line for that frame, in `cmg infer` and `cmg stream`,
and the rest go on: unreadable, truncated, not an image, over the pixel limit, zero-size."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmg.cli import main
from cmg.frames import FrameError, load_frame


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with no pixel data (a few dozen bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def good_png(seed: int = 0, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# name -> (file bytes, text the error names)
BAD = {
    "unreadable": (b"\x89PNG\r\n\x1a\n garbage", "unreadable"),
    "truncated": (good_png(1, 64)[:80], "truncated"),
    "not_an_image": (b"hello, I am a text file\n", "unreadable"),
    "empty_file": (b"", "unreadable"),
    "over_pixel_limit": (png_header(20000, 20000), "pixel"),
    "zero_size": (png_header(0, 0), "unreadable"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_load_frame_names_the_problem(kind, tmp_path):
    data, needle = BAD[kind]
    path = tmp_path / f"{kind}.png"
    path.write_bytes(data)
    with pytest.raises(FrameError, match=needle) as info:
        load_frame(path, (64, 64))
    assert path.name in str(info.value)
    with pytest.raises(FrameError):
        load_frame(data, (64, 64))


def test_pixel_limit_is_configurable(tmp_path):
    path = tmp_path / "ok.png"
    path.write_bytes(good_png(size=12))
    assert load_frame(path, (8, 8), max_pixels=144).shape == (8, 8, 3)
    with pytest.raises(FrameError, match="144 pixels, over the limit of 143"):
        load_frame(path, (8, 8), max_pixels=143)


def test_empty_arrays_are_refused():
    from cmg.frames import to_frame

    with pytest.raises(FrameError, match="empty"):
        to_frame(np.zeros((0, 5, 3), np.uint8), (8, 8))


@pytest.fixture
def mixed(tmp_path) -> tuple[Path, list[str]]:
    """good_00, then each bad kind followed by a good image: a_<i>_<kind>.png sorted in that order."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = []
    (folder / "a_00_good.png").write_bytes(good_png(0))
    names.append("a_00_good.png")
    for i, (kind, (data, _)) in enumerate(BAD.items(), 1):
        for name, blob in ((f"a_{i:02d}_{kind}.png", data), (f"a_{i:02d}_zgood.png", good_png(i))):
            (folder / name).write_bytes(blob)
            names.append(name)
    return folder, names


def _expected_error(name: str) -> str | None:
    kind = name[5:-4]
    return None if "good" in kind else BAD[kind][1]


@pytest.mark.slow
def test_infer_gives_each_bad_image_its_line(triton, mixed, capsys):
    folder, names = mixed
    rc = main(["infer", "--url", triton.grpc_url, "--batch", "4", str(folder)])
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert rc == 1
    assert [Path(r["file"]).name for r in lines] == names
    for name, rec in zip(names, lines, strict=True):
        want = _expected_error(name)
        if want is None:
            assert "score" in rec and "error" not in rec, rec
        else:
            assert "score" not in rec and want in rec["error"].lower() and name in rec["error"], rec


@pytest.mark.slow
def test_stream_gives_each_bad_image_its_line_and_goes_on(triton, mixed, tmp_path, capsys):
    folder, names = mixed
    out = tmp_path / "out.jsonl"
    rc = main(["stream", "--url", triton.grpc_url, "--source", str(folder), "--out", str(out), "--no-progress"])
    lines = [json.loads(s) for s in out.read_text().splitlines()]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 1, "a stream with error lines exits 1"
    assert [r["seq"] for r in lines] == list(range(len(names))) and [r["frame_id"] for r in lines] == names
    for name, rec in zip(names, lines, strict=True):
        want = _expected_error(name)
        if want is None:
            assert "score" in rec and "error" not in rec, rec
        else:
            assert "score" not in rec and want in rec["error"].lower(), rec
    assert summary["errors"] == len(BAD) and summary["errors_in_out"] == len(BAD) and summary["aborted"] is None
    # --resume does not trip over the bad frames again: nothing left to do, same exit status.
    rc = main(["stream", "--url", triton.grpc_url, "--source", str(folder), "--out", str(out), "--resume",
               "--no-progress"])
    assert rc == 1 and len(out.read_text().splitlines()) == len(names)


@pytest.mark.slow
def test_stream_pixel_limit_flag(triton, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "small.png").write_bytes(good_png(size=8))
    (folder / "big.png").write_bytes(good_png(size=30))
    out = tmp_path / "out.jsonl"
    rc = main(["stream", "--url", triton.grpc_url, "--source", str(folder), "--out", str(out), "--no-progress",
               "--max-pixels", "100"])
    big, small = [json.loads(s) for s in out.read_text().splitlines()]
    assert rc == 1 and "over the limit of 100" in big["error"] and "score" in small
