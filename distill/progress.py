"""A training job's work folder: ``log.jsonl`` (one JSON object per step or event) and
``status.json`` (the latest state), so a status reader (the Job Status node, ``tail -f``)
can follow a background run, and ``lock`` (ternary/lock.py), which keeps a second process
out of a folder that a run is using."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from ..ternary.atomic import atomic_path, pid_alive, write_json_atomic

LOG = "log.jsonl"
STATUS = "status.json"


class ProgressLog:
    """Appends step records and keeps status.json current (only the main process writes)."""

    def __init__(self, work_dir: Path, total_steps: int, enabled: bool = True) -> None:
        self.work_dir, self.total_steps, self.enabled = work_dir, total_steps, enabled
        self.started = time.time()

    def truncate_after(self, step: int) -> None:
        """Drop step records past ``step`` (a resumed run redoes them)."""
        path = self.work_dir / LOG
        if not self.enabled or not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if _step_of(line) <= step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    def record(self, state: str, **fields) -> None:
        if not self.enabled:
            return
        entry = {"time": round(time.time(), 3), "state": state, **fields}
        with open(self.work_dir / LOG, "a") as f:
            f.write(json.dumps(entry) + "\n")
        status = {
            **entry,
            "total_steps": self.total_steps,
            "pid": os.getpid(),
            "started": round(self.started, 3),
        }
        write_json_atomic(self.work_dir / STATUS, status)


def _step_of(line: str) -> float:
    """The step of a log line; infinity for a line a killed run left half written."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


def read_progress(work_dir: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(status, [{step, loss, ...} per logged step]) of a job folder; empty when not started.

    A status ``running`` whose process is gone (killed, crashed) reads as ``died``."""
    work_dir = Path(work_dir)
    status_path, log_path = work_dir / STATUS, work_dir / LOG
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    if status.get("state") == "running" and not pid_alive(status.get("pid")):
        status["state"] = "died"
    steps = []
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line being written right now
                continue
            if "loss" in entry:
                steps.append(entry)
    return status, steps
