"""Rewrites by rename (cmg.files.write_atomic, the stream's --retry-errors rewrite) keep the
file's permissions."""

from __future__ import annotations

import json
import os

from cmg.files import write_atomic
from cmg_clients.output import replace_lines


def test_an_atomic_rewrite_keeps_the_files_permissions(tmp_path):
    """A user's 0600 checkpoint or stream output had become the umask's 0644 after a rewrite."""
    record = tmp_path / "metrics.json"
    write_atomic(record, "{}")
    os.chmod(record, 0o600)
    write_atomic(record, '{"a": 1}')
    assert (record.stat().st_mode & 0o777) == 0o600 and record.read_text() == '{"a": 1}'

    out = tmp_path / "cam1.jsonl"
    out.write_text("".join(json.dumps({"seq": i, "error": "x"}) + "\n" for i in range(3)))
    os.chmod(out, 0o640)
    replace_lines(out, {1: {"seq": 1, "score": 0.5}})
    assert (out.stat().st_mode & 0o777) == 0o640
    assert [json.loads(line).get("score") for line in out.read_text().splitlines()] == [None, 0.5, None]
