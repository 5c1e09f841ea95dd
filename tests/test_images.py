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
from PIL import Image, ImageOps

from cmg.frames import FrameError, batch_to_uint8, load_frame
from cmg_app.cli import main


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


# -- every camera format: pixel values, not just shapes (issue 25) --------------------------
def _saved(img: Image.Image, fmt: str, path: Path) -> Path:
    img.save(path, fmt)
    return path


RAMP16 = np.array([[0, 257, 32896], [65535, 1000, 51400]], dtype=np.uint16)  # x >> 8 -> 0, 1, 128, 255, 3, 200


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_grayscale_is_scaled_not_saturated(mode, tmp_path):
    """A mono camera's 16-bit PNG/TIFF becomes its high byte, not all-255 (Pillow's own `convert`)."""
    if mode == "I;16":
        img = Image.fromarray(RAMP16)
    elif mode == "I;16B":
        img = Image.fromarray(RAMP16.astype(">u2"))
    else:
        img = Image.fromarray(RAMP16.astype(np.int32))
    assert img.mode == mode
    path = _saved(img, "TIFF" if mode != "I;16" else "PNG", tmp_path / f"f.{'png' if mode == 'I;16' else 'tif'}")
    with Image.open(path) as check:
        assert check.mode == mode  # the file really is that mode
    frame = load_frame(path, (2, 3))
    want = (RAMP16 >> 8).astype(np.uint8)
    assert frame.dtype == np.uint8 and frame.shape == (2, 3, 3)
    np.testing.assert_array_equal(frame, np.repeat(want[..., None], 3, axis=-1))


def test_float_and_out_of_range_modes(tmp_path):
    """F: 0..1 scaled by 255, 0..255 as is; anything else refused with one line naming it."""
    unit = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    frame = load_frame(_saved(Image.fromarray(unit), "TIFF", tmp_path / "unit.tif"), (1, 3))
    np.testing.assert_array_equal(frame[..., 0], [[0, 128, 255]])
    wide = np.array([[0.0, 100.0, 255.0]], dtype=np.float32)
    np.testing.assert_array_equal(load_frame(_saved(Image.fromarray(wide), "TIFF", tmp_path / "w.tif"), (1, 3))[..., 1],
                                  [[0, 100, 255]])
    for name, arr in (("neg", np.array([[-5.0, 1.0]], np.float32)), ("big", np.array([[0.0, 900.0]], np.float32)),
                      ("nan", np.array([[np.nan, 1.0]], np.float32)),
                      ("i32", np.array([[0, 70000]], np.int32))):
        path = _saved(Image.fromarray(arr), "TIFF", tmp_path / f"{name}.tif")
        with pytest.raises(FrameError, match=rf"{name}\.tif.*mode (F|I)") as info:
            load_frame(path, (1, 2))
        assert "\n" not in str(info.value)


def test_float_pixels_are_scaled_in_small_slices_with_the_same_bytes():
    """A float image's conversion held 16 bytes a pixel in float64 temporaries (a 9000 x 9000
    TIFF: ~1.9 GB a decode); now a slice at a time, rounding exactly as before (float32
    arithmetic would not: 128 values of 0..1 round to the other side of .5)."""
    import tracemalloc

    from cmg.frames import _array_to_uint8

    rng = np.random.default_rng(0)
    unit = rng.random((2000, 2000), dtype=np.float32)
    unit[0, :3] = [0.5 / 255, 0.0019607844, 1.0]  # on and next to a rounding edge
    tracemalloc.start()
    try:
        got = _array_to_uint8(unit, "image")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < unit.nbytes, f"{peak / 2**20:.0f} MiB for a {unit.nbytes / 2**20:.0f} MiB image"
    np.testing.assert_array_equal(got, np.rint(unit.astype(np.float64) * 255.0).astype(np.uint8))
    wide = unit * 255.0
    np.testing.assert_array_equal(_array_to_uint8(wide, "image"), np.rint(wide.astype(np.float64)).astype(np.uint8))


