"""cmg/quiet.py: third-party log lines silenced for one call, the caller's own level restored."""

from __future__ import annotations

import logging

import pytest

from cmg.quiet import quiet_logs


def test_quiet_logs_restores_the_outer_level_even_on_error(caplog):
    log = logging.getLogger("third_party")
    before = logging.root.manager.disable
    try:
        with quiet_logs(logging.ERROR):
            with quiet_logs(logging.WARNING):  # an inner, milder call must not unsilence errors
                log.error("inner")
            log.error("outer")
            with pytest.raises(RuntimeError), quiet_logs(logging.WARNING):
                raise RuntimeError("a failed load")
            assert logging.root.manager.disable == logging.ERROR
        with quiet_logs(logging.WARNING, on=False):
            log.warning("kept")
        assert logging.root.manager.disable == before
    finally:
        logging.disable(before)
    assert [r.getMessage() for r in caplog.records] == ["kept"]
