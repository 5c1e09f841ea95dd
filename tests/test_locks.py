"""cmg.locks: one writer per output, and nothing another account planted is followed."""

from __future__ import annotations

import os
import tempfile

import pytest

from cmg.errors import CMGError
from cmg.locks import OutputLock, private_lock_dir


@pytest.fixture
def tmpdir_here(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return tmp_path


def test_the_sessions_private_folder_is_preferred(tmp_path, monkeypatch):
    """Under XDG_RUNTIME_DIR no other account can take the folder's name first."""
    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert private_lock_dir() == runtime / f"cmg-locks-{os.getuid()}"


def test_a_non_file_outputs_lock_is_in_the_accounts_own_folder(tmpdir_here):
    with OutputLock("/dev/null") as held:
        folder = held.path.parent
        assert folder == tmpdir_here / f"cmg-locks-{os.getuid()}" and (folder.stat().st_mode & 0o777) == 0o700
        with pytest.raises(CMGError, match="being written by another process"):
            OutputLock("/dev/null").acquire()
    with OutputLock("/dev/null"):
        pass


def test_a_lock_is_never_taken_through_a_planted_link(tmpdir_here):
    """A link planted where the lock goes had the lock's holder truncate its target."""
    victim = tmpdir_here / "victim.txt"
    victim.write_text("IMPORTANT DATA")
    lock = OutputLock("/dev/null")
    lock.path.symlink_to(victim)
    with pytest.raises(CMGError, match="is a symbolic link"):
        lock.acquire()
    out = tmpdir_here / "out.jsonl"
    (tmpdir_here / ".out.jsonl.lock").symlink_to(victim)  # a regular file's sibling lock too
    with pytest.raises(CMGError, match="is a symbolic link"):
        OutputLock(out).acquire()
    assert victim.read_text() == "IMPORTANT DATA"


@pytest.mark.parametrize("planted", ["link", "open"])
def test_a_lock_folder_that_is_not_the_accounts_own_is_refused(tmpdir_here, planted):
    folder = tmpdir_here / f"cmg-locks-{os.getuid()}"
    if planted == "link":
        (tmpdir_here / "elsewhere").mkdir()
        folder.symlink_to(tmpdir_here / "elsewhere")
    else:
        folder.mkdir(mode=0o700)
        folder.chmod(0o1777)  # as the shared folder of earlier versions was
    with pytest.raises(CMGError, match="not this account's own folder"):
        private_lock_dir()


def _own_tmp(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)


def test_a_lock_folder_others_can_read_is_refused(tmp_path, monkeypatch):
    _own_tmp(tmp_path, monkeypatch)
    folder = tmp_path / f"cmg-locks-{os.getuid()}"
    folder.mkdir()
    folder.chmod(0o750)
    with pytest.raises(CMGError, match="not this account's own folder"):
        private_lock_dir()


def test_a_lock_folder_that_is_a_link_is_refused_even_to_a_private_folder(tmp_path, monkeypatch):
    _own_tmp(tmp_path, monkeypatch)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / f"cmg-locks-{os.getuid()}").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CMGError, match="not this account's own folder"):
        private_lock_dir()


def test_a_lock_folder_of_another_account_is_refused(tmp_path, monkeypatch):
    import cmg.locks as locks

    _own_tmp(tmp_path, monkeypatch)
    folder = tmp_path / f"cmg-locks-{os.getuid()}"
    folder.mkdir(mode=0o700)
    real = os.lstat

    def other_owner(path, *args, **kwargs):
        st = real(path, *args, **kwargs)
        if os.fspath(path) == os.fspath(folder):
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, os.getuid() + 1, *st[5:10]))
        return st

    monkeypatch.setattr(locks.os, "lstat", other_owner)
    with pytest.raises(CMGError, match="not this account's own folder"):
        private_lock_dir()


def test_a_lock_folder_that_is_a_file_is_refused(tmp_path, monkeypatch):
    _own_tmp(tmp_path, monkeypatch)
    folder = tmp_path / f"cmg-locks-{os.getuid()}"
    folder.write_text("")
    folder.chmod(0o600)
    with pytest.raises(CMGError, match="not this account's own folder"):
        private_lock_dir()


def test_a_link_or_another_spelling_of_an_output_takes_the_outputs_own_lock(tmp_path):
    """The lock was named after OUT as typed: a second `cmg stream --out link.jsonl` (a link to
    the file being written) or `cmg train --out runlink` wrote beside the first, torn lines and
    a removed run folder."""
    (tmp_path / "line.jsonl").write_text("")
    (tmp_path / "link.jsonl").symlink_to("line.jsonl")
    (tmp_path / "run").mkdir()
    (tmp_path / "runlink").symlink_to("run")
    (tmp_path / "sub").mkdir()
    for out, other, folder in [("line.jsonl", "link.jsonl", False), ("run", "runlink", True),
                               ("run", "sub/../run", True)]:  # (the last held before too: the kernel resolves ..)
        with OutputLock(tmp_path / out, folder=folder), pytest.raises(CMGError, match="being written"):
            OutputLock(tmp_path / other, folder=folder).acquire()


def test_readers_share_a_lock_that_a_writer_refuses_and_the_last_reader_removes(tmp_path):
    """`cmg train` reading a data folder, `cmg eval` a run, a server loading a repository:
    any number at once, none while `cmg data synth`, `cmg train` or `cmg build` writes it."""
    from cmg.locks import reading

    data = tmp_path / "data"
    data.mkdir()
    with reading(data, refusal="written by {pid}"), reading(data, refusal="written by {pid}"):
        with pytest.raises(CMGError, match="being written by another process"):
            OutputLock(data, folder=True).acquire()
        lock_file = tmp_path / ".data.cmg-lock"
        assert lock_file.exists()
    assert not lock_file.exists()  # the last reader out removes it
    with OutputLock(data, folder=True), pytest.raises(CMGError, match=f"written by {os.getpid()}"), \
            reading(data, refusal="written by {pid}"):
        pass
    with reading(tmp_path / "missing", refusal="-"):  # nothing to read: no lock, and no folder made for one
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_reader_meeting_the_last_readers_release_is_not_refused(tmp_path, monkeypatch):
    """The last reader out holds the lock alone for a moment to remove its file: a reader
    starting then (two servers on one repository, two trainings on one folder) was refused
    as if a writer held it."""
    import threading

    import cmg.locks as locks

    data = tmp_path / "data"
    data.mkdir()
    first = OutputLock(data, folder=True, shared=True).acquire()
    second = OutputLock(data, folder=True, shared=True)
    said: list[object] = []
    unlink = os.unlink

    def slow_unlink(path, *args, **kwargs):  # the second reader arrives inside the release
        thread = threading.Thread(target=lambda: said.append(_try(second.acquire)))
        thread.start()
        thread.join(0.1)
        unlink(path, *args, **kwargs)
        monkeypatch.setattr(locks.os, "unlink", unlink)

    monkeypatch.setattr(locks.os, "unlink", slow_unlink)
    first.release()
    for _ in range(100):
        if said:
            break
        threading.Event().wait(0.01)
    assert said == [second], said
    second.release()


def _try(call):
    try:
        return call()
    except CMGError as exc:
        return exc