def test_la_p_cmyk_rgba_and_jpeg_are_converted_correctly(tmp_path):
    la = Image.fromarray(np.array([[[10, 0], [200, 255]]], dtype=np.uint8), "LA")
    np.testing.assert_array_equal(load_frame(_saved(la, "PNG", tmp_path / "la.png"), (1, 2)),
                                  [[[10, 10, 10], [200, 200, 200]]])  # alpha dropped, the grey kept
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 90, 200] + [0] * 759)
    p.putdata([2, 1])
    np.testing.assert_array_equal(load_frame(_saved(p, "PNG", tmp_path / "p.png"), (1, 2)),
                                  [[[0, 90, 200], [255, 0, 0]]])  # the palette's colours
    cmyk = Image.new("CMYK", (2, 2), (10, 20, 30, 40))
    frame = load_frame(_saved(cmyk, "TIFF", tmp_path / "c.tif"), (2, 2))
    want = [round((255 - c) * (255 - 40) / 255) for c in (10, 20, 30)]
    assert np.abs(frame.astype(int) - want).max() <= 1
    rgba = Image.fromarray(np.full((2, 2, 4), (30, 60, 90, 0), dtype=np.uint8), "RGBA")
    np.testing.assert_array_equal(load_frame(_saved(rgba, "PNG", tmp_path / "a.png"), (2, 2))[0, 0], [30, 60, 90])
    rgb = Image.new("RGB", (16, 16), (200, 40, 120))
    frame = load_frame(_saved(rgb, "JPEG", tmp_path / "x.jpg"), (16, 16))
    assert np.abs(frame.astype(int) - [200, 40, 120]).max() <= 3  # lossy, but the colour is kept
    gray = Image.new("L", (16, 16), 77)
    assert np.abs(load_frame(_saved(gray, "JPEG", tmp_path / "g.jpg"), (16, 16)).astype(int) - 77).max() <= 1
    cmyk_jpeg = load_frame(_saved(Image.new("CMYK", (16, 16), (0, 0, 0, 0)), "JPEG", tmp_path / "c.jpg"), (16, 16))
    assert cmyk_jpeg.min() >= 250  # CMYK 0,0,0,0 is white


def test_unconvertible_mode_is_refused_in_one_line():
    from cmg.frames import to_frame

    la_premultiplied = Image.new("La", (2, 2))  # Pillow has no La -> RGB conversion
    with pytest.raises(FrameError, match="mode La cannot be converted") as info:
        to_frame(la_premultiplied, (2, 2))
    assert "\n" not in str(info.value)
    with pytest.raises(FrameError, match="complex128 are not an image"):
        to_frame(np.zeros((2, 2), np.complex128), (2, 2))


def test_training_masks_and_frames_share_the_conversion(tmp_path):
    """A 16-bit ground-truth mask (0 / 65535) is read through the same conversion."""
    from cmg.dataset import _load_mask

    mask = np.zeros((4, 4), np.uint16)
    mask[1:3, 1:3] = 65535
    mask[0, 0] = 100  # 100 >> 8 -> 0: below the mask's half level
    Image.fromarray(mask).save(tmp_path / "m.png")
    np.testing.assert_array_equal(_load_mask(tmp_path / "m.png", (4, 4)), mask > 32768)


def test_a_jpeg_is_read_the_way_a_viewer_shows_it(tmp_path):
    """Phones and cameras store a rotation as the EXIF Orientation tag: the frame follows it,
    so a mask drawn on the image as displayed lines up."""
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, :30] = 255  # left half white as stored
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    frame = load_frame(tmp_path / "phone.jpg", (60, 60))
    top, bottom = frame[:20].mean(), frame[40:].mean()
    assert top > 200 and bottom < 50, (top, bottom)  # displayed: the white half is on top


