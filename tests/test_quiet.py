"""cmg/quiet.py: third-party log lines silenced for one call, the caller's own level restored."""

from __future__ import annotations

import logging

import pytest

from cmg.quiet import quiet_logs


def test_quiet_logs_restores_the_outer_level_even_on_error(caplog):
    log = logging.getLogger("cmg_test_third_party")
    before = logging.root.manager.disable  # what the session's other tests and libraries left
    try:
        logging.disable(logging.NOTSET)
        with caplog.at_level(logging.INFO, logger=log.name):  # whatever level the root logger was left at
            with quiet_logs(logging.ERROR):
                with quiet_logs(logging.WARNING):  # an inner, milder call must not unsilence errors
                    log.error("inner")
                log.error("outer")
                with pytest.raises(RuntimeError), quiet_logs(logging.WARNING):
                    raise RuntimeError("a failed load")
                assert logging.root.manager.disable == logging.ERROR
            with quiet_logs(logging.WARNING, on=False):
                log.warning("kept")
            assert logging.root.manager.disable == logging.NOTSET
    finally:
        logging.disable(before)
    assert [r.getMessage() for r in caplog.records if r.name == log.name] == ["kept"]


def test_two_threads_whose_quiet_calls_end_out_of_order_leave_logging_on():
    """The level is one global: calls that end in the order they began (A, B, then A, B) had
    put back B's 'before', which was A's silence."""
    before = logging.root.manager.disable
    try:
        logging.disable(logging.NOTSET)
        a, b = quiet_logs(logging.WARNING), quiet_logs(logging.WARNING)
        a.__enter__()
        b.__enter__()
        a.__exit__(None, None, None)
        b.__exit__(None, None, None)
        assert logging.root.manager.disable == logging.NOTSET
    finally:
        logging.disable(before)
