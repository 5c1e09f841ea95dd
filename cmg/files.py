"""Writing a file whole or not at all."""

from __future__ import annotations

import os
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
            if isinstance(data, str):
                tmp.write_text(data, encoding="utf-8")
            else:
                tmp.write_bytes(data)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
