"""A job's work folder: one process at a time (the lock), a stale lock taken over, and a
status that never says running for a process that is gone."""

import json
import os
import subprocess
import sys

import pytest
from test_atomic import dead_pid

from comfyui_ternary_flux.distill.progress import ProgressLog, read_progress
from comfyui_ternary_flux.ternary.lock import WorkDirBusy, WorkLock

HOLD = """
import sys, time
from comfyui_ternary_flux.ternary.lock import WorkLock
with WorkLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/work."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "work")], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "locked"
    yield child
    child.kill()
    child.wait()


def test_a_second_process_is_refused_naming_the_holder(tmp_path, holder):
    work = tmp_path / "work"
    with pytest.raises(WorkDirBusy, match=rf"work is in use by process {holder.pid} \(lock file"):
        WorkLock(work).check_free()
    with pytest.raises(WorkDirBusy, match=f"process {holder.pid}"):
        with WorkLock(work):
            pytest.fail("must not get the lock")


def test_the_lock_of_a_killed_process_is_taken_over_and_reported(tmp_path, holder):
    holder.kill()  # SIGKILL: no clean-up, the lock file still holds its PID
    holder.wait()
    work = tmp_path / "work"
    assert (work / "lock").read_text().strip() == str(holder.pid)
    WorkLock(work).check_free()
    with WorkLock(work) as lock:
        assert lock.stale_pid == holder.pid
        assert (work / "lock").read_text().strip() == str(os.getpid())
    with WorkLock(work) as again:  # released cleanly: nothing stale now
        assert again.stale_pid is None


def test_status_of_a_dead_process_reads_died(tmp_path):
    log = ProgressLog(tmp_path, total_steps=5)
    log.record("running", step=2, loss=0.5, seconds=0.1)
    assert read_progress(tmp_path)[0]["state"] == "running"  # this process runs
    status = json.loads((tmp_path / "status.json").read_text())
    (tmp_path / "status.json").write_text(json.dumps({**status, "pid": dead_pid()}))
    assert read_progress(tmp_path)[0]["state"] == "died"


def test_on_a_file_system_without_locks_the_pid_in_the_file_is_the_lock(tmp_path, monkeypatch):
    import errno

    from comfyui_ternary_flux.ternary import lock

    def no_locks(fd):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock, "_try_lock", no_locks)
    work = tmp_path / "work"
    with WorkLock(work):
        assert (work / "lock").read_text().strip() == str(os.getpid())
    (work / "lock").write_text(f"{os.getppid()}\n")  # a live process's
    with pytest.raises(WorkDirBusy, match=f"process {os.getppid()}"):
        WorkLock(work).check_free()
    (work / "lock").write_text(f"{dead_pid()}\n")
    with WorkLock(work) as lock:
        assert lock.stale_pid is not None