def test_a_16bit_file_and_its_pixels_as_an_array_read_alike(tmp_path):
    """Pillow reads a 16-bit colour file by its high byte; a 16-bit grey file, the same pixels
    as a uint16 array (either byte order) and as a PIL image read the same way."""
    import cv2

    from cmg.frames import to_frame

    rgb16 = np.random.default_rng(0).integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16[..., ::-1])  # Pillow cannot write 16-bit colour
    from_file = load_frame(tmp_path / "c16.png", (6, 5))
    np.testing.assert_array_equal(from_file, (rgb16 >> 8).astype(np.uint8))
    np.testing.assert_array_equal(to_frame(rgb16, (6, 5)), from_file)
    np.testing.assert_array_equal(to_frame(rgb16.astype(">u2"), (6, 5)), from_file)  # big-endian too
    grey = rgb16[..., 1]
    Image.fromarray(grey).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(load_frame(tmp_path / "g16.png", (6, 5)), to_frame(grey, (6, 5)))
    with pytest.raises(FrameError, match=r"give uint8 \(0..255\) or uint16"):
        to_frame(grey.astype(np.int32) * 2, (6, 5))  # an array says what an array can be


def test_every_input_kind_reads_as_its_file(tmp_path):
    """A PIL image with an EXIF rotation, an HxWx2 (grey + alpha) array, a lazily opened
    truncated file: the client's image and array inputs read as the file's path does."""
    from cmg.frames import to_frame

    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:, :15] = 255
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 8
    img.save(tmp_path / "tagged.png", exif=exif)
    with Image.open(tmp_path / "tagged.png") as opened:
        np.testing.assert_array_equal(to_frame(opened, (30, 30)), load_frame(tmp_path / "tagged.png", (30, 30)))
        converted = opened.convert("RGB")  # what most code does first: the tag goes with it
        np.testing.assert_array_equal(to_frame(converted, (30, 30)), load_frame(tmp_path / "tagged.png", (30, 30)))
        placed = ImageOps.exif_transpose(opened)  # rotated by the caller, the tag removed: not again
        np.testing.assert_array_equal(to_frame(placed, (30, 30)), load_frame(tmp_path / "tagged.png", (30, 30)))
    la = np.stack([np.arange(6, dtype=np.uint8).reshape(2, 3) * 40, np.zeros((2, 3), np.uint8)], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(to_frame(la, (2, 3)), load_frame(tmp_path / "la.png", (2, 3)))
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # a long scan to cut
    Image.fromarray(noise).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    with Image.open(tmp_path / "cut.jpg") as cut, pytest.raises(FrameError, match="unreadable cut image"):
        to_frame(cut, (8, 8), "cut image")
    with pytest.raises(FrameError, match="not an image format") as info:
        load_frame(b"not an image", (8, 8))
    assert "BytesIO" not in str(info.value)


def test_a_mask_is_read_upright_like_its_image(tmp_path):
    """An image and its mask both stored rotated with the same EXIF tag line up as read."""
    from cmg.dataset import _load_mask

    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:5, :] = 255  # a defect along the stored top edge
    mask = (pixels[..., 0] > 0).astype(np.uint8) * 255
    for arr, name in ((pixels, "img.png"), (mask, "mask.png")):
        im = Image.fromarray(arr)
        exif = im.getexif()
        exif[0x0112] = 6
        im.save(tmp_path / name, exif=exif)
    frame = load_frame(tmp_path / "img.png", (30, 20))
    np.testing.assert_array_equal(_load_mask(tmp_path / "mask.png", (30, 20)), frame[..., 0] > 0)


def test_the_pixel_limit_names_the_option_only_where_there_is_one(tmp_path):
    Image.new("L", (20, 10)).save(tmp_path / "big.png")
    with pytest.raises(FrameError, match=r"over the limit of 100 \(--max-pixels\)"):
        load_frame(tmp_path / "big.png", (4, 4), max_pixels=100)
    from cmg import frames

    with pytest.raises(FrameError, match=r"downscale the image"):  # training reads with the default limit
        frames.DEFAULT_MAX_PIXELS, saved = 100, frames.DEFAULT_MAX_PIXELS
        try:
            load_frame(tmp_path / "big.png", (4, 4))
        finally:
            frames.DEFAULT_MAX_PIXELS = saved


