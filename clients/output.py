"""`cmg stream`'s output file: what it already holds (`--resume`), the atomic rewrite of
`--retry-errors` (the one-writer lock is `cmg.locks`)."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cmg.errors import CMGError, check_parent_folders
from cmg.files import keep_mode


@dataclass
class Existing:
    """What OUT already holds: line count, last frame id, and the error lines by seq."""

    count: int = 0
    last_id: str | None = None
    last_source: str | None = None  # the `source` its last line names (resume checks it)
    errors: dict[int, str | None] = field(default_factory=dict)  # seq -> frame_id


def scan_existing(out: Path) -> Existing:
    """Lines already in OUT. Truncates a torn last line (crash mid-write).

    The lines must be seqs 0..n-1 in order, which is what this client writes; anything
    else means OUT came from somewhere else, and continuing would corrupt it.
    """
    found = Existing()
    if not out.is_file():
        return found
    raw = out.read_bytes()
    keep = raw if raw.endswith(b"\n") or not raw else raw[: raw.rfind(b"\n") + 1]
    for lineno, line in enumerate(keep.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CMGError(f"{out}:{lineno}: not a JSON line ({exc}); cannot resume") from exc
        if not isinstance(rec, dict) or rec.get("seq") != found.count:
            seq = rec.get("seq") if isinstance(rec, dict) else None
            raise CMGError(f"{out}:{lineno}: seq {seq} where {found.count} was expected; cannot resume")
        if "error" in rec:
            found.errors[found.count] = rec.get("frame_id")
        found.count, found.last_id, found.last_source = found.count + 1, rec.get("frame_id"), rec.get("source")
    if len(keep) != len(raw):
        out.write_bytes(keep)
    return found


def read_existing(out: Path) -> tuple[int, str | None]:
    """(line count, last frame_id) of OUT; see scan_existing."""
    found = scan_existing(out)
    return found.count, found.last_id


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rewrite_tmp(out: Path) -> Path:
    """The file `replace_lines` writes before its rename: beside the file a link names."""
    real = out.resolve()
    return real.with_name(real.name + ".rewrite.tmp")


def replace_lines(out: Path, new: dict[int, dict]) -> None:
    """Rewrite OUT with the lines of `new` (by seq) in place of the old ones, atomically:
    a temporary file next to OUT, fsync, rename. Killed at any point, OUT is either the
    old file or the new one."""
    if not new:
        return
    out = out.resolve()  # a link to the file stays a link (replaced, it had split the file's lock in two)
    tmp = rewrite_tmp(out)
    with out.open("rb") as src, tmp.open("wb") as dst:
        keep_mode(out, tmp)  # before the lines are written
        for seq, line in enumerate(src):
            if seq in new:
                dst.write(json.dumps(new[seq]).encode() + b"\n")
            else:
                dst.write(line)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, out)
    _fsync_dir(out.parent)


def looks_like_stream_output(out: Path) -> bool:
    """True when OUT's first line is a line this client writes (JSON with seq 0)."""
    try:
        with out.open("rb") as fh:
            first = fh.readline(1 << 20)
        rec = json.loads(first)
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and rec.get("seq") == 0


def same_source(recorded: object, now: str) -> bool:
    """A line's `source` against the source's now: equal, or the same file by path (a
    folder given as `cam1` then `./cam1/` is the same source)."""
    if recorded == now:
        return True
    if not isinstance(recorded, str) or now.startswith("synth:") or recorded.startswith("synth:"):
        return False
    try:
        return Path(recorded).resolve() == Path(now).resolve()
    except OSError:
        return False


def check_out_path(out: Path) -> None:
    """OUT must be a file we can write (not a folder, not under a file)."""
    if out.is_dir():
        raise CMGError(f"--out {out} is a folder; give a file name such as {out / 'stream.jsonl'}")
    check_parent_folders(out, "--out")


