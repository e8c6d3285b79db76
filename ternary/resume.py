"""Work kept beside an output while a long job runs, so that running the same command again
after an interruption (Ctrl-C, SIGTERM, a crash, out of memory, a time limit) resumes it.

A store is a folder beside the output (:func:`store_path`) holding ``run.json``, the record of
what the job is (its source file's identity, the torch and pack versions, and every setting
its result depends on), and one
file per finished piece of the job (``KEY.safetensors``, digest-checked and written
atomically by ternary/integrity.write_checked). A rerun with other settings is refused with
the settings that differ named. Pieces finish in order, so a store holds the first pieces of
the job: a piece whose digest fails is reported and computed again, with every piece after it.
The job removes the store once its output is complete; after a failure it stays. A job holds
the store's lock (ternary/lock.py) from :meth:`ResumeStore.begin` until it closes or removes
it, so a second job for the same output is refused. Nothing here knows what the pieces are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from .atomic import NAME_MAX, write_json_atomic
from .integrity import DamagedFileError, read_checked, write_checked
from .lock import LOCK, WorkLock

RECORD = "run.json"
FORMAT = "ternary-flux-resume"
VERSION = 1
PIECE = ".safetensors"
PACK_VERSION = "0.1.0"  # pyproject.toml's (tests/test_resume.py keeps them equal)
START_OVER = "delete that folder to start over"  # a caller with a flag for it says so instead


class ResumeError(ValueError):
    """A store that cannot be resumed as asked (other settings, not a store); the message says
    what differs and how to start over."""


def store_path(output: str | os.PathLike, job: str) -> Path:
    """The store of ``job`` for ``output``: ``OUTPUT.JOB-partial`` beside it (a digest of the
    output's name instead when that name would be too long for the file system)."""
    output = Path(output)
    name = f"{output.name}.{job}-partial"
    if len(name.encode()) > NAME_MAX:
        name = f"{hashlib.sha256(output.name.encode()).hexdigest()[:24]}.{job}-partial"
    return output.with_name(name)


def is_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a store (its record written: at least one finished piece)."""
    return (Path(path) / RECORD).is_file()


def file_identity(path: str | os.PathLike) -> dict[str, object]:
    """What tells a source file from another, or from itself once changed, cheaply: its
    resolved path, size, mtime (a file swapped in with both kept is found by the digests of
    the job's pieces, which the caller checks)."""
    path = Path(path)
    stat = path.stat()
    return {
        "name": path.name,
        "path": str(path.resolve()),
        "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }


def _differences(old: Mapping, new: Mapping) -> list[str]:
    """'KEY OLD there, NEW now' for every setting that differs; a nested one is named with the
    entries that differ in it ('source differs (mtime_ns)': the file was changed or touched)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            inner = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            out.append(f"{key} differs ({', '.join(inner)})")
        elif isinstance(a, dict | list) or isinstance(b, dict | list):
            out.append(f"{key} differs")
        else:
            out.append(f"{key} {a!r} there, {b!r} now")
    return out


class ResumeStore:
    """The store of one job at ``path``; ``identity`` names the job's source (for instance
    :func:`file_identity`). ``restart``: discard what a store holds instead of resuming it.
    ``log`` receives the lines a user should see (a damaged piece computed again).
    ``start_over``: how a refusal tells the user to start over (the caller knows its flag)."""

    def __init__(
        self,
        path: str | os.PathLike,
        identity: Mapping[str, object],
        restart: bool = False,
        log: Callable[[str], None] | None = None,
        start_over: str = START_OVER,
    ) -> None:
        self.path = Path(path)
        self.start_over = start_over
        self.identity = dict(identity)
        self.restart = restart
        self.log = log or (lambda _line: None)
        self._record: dict | None = None
        self._written = False
        self._discard = False  # restart: the old store goes at the first put
        self._lock: WorkLock | None = None

    def _piece(self, key: str) -> Path:
        return self.path / f"{key}{PIECE}"

    def _saved_record(self) -> dict | None:
        """The record of the store on disk; None when there is no store (or an empty folder)."""
        if not self.path.exists():
            return None
        if not self.path.is_dir():
            raise ResumeError(f"{self.path} is in the way of the resume store; move it away")
        record = self.path / RECORD
        if not record.exists():
            if any(p.name != LOCK for p in self.path.iterdir()):
                raise ResumeError(
                    f"{self.path} is a folder, but not a resume store of this pack (no {RECORD}); "
                    "move it away"
                )
            return None
        try:
            saved = json.loads(record.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            if self.restart:  # to be discarded: what it held does not matter
                return {}
            raise ResumeError(f"{record} is damaged ({str(err)[:80]}); {self.start_over}") from None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ResumeError(f"{record} is not a resume record of this pack; move it away")
        if saved.get("version") != VERSION and not self.restart:
            raise ResumeError(
                f"{record} is of resume store version {saved.get('version')}, this pack reads "
                f"version {VERSION}; {self.start_over}"
            )
        return saved

    def begin(self, settings: Mapping[str, object], keys: Sequence[str]) -> int:
        """Open the store for a job of these ``settings`` (JSON values) and pieces ``keys`` (in
        the job's order); returns how many of the first pieces are done and intact. Refuses a
        store of other settings (ResumeError) before any work is done. With ``restart`` an old
        store (whatever its record holds) is discarded only at the first :meth:`put`, so that a
        job refused after ``begin`` leaves it as it was."""
        record = {
            "format": FORMAT,
            "version": VERSION,
            "source": self.identity,
            "torch": torch.__version__,  # pieces made by another torch or pack may differ
            "pack": PACK_VERSION,
            **settings,
        }
        record = json.loads(json.dumps(record))  # tuples as lists, as read back
        if self.path.exists() and not self.path.is_dir():
            self._saved_record()  # (refuses what is in the way before the lock is made)
        if self._lock is None:
            lock = WorkLock(self.path, "wait for it to finish or stop it")
            lock.__enter__()
            self._lock = lock
        try:
            return self._open(record, keys)
        except BaseException:  # refused: the lock is released, the store left as it was
            self.close()
            raise

    def _open(self, record: dict, keys: Sequence[str]) -> int:
        """:meth:`begin`'s work, with the lock held."""
        saved = self._saved_record()
        self._record = record
        if self.restart:
            self._discard = saved is not None
            return 0
        if saved is None:
            return 0
        differ = _differences(
            {k: v for k, v in saved.items() if k not in ("format", "version")},
            {k: v for k, v in record.items() if k not in ("format", "version")},
        )
        if differ:
            raise ResumeError(
                f"{self.path} holds an interrupted run with other settings ({'; '.join(differ)}); "
                f"rerun with the same settings to resume it, or {self.start_over}"
            )
        self._written = True  # the record is there already
        done = 0
        for key in keys:
            path = self._piece(key)
            if not path.exists():
                break
            try:
                read_checked(path, "resume piece")
            except DamagedFileError as err:
                self.log(f"{err}; computing it again")
                break
            done += 1
        for key in keys[done:]:  # what came after a damaged piece is not trusted
            self._piece(key).unlink(missing_ok=True)
        return done

    def get(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, metadata) of a finished piece, checked again as it is read."""
        try:
            return read_checked(self._piece(key), "resume piece")
        except DamagedFileError as err:
            raise DamagedFileError(f"{err}; run the command again to compute it again") from None

    def put(self, key: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]):
        """Keep a finished piece (the record first, with the store's first piece; an old store
        being restarted is discarded before)."""
        if self._record is None:
            raise RuntimeError("ResumeStore.put before begin")
        if self._discard:
            self._clear()
            self._discard = False
        if not self._written:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path / RECORD, self._record)
            self._written = True
        write_checked(self._piece(key), tensors, metadata)

    def _clear(self) -> None:
        """Delete the store's pieces and the temporaries of interrupted writes, then its record
        (last: an interrupted removal leaves no pieces without a record; anything else in the
        folder is left)."""
        if not self.path.is_dir():
            return
        for path in self.path.iterdir():
            if path.name.endswith((PIECE, ".partial")) and path.is_file():
                path.unlink(missing_ok=True)
        (self.path / RECORD).unlink(missing_ok=True)
        self._written = False

    def close(self) -> None:
        """Release the store's lock and delete its file (the store stays; a folder made only
        for the lock goes)."""
        if self._lock is None:
            return
        self._lock.__exit__(None, None, None)
        self._lock = None
        (self.path / LOCK).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.path.rmdir()

    def remove(self) -> None:
        """Delete the store (:meth:`_clear`, then the folder if nothing else is in it) and
        release its lock."""
        self._clear()
        self.close()
        with contextlib.suppress(OSError):
            self.path.rmdir()
