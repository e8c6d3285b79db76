"""The one atomic writer: complete files only, stale temporaries of dead processes removed,
long names and bad targets handled before anything is written."""

import errno
import os
import subprocess
import sys

import pytest

from comfyui_ternary_flux.ternary.atomic import (
    NAME_MAX,
    atomic_path,
    remove_stale_temporaries,
    temp_path,
)


def dead_pid() -> int:
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_write_removes_the_temporaries_that_dead_processes_left(tmp_path):
    target = tmp_path / "model.safetensors"
    stale = [temp_path(target, dead_pid()) for _ in range(3)]
    for path in stale:
        path.write_bytes(b"x" * 1000)
    live = temp_path(target, os.getppid())  # a running process: its write is not touched
    live.write_bytes(b"in progress")
    other = temp_path(tmp_path / "other.safetensors", dead_pid())
    other.write_bytes(b"another target's")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done"
    assert not any(path.exists() for path in stale)
    assert live.exists() and other.exists()
    assert remove_stale_temporaries(tmp_path / "other.safetensors") == [other]


def test_a_failed_write_leaves_neither_target_nor_temporary(tmp_path):
    target = tmp_path / "t.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_long_names_get_a_short_temporary_name(tmp_path):
    name = "n" * (NAME_MAX - len(".safetensors")) + ".safetensors"  # 255 bytes: allowed
    target = tmp_path / name
    with atomic_path(target) as tmp:
        assert len(tmp.name.encode()) <= NAME_MAX
        tmp.write_bytes(b"ok")
    assert target.read_bytes() == b"ok"
    stale = temp_path(target, dead_pid())
    stale.write_bytes(b"old")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"again")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_bad_targets_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(OSError, match="longer than 255 bytes") as err:
        with atomic_path(tmp_path / ("x" * 256)):
            pytest.fail("must not start")
    assert err.value.errno == errno.ENAMETOOLONG
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        with atomic_path(tmp_path / "folder"):
            pytest.fail("must not start")
    (tmp_path / "keep").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="exists"):
        with atomic_path(tmp_path / "keep", overwrite=False):
            pytest.fail("must not start")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "keep"]
    assert (tmp_path / "keep").read_bytes() == b"mine"
