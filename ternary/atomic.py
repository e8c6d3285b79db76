"""The one atomic writer: a file appears under its name only once it is complete.

A write goes to a temporary file beside the target (``.NAME.PID.partial``) and is renamed
over the target at the end; a failed or interrupted write (an exception, Ctrl-C, SIGTERM
through the command line's handler) removes it. A process killed outright (SIGKILL, power
loss) cannot remove its temporary file, so every write first deletes the stale temporaries
that dead processes left for the same target. Errors of the file system while writing
(disk full, read-only folder, permissions) name the target, not the temporary file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows file systems
_SUFFIX = ".partial"


def _temp_stem(name: str) -> str:
    """The temporary names' common part: the target's name, or its digest when a long name
    would make the temporary name too long for the file system."""
    if len(f".{name}.4294967295{_SUFFIX}".encode()) <= NAME_MAX:
        return f".{name}"
    return f".{hashlib.sha256(name.encode()).hexdigest()[:24]}"


def temp_path(path: Path, pid: int | None = None) -> Path:
    """Where a write of ``path`` by process ``pid`` (this one) lives until it is complete."""
    return path.with_name(f"{_temp_stem(path.name)}.{pid or os.getpid()}{_SUFFIX}")


def pid_alive(pid: object) -> bool:
    """Whether a process of this id runs on this machine (False for anything but an id)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporary files of ``path`` that dead processes left; returns them."""
    stem = _temp_stem(path.name)
    removed = []
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.glob(f"{glob_escape(stem)}.*{_SUFFIX}"):
        pid = candidate.name[len(stem) + 1 : -len(_SUFFIX)]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def glob_escape(text: str) -> str:
    """``text`` with glob metacharacters escaped."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def check_target(path: Path, overwrite: bool) -> None:
    """Refuse a target that cannot or must not be written, before any work is done."""
    if len(path.name.encode()) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, f"file name longer than {NAME_MAX} bytes", str(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or allow overwriting")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the folder that the write would create the rest in
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "is not a folder", str(folder))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "folder is not writable", str(folder))


@contextmanager
def naming_errors(path: str | os.PathLike, temporary: str | os.PathLike | None = None):
    """Let the file system errors raised inside name ``path``: errors of writes name no file
    (ENOSPC, EIO), errors of opening the temporary file name that one."""
    try:
        yield
    except OSError as err:
        unnamed = err.filename is None or (
            temporary is not None and str(err.filename) == str(temporary)
        )
        if err.errno is None or not unnamed:
            raise
        raise type(err)(err.errno, err.strerror, str(path)) from None


@contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary name beside ``path``; on success it is renamed over ``path``.

    With ``overwrite=False`` an existing ``path`` is refused up front, and a ``path`` that
    appears while writing (another process) is not replaced.
    """
    path = Path(path)
    check_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temp_path(path)
    try:
        with naming_errors(path, tmp):
            yield tmp
            if not overwrite and path.exists():
                raise FileExistsError(f"{path} appeared while writing; not replaced")
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
