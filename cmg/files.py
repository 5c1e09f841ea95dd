"""Writing a file (or a folder) whole or not at all."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from cmg.errors import naming


def write_atomic(path: Path, data: str | bytes | memoryview) -> Path:
    """`data` into `path` through a hidden temporary file beside it, renamed over `path`: a
    kill or a full disk mid-write leaves the old file (a torn report or record had blocked
    the next run); an OSError names `path`."""
    write_atomic_all([(Path(path), data)])
    return Path(path)


def write_atomic_all(files: list[tuple[Path, str | bytes | memoryview]]) -> None:
    """Several files as write_atomic writes one, renamed into place only once all are written,
    in the order given (the file the others describe last): a kill or a full disk while
    writing leaves every old file, not new ones beside old."""
    staged = [(Path(path), Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}"), data)
              for path, data in files]
    try:
        for path, tmp, data in staged:
            with naming(path), tmp.open("wb") as f:
                keep_mode(path, tmp)  # before the data: the new bytes are never readable beyond the old file's
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        for path, tmp, _ in staged:
            with naming(path):
                os.replace(tmp, path)
    finally:
        for _, tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def keep_mode(path: Path, tmp: Path) -> None:
    """Give `tmp` (just made, still empty) the permission bits of the `path` it is about to
    replace: a rewrite by rename had turned a user's 0600 output or checkpoint into the
    umask's 0644."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    with contextlib.suppress(FileNotFoundError):  # nothing made (a failing disk): the write says why
        os.chmod(tmp, stat.S_IMODE(mode))


def swap_in(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` (an export, a repository) at `out` in one step: an atomic
    exchange of the two folders (Linux renameat2 RENAME_EXCHANGE) when `out` exists, then the
    old one goes; a plain rename when it does not. A kill at any point leaves the old or the
    new folder at `out`, never a mix (and at worst a stray hidden `.OUT.tmp-*` beside it)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None and renameat2(at_fdcwd, os.fsencode(tmp), at_fdcwd, os.fsencode(out),
                                           rename_exchange) == 0:
        shutil.rmtree(tmp)  # now holds the old folder
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")  # no exchange here: two renames
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(out: Path, copy: bool = False) -> Iterator[Path]:
    """A hidden folder beside `out` to write into (`copy`: starting as a copy of `out`, where it
    exists), put in its place whole (swap_in) when the block ends and removed when it raises:
    a failed or interrupted writer never leaves its folder half-written over a good one."""
    stage = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    if copy and out.is_dir():
        shutil.copytree(out, stage, symlinks=True)
    else:
        stage.mkdir()
    try:
        yield stage
        swap_in(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
