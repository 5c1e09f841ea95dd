"""Locks that keep a second process off an output another one is writing."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cmg.errors import CMGError

READER_PATIENCE_S = 0.5  # how long a reader retries a refused shared lock before it believes it
# A run folder's readers (eval, export, build) say this when `cmg train` holds it, and a data
# folder's (train, eval, int8 calibration) when `cmg data synth` does
RUN_BEING_TRAINED = ("--run {run} is being trained (`cmg train`, pid {{pid}}, lock {{lock}}): use it when the "
                     "training ends")
DATA_BEING_WRITTEN = ("data folder {data} is being written by `cmg data synth` (pid {{pid}}, lock {{lock}}): use "
                      "it when that ends")


class OutputLock:
    """One writer per output (a stream's file, a training's run folder): an OS lock
    (fcntl.flock) on a lock file, held for the writer's life.

    Why a sibling (`.OUT.lock`) and not OUT itself: `--retry-errors` replaces OUT by a
    rename, and a lock on the old inode would not stop a writer that opens the new one.
    The holder writes its pid into the lock file so a refused stream can name it. The
    kernel drops the lock when the holder dies however it dies (SIGKILL too), so a stale
    lock file never blocks anyone. A folder (`folder=True`, a training's run: existing or
    not yet) has its sibling too (`.RUN.cmg-lock`), so every writer on any host or temporary folder that sees
    the folder sees the lock (its parent must exist). Other OUT that is not a regular file
    (/dev/full, a FIFO) has its lock in the account's own folder under the temporary folder
    (`cmg-locks-UID`, mode 0700), keyed by OUT's resolved path: a folder shared by every
    account let one plant a link there that another's lock then truncated. A lock file is
    never opened through a symbolic link.
    """

    def __init__(self, out: Path, folder: bool = False, refusal: str | None = None, shared: bool = False) -> None:
        """`refusal`: the error when another process holds it, formatted with {pid} and {lock}
        (default: OUT is being written by another process). `shared`: a reader's lock, which
        any number of readers hold together and a writer's (exclusive) one refuses."""
        self.out = out = Path(out)
        self.refusal, self.shared = refusal, shared
        real = out.resolve()  # a link to OUT, `./OUT/` or `x/../OUT` is OUT, with OUT's lock
        if not folder and out.exists() and not out.is_file():
            key = hashlib.sha256(str(real).encode()).hexdigest()[:16]
            self.path = private_lock_dir() / f"{key}.lock"
        elif folder:  # not `.NAME.lock`: the name filelock users (our tests too) give their own locks
            self.path = real.with_name(f".{real.name}.cmg-lock")
        else:
            self.path = real.with_name(f".{real.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        """Take the lock or raise CMGError naming the holder's pid; never waits."""
        import fcntl  # POSIX-only: the module stays importable where fcntl is missing

        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A reader may meet the last reader's release, which holds the lock alone for a moment
        # to remove the file: it tries again for a while before it calls that a writer.
        patience = time.monotonic() + (READER_PATIENCE_S if self.shared else 0.0)
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if time.monotonic() < patience:
                    time.sleep(0.01)
                    continue
                if self.refusal:  # replace, not format: a path may hold braces
                    raise CMGError(self.refusal.replace("{pid}", holder).replace("{lock}", str(self.path))) from None
                raise CMGError(f"--out {self.out} is being written by another process (pid {holder}, lock "
                               f"{self.path}): one writer at a time; wait for it to end or choose another --out") from None
            except OSError:  # no locks on this file system (NFS without lockd): said by the caller
                os.close(fd)
                raise
            try:  # the holder before us may have removed the file between our open and flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                if not self.shared:  # readers leave it empty: no writer to name while they hold it
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fd = fd
                return self
            os.close(fd)

    def _open(self) -> int:
        """The lock file, never through a link; a reader opens it read-only (another account's
        writer made it 0644) and makes it only where it is not there."""
        flags = os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            if self.shared:
                try:
                    return os.open(self.path, os.O_RDONLY | flags)
                except FileNotFoundError:
                    return os.open(self.path, os.O_RDONLY | os.O_CREAT | flags, 0o644)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | flags, 0o644)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise CMGError(f"lock file {self.path} is a symbolic link: a lock is never taken through "
                           "one (remove it if you made it)") from None

    def release(self) -> None:
        """Remove the lock file while still holding it, then let go (a reader only when it is
        the last: an exclusive lock taken at once says so)."""
        import fcntl

        if self._fd is None:
            return
        last = True
        if self.shared:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                last = False
        if last:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def private_lock_dir() -> Path:
    """This account's own lock folder (0700, its own, no link; refused otherwise): under
    XDG_RUNTIME_DIR, the session's private folder, where there is one (no other account can
    take the name there), else TMPDIR/cmg-locks-UID."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and Path(runtime).is_dir() else Path(tempfile.gettempdir())
    locks = base / f"cmg-locks-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        locks.mkdir(mode=0o700)
    st = os.lstat(locks)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise CMGError(f"lock folder {locks} is not this account's own folder (a link, another owner, or "
                       "open to other accounts): remove it, and it is made again, or set TMPDIR to a folder "
                       "of your own")
    return locks


@contextlib.contextmanager
def writing(out: Path, refusal: str) -> Iterator[bool]:
    """A writer's lock on the folder `out` (refused, naming its holder, while another writer
    or a reader holds it) wherever one can be made: its lock file sits beside OUT, so where
    that folder cannot be written (a read-only parent, OUT a mount point) it writes without
    one and yields False, for the caller to say so."""
    lock = OutputLock(out, folder=True, refusal=refusal)
    with contextlib.suppress(OSError):  # made now, as writing OUT would make it
        lock.path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(lock.path.parent, os.W_OK):
        yield False
        return
    with lock:
        yield True


@contextlib.contextmanager
def reading(folder: Path, refusal: str) -> Iterator[None]:
    """A reader's lock on `folder` (shared with other readers, refused while a writer holds
    it) for as long as it reads; where no lock file can be made beside it (a read-only
    mount) it reads without one, as any reader could; a folder that is not there has none
    (the reader says so, and no folder is made for its lock)."""
    if not Path(folder).is_dir():
        yield
        return
    lock: OutputLock | None = OutputLock(folder, folder=True, refusal=refusal, shared=True)
    try:
        lock.acquire()
    except OSError:  # a read-only mount, no room for the file, no locks there: read as any reader could
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
