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


def test_the_new_bytes_are_never_readable_beyond_the_old_files_mode(tmp_path, monkeypatch):
    """The permission bits were copied after the data was written: for a moment the new
    content of a 0600 file sat in a 0644 temporary file."""
    import cmg.files as files

    record = tmp_path / "metrics.json"
    record.write_text("{}")
    os.chmod(record, 0o600)
    seen = []
    real_replace = os.replace

    def spying_replace(src, dst):
        seen.append(os.stat(src).st_mode & 0o777)
        return real_replace(src, dst)

    real_keep = files.keep_mode

    def spying_keep(path, tmp):
        seen.append(os.stat(tmp).st_size)  # still empty when its mode is set
        return real_keep(path, tmp)

    monkeypatch.setattr(files, "keep_mode", spying_keep)
    monkeypatch.setattr(files.os, "replace", spying_replace)
    write_atomic(record, '{"secret": 1}')
    assert seen == [0, 0o600]


def test_captions_replaced_with_force_keep_their_mode(tmp_path):
    from cmg_train.captions import write_captions

    path = write_captions(tmp_path, {"train/good/000.png": "a nut"})
    os.chmod(path, 0o600)
    write_captions(tmp_path, {"train/good/000.png": "a bolt"}, force=True)
    assert (path.stat().st_mode & 0o777) == 0o600 and "a bolt" in path.read_text()


def test_write_atomic_writes_utf8(tmp_path):
    path = write_atomic(tmp_path / "a.txt", "ø µ 部品")
    assert path.read_text(encoding="utf-8") == "ø µ 部品"
