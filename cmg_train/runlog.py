"""RUN/train_log.jsonl: one JSON line per training event, appended by every stage."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def run_folder(out: Path) -> Iterator[Path]:
    """The run folder `cmg train` writes, changed only by a training that succeeds.

    Yields the path the training log goes to while training (a hidden partial file). On
    success it becomes RUN/train_log.jsonl and the run's stale export (RUN/onnx, made
    from the checkpoint just replaced) is removed. On failure (any exception, Ctrl-C) the
    partial log goes, an existing run keeps its train_log.jsonl, and a folder this call
    created is removed again rather than left holding only a log.
    """
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f".train_log.jsonl.partial-{os.getpid()}"
    partial.write_text("")
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    os.replace(partial, out / "train_log.jsonl")
    stale = out / "onnx"
    if stale.is_dir():
        shutil.rmtree(stale)
