"""Silence third-party log lines for one call, restoring whatever was silenced before."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_logs(level: int = logging.WARNING, on: bool = True) -> Iterator[None]:
    """Drop log records at `level` and below while `on`: open_clip, the hub and ONNX Runtime's
    quantizer log through the root logger lines users read as their own mistake, and each
    caller says the one line that matters itself. Nested uses restore the outer level; the
    level is global, so it is put back only if nobody changed it meanwhile (two threads' calls
    that end out of order must not leave logging silenced)."""
    before = logging.root.manager.disable
    if not on:
        yield
        return
    mine = max(level, before)
    logging.disable(mine)
    try:
        yield
    finally:
        if logging.root.manager.disable == mine:
            logging.disable(before)
