"""Writing a file (or a folder) whole or not at all."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from cmg.errors import naming


def write_atomic(path: Path, data: str | bytes | memoryview) -> Path:
    """`data` into `path` through a hidden temporary file beside it, renamed over `path`: a
    kill or a full disk mid-write leaves the old file (a torn report or record had blocked
    the next run); an OSError names `path`."""
    write_atomic_all([(Path(path), data)])
    return Path(path)


def write_atomic_all(files: list[tuple[Path, str | bytes | memoryview]]) -> None:
    """Several files as write_atomic writes one, renamed into place only once all are written,
    in the order given (the file the others describe last): a kill or a full disk while
    writing leaves every old file, not new ones beside old."""
    staged = [(Path(path), Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}"), data)
              for path, data in files]
    try:
        for path, tmp, data in staged:
            with naming(path), tmp.open("wb") as f:
                keep_mode(path, tmp)  # before the data: the new bytes are never readable beyond the old file's
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        for path, tmp, _ in staged:
            with naming(path):
                os.replace(tmp, path)
    finally:
        for _, tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def keep_mode(path: Path, tmp: Path) -> None:
    """Give `tmp` (just made, still empty) the permission bits of the `path` it is about to
    replace: a rewrite by rename had turned a user's 0600 output or checkpoint into the
    umask's 0644."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    with contextlib.suppress(FileNotFoundError):  # nothing made (a failing disk): the write says why
        os.chmod(tmp, stat.S_IMODE(mode))


def _exchange(a: Path, b: Path) -> bool:
    """Exchange two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where
    the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    return renameat2 is not None and renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
                                               rename_exchange) == 0


def _remove_old(path: Path) -> None:
    """Remove what a swap left of the old folder; an interrupt meanwhile is raised once it is
    removed (the new folder is in place either way)."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def swap_in(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` (an export) at `out` in one step: an atomic exchange of
    the two folders when `out` exists, then the old one goes; a plain rename when it does not.
    A kill at any point leaves the old or the new folder at `out`, never a mix (and at worst a
    stray hidden `.OUT.tmp-*` beside it)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):
        _remove_old(tmp)  # now holds the old folder
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")  # no exchange here: two renames
    os.replace(out, old)
    os.replace(tmp, out)
    _remove_old(old)


def _stamps(folder: Path) -> dict[str, tuple]:
    """Each entry's modification times and sizes, a folder's of everything in it (a file
    rewritten in place changes its own time, not its folder's); links not followed."""
    def stamp(path: str) -> tuple:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            return (st.st_mtime_ns, st.st_size)
        return tuple(sorted((os.path.relpath(os.path.join(root, name), path), stamp(os.path.join(root, name)))
                            for root, dirs, files in os.walk(path) for name in files + dirs
                            if not os.path.isdir(os.path.join(root, name)) or os.path.islink(os.path.join(root, name))))
    return {name: stamp(os.path.join(folder, name)) for name in os.listdir(folder)}


def swap_entries(stage: Path, out: Path, last: Sequence[str], copied: dict[str, tuple] | None = None) -> None:
    """Put each entry of `stage` into `out` in one step each (an exchange, or a rename where
    `out` has none), the names in `last` last and in that order (the ensembles after their
    steps, the finished-write mark at the very end, and that mark taken out of `out` first);
    `out` itself stays the same folder, so a server that mounts or watches it sees its models
    change, not its folder replaced and emptied. Entries as they were `copied` from `out` (the
    writer did not touch them) stay as `out` has them now (a server may have rewritten its
    admin key meanwhile). A failure or an interrupt midway puts back what was put in (each
    exchange undone) and raises; only a kill (SIGKILL) between two steps can leave entries of
    two writes, and then without the mark. `stage` then holds the old entries."""
    copied, now = copied or {}, _stamps(stage)
    order = [n for n in sorted(now) if n not in last] + [n for n in last if n in now]
    done: list[tuple[str, str]] = []  # (name, how) to undo
    mark = last[-1]
    try:
        if (out / mark).exists() and mark in now and copied.get(mark) != now[mark]:  # a new mark comes
            os.replace(out / mark, stage / f".old-{mark}")
            done.append((mark, "marked"))
        for name in order:
            if copied.get(name) == now[name]:
                continue
            new, old = stage / name, out / name
            if not (old.exists() or old.is_symlink()):
                os.replace(new, old)
                done.append((name, "added"))
            elif _exchange(new, old):
                done.append((name, "exchanged"))
            else:  # no exchange here: the old entry aside, then the new one in
                os.replace(old, stage / f".old-{name}")
                done.append((name, "aside"))
                os.replace(new, old)
                done[-1] = (name, "replaced")
    except BaseException:
        for name, how in reversed(done):
            with contextlib.suppress(OSError):
                if how == "exchanged":
                    _exchange(stage / name, out / name)
                elif how == "added":
                    os.replace(out / name, stage / name)
                elif how == "replaced":
                    os.replace(out / name, stage / name)
                    os.replace(stage / f".old-{name}", out / name)
                else:  # "aside", "marked"
                    os.replace(stage / f".old-{name}", out / name)
        raise


def can_stage_beside(out: Path) -> bool:
    """Whether a folder for `out` can be written beside it and its entries renamed into it:
    tried with an empty folder (a mount point, even of the same file system, refuses the
    rename; a read-only parent or `out` refuses the folder)."""
    parent = out.parent
    if not os.access(parent, os.W_OK):
        return False
    if not out.exists():
        return True
    probe = parent / f".{out.name}.probe-{os.getpid()}"
    try:
        probe.mkdir()
        os.rename(probe, out / probe.name)
        (out / probe.name).rmdir()
        return True
    except OSError:
        with contextlib.suppress(OSError):
            probe.rmdir()
        return False


@contextlib.contextmanager
def staged_folder(out: Path, copy: bool = False, keep_folder: Sequence[str] | None = None) -> Iterator[Path]:
    """A hidden folder beside `out` to write into (`copy`: starting as a copy of `out`, where it
    exists), put in its place when the block ends and removed when it raises: a failed or
    interrupted writer never leaves its folder half-written over a good one. Whole (swap_in),
    or with `keep_folder` (the names put in last, the last the mark of a finished write)
    entry by entry into the same `out` folder (swap_entries)."""
    stage = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    copied: dict[str, tuple] = {}
    try:
        shutil.rmtree(stage, ignore_errors=True)
        if copy and out.is_dir():
            shutil.copytree(out, stage, symlinks=True)  # times kept: what the writer leaves alone is known
            copied = _stamps(stage)
        else:
            stage.mkdir()
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if keep_folder is not None and out.is_dir():
        swap_entries(stage, out, keep_folder, copied)
        _remove_old(stage)
    else:
        swap_in(stage, out)