def test_a_float_batch_is_read_on_one_scale():
    """A nearly black frame (max 1.0) inside a 0..255 float batch had been read as 0..1 on
    its own, scaled by 255 and flagged; the whole array decides its range."""
    from cmg_clients.sources import ArraySource

    bright = np.full((8, 8, 3), 200.0, np.float32)
    dark = np.zeros((8, 8, 3), np.float32)
    dark[2:4, 2:4] = 1.0
    batch = np.stack([bright, dark])
    out = batch_to_uint8(batch)
    assert out.dtype == np.uint8 and out[0].max() == 200 and out[1].max() == 1
    assert batch_to_uint8(batch / 255.0)[1].max() == 1  # a 0..1 batch: every frame x 255
    ints = batch.astype(np.uint8)
    assert batch_to_uint8(ints) is ints  # integer frames: their type's scale, untouched
    item = list(ArraySource(batch, 2).items())[1]
    assert item.load((8, 8)).max() == 1
    bad = np.stack([bright, dark, bright])
    bad[1, 0, 0, 0] = np.nan  # one bad frame fails alone; the others stream on the array's scale
    items = list(ArraySource(bad, 3).items())
    assert items[0].load((8, 8)).max() == 200 and items[2].load((8, 8)).max() == 200
    with pytest.raises(FrameError, match="NaN"):
        items[1].load((8, 8))


def test_a_01_batch_with_a_white_pixel_and_a_frame_off_its_batch_scale():
    """A 0..1 float batch whose maximum is exactly 1.0 is still 0..1; a frame with 0..255
    values on a 0..1 batch's scale is refused, not wrapped."""
    from cmg.frames import frame_on_scale
    from cmg_clients.sources import ArraySource

    batch = np.zeros((2, 8, 8, 3), np.float32)
    batch[0, 0, 0] = 1.0
    batch[1] = 0.5
    items = list(ArraySource(batch, 2).items())
    assert items[0].load((8, 8)).max() == 255 and items[1].load((8, 8)).max() == 128
    with pytest.raises(FrameError, match="in a 0..1 batch"):
        frame_on_scale(np.full((2, 2, 3), 200.0), 255.0)


@pytest.mark.parametrize("kind", ["over_pixel_limit", "not_an_image", "truncated"])
def test_a_mask_is_checked_as_a_frame_is_and_named(kind, tmp_path):
    """A ground-truth mask whose header declares 900 Mpx had been an internal error naming no
    file (Pillow's DecompressionBombError), and a 12000 x 9000 one was decoded (2.3 GB)."""
    from cmg.dataset import _load_mask
    from cmg.errors import CMGError

    data = {"over_pixel_limit": png_header(30000, 30000), "not_an_image": b"hello",
            "truncated": good_png()[:60]}[kind]
    path = tmp_path / "000_mask.png"
    path.write_bytes(data)
    with pytest.raises(CMGError, match=r"(mask .*000_mask.png is over the pixel limit of \d+ \(downscale the mask\))"
                                       r"|(unreadable mask .*000_mask.png)"):
        _load_mask(path, (32, 32))


def test_a_path_that_is_no_regular_file_is_said_so(tmp_path):
    """A FIFO, a folder or a device given as an image had been "image not found" (and a FIFO
    must not be opened: the open would block)."""
    import os

    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "dir.png").mkdir()
    for path in (tmp_path / "fifo.png", tmp_path / "dir.png", Path("/dev/null")):
        with pytest.raises(FrameError, match=f"image {path} is not a regular file"):
            load_frame(path, (8, 8))
    with pytest.raises(FrameError, match="image not found"):
        load_frame(tmp_path / "missing.png", (8, 8))


def test_a_mask_over_the_frames_pixel_limit_is_not_decoded(tmp_path, monkeypatch):
    """Below Pillow's own refusal, a mask over the limit frames have is refused before decoding."""
    from cmg import frames
    from cmg.dataset import _load_mask
    from cmg.errors import CMGError

    Image.new("L", (20, 10)).save(tmp_path / "big_mask.png")
    monkeypatch.setattr(frames, "DEFAULT_MAX_PIXELS", 100)
    with pytest.raises(CMGError, match=r"mask .*big_mask.png declares 20 x 10 = 200 pixels, over the limit of 100"):
        _load_mask(tmp_path / "big_mask.png", (4, 4))
