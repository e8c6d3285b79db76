"""One process at a time in a folder: a training run's work folder (distill/), a resume
store (ternary/resume.py). The lock is the system's advisory lock on ``FOLDER/lock``, which
it releases when its process dies, however it dies; the file holds the PID, to name it."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from .atomic import naming_errors, pid_alive

LOCK = "lock"
ADVICE = "wait for it to finish, stop it, or use another work folder"

try:  # an advisory lock the system releases when its process dies, however it dies
    import fcntl

    def _try_lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

except ModuleNotFoundError:  # Windows
    import msvcrt

    _LOCK_OFFSET = 1 << 30  # a byte past the PID, so that the PID stays readable

    def _try_lock(fd: int) -> None:
        os.lseek(fd, _LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

    def _unlock(fd: int) -> None:
        os.lseek(fd, _LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


class WorkDirBusy(ValueError):
    """Another live process is using the folder; the message names it."""


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class WorkLock:
    """An exclusive lock on a work folder: the file ``<work>/lock`` holding the PID of the
    process that uses the folder. A second process is refused (:class:`WorkDirBusy`); the
    lock of a process that died (SIGKILL, power loss) is taken over, and ``stale_pid`` says
    whose it was. Use as a context manager."""

    def __init__(self, work_dir: str | os.PathLike, advice: str = ADVICE) -> None:
        self.path = Path(work_dir) / LOCK
        self.advice = advice
        self.stale_pid: int | None = None
        self._fd: int | None = None

    def _open_locked(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _try_lock(fd)
        except OSError as err:
            holder = _read_pid(fd)
            unsupported = err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
            if unsupported and not (pid_alive(holder) and holder != os.getpid()):
                return fd  # a file system without locks: the PID in the file is the lock
            os.close(fd)
            if not unsupported and err.errno not in (
                errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK
            ):  # fmt: skip
                raise
            who = f"process {holder}" if holder else "another process"
            raise WorkDirBusy(
                f"{self.path.parent} is in use by {who} (lock file {self.path}); {self.advice}"
            ) from None
        return fd

    def check_free(self) -> None:
        """Raise WorkDirBusy if a live process holds the lock (without taking it)."""
        if self.path.parent.is_dir():
            fd = self._open_locked()
            with contextlib.suppress(OSError):
                _unlock(fd)
            os.close(fd)

    def __enter__(self) -> WorkLock:
        with naming_errors(self.path):
            fd = self._open_locked()
            previous = _read_pid(fd)
            if previous is not None and previous != os.getpid():
                self.stale_pid = previous  # it held the folder and is gone without releasing it
            try:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, f"{os.getpid()}\n".encode())
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # released: nothing stale for the next run to report
            with contextlib.suppress(OSError):  # a file system without locks
                _unlock(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None
