"""The one error type the command line turns into a one-line message and a non-zero exit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


class CMGError(RuntimeError):
    """Bad input or a missing prerequisite; the message says what and where.

    `details` (optional, several lines, e.g. the server log lines naming a failing model)
    are printed before the one-line message, which stays the last line.
    """

    def __init__(self, message: str, details: str | None = None) -> None:
        super().__init__(message)
        self.details = details


def check_parent_folders(path, flag: str) -> None:
    """The nearest existing ancestor of `path` must be a folder (else `flag path` could never
    be created): one line naming the file in the way, before any work starts."""
    for parent in Path(path).parents:
        if parent.exists():
            if not parent.is_dir():
                raise CMGError(f"{flag} {path}: {parent} is a file, not a folder")
            return


@contextlib.contextmanager
def naming(path: object) -> Iterator[None]:
    """Re-raise an OSError that names no file (a write failing with `[Errno 28] No space
    left on device` names none) with `path` as its file, so the one-line error says where."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
