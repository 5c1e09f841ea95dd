"""RUN/train_log.jsonl: one JSON line per training event, appended by every stage."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from cmg.errors import CMGError, check_parent_folders
from cmg.locks import OutputLock


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


# What a run folder holds: `cmg train`'s files, `cmg eval`'s eval/, `cmg export`'s onnx/, the
# benches' record of a training; hidden names are the temporary files of killed writers.
RUN_ENTRIES = {"checkpoint.pt", "config.yaml", "metrics.json", "train_log.jsonl", "eval", "onnx", "bench_train.json"}
PARTIAL_LOG = ".train_log.jsonl.partial-"


def foreign_entries(out: Path) -> list[str]:
    """What an existing `--out` holds besides a run's own files (training must not mix in)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name not in RUN_ENTRIES and not p.name.startswith("."))


@contextlib.contextmanager
def run_folder(out: Path) -> Iterator[Path]:
    """The run folder `cmg train` writes, changed only by a training that succeeds.

    Yields the path the training log goes to while training (a hidden partial file). On
    success it becomes RUN/train_log.jsonl and the run's stale export (RUN/onnx, made
    from the checkpoint just replaced) is removed. On failure (any exception, Ctrl-C) the
    partial log goes, an existing run keeps its train_log.jsonl, and the folders this call
    created are removed again rather than left holding only a log. One training at a time
    per folder (a lock: a second one exits 2 naming the first's pid), since a failing one
    removes what it created; and only into a new or empty folder or a run folder, since
    training writes its files among whatever is there.
    """
    out = Path(out)
    check_parent_folders(out, "--out")
    if out.exists() and not out.is_dir():
        raise CMGError(f"--out {out} is a file, not a folder")
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise CMGError(f"--out {out} holds files that are not a training run's ({shown}): "
                       "train into a new or empty folder, or into a run folder to replace that run")
    if (out / "checkpoint.pt").is_file():  # said before the minutes of training, not after
        print(f"cmg train: {out} holds a run; this training replaces it (its export and eval reports "
              "go with it) when it succeeds", file=sys.stderr)
    created = [d for d in (out, *out.parents) if not d.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)  # the lock file sits beside the run
    try:
        with OutputLock(out, folder=True, refusal=f"--out {out} is in use: another `cmg train` writes it (pid "
                        "{pid}) or a `cmg eval` reads it (lock {lock}); wait for it to end"):
            out.mkdir(exist_ok=True)
            for stale in out.glob(PARTIAL_LOG + "*"):  # a killed training's (the lock says none runs)
                stale.unlink(missing_ok=True)
            partial = out / f"{PARTIAL_LOG}{os.getpid()}"
            partial.write_text("")
            try:
                yield partial
            except BaseException:
                partial.unlink(missing_ok=True)
                if out in created:
                    shutil.rmtree(out, ignore_errors=True)
                raise
            os.replace(partial, out / "train_log.jsonl")
            stale = out / "onnx"
            if (stale / "export.json").is_file():  # `cmg export`'s, of the checkpoint just replaced
                shutil.rmtree(stale)
            if (out / "eval").is_dir():  # `cmg eval`'s reports and pictures of that checkpoint
                shutil.rmtree(out / "eval")
    except BaseException:
        if out in created:
            for parent in created[1:]:  # innermost first; only while empty (the lock file is gone)
                with contextlib.suppress(OSError):
                    parent.rmdir()
        raise
