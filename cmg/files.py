"""Writing a file whole or not at all."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from cmg.errors import naming


def write_atomic(path: Path, data: str | bytes | memoryview) -> Path:
    """`data` into `path` through a hidden temporary file beside it, renamed over `path`: a
    kill or a full disk mid-write leaves the old file (a torn report or record had blocked
    the next run); an OSError names `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with naming(path):
            with tmp.open("wb") as f:
                keep_mode(path, tmp)  # before the data: the new bytes are never readable beyond the old file's
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
