"""The resume store (ternary/resume.py): what it keeps, what it refuses, what it removes.
The calibrated quantization's resume end to end is in tests/test_calibrate_model.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from comfyui_ternary_flux.ternary import resume
from comfyui_ternary_flux.ternary.integrity import DamagedFileError
from comfyui_ternary_flux.ternary.resume import (
    FORMAT,
    PACK_VERSION,
    RECORD,
    ResumeError,
    ResumeStore,
    file_identity,
    is_store,
    store_path,
)

KEYS = ["a", "b", "c"]
SETTINGS = {"rank": 4, "options": {"damp": 0.1}, "multipliers": (1.0, 2.0)}


def piece(value: float) -> dict[str, torch.Tensor]:
    return {"x": torch.full((3,), value), "y": torch.arange(4, dtype=torch.uint8)}


def test_pieces_come_back_as_kept_and_a_rerun_counts_them(tmp_path):
    path = tmp_path / "out.safetensors.job-partial"
    store = ResumeStore(path, {"name": "src"})
    assert store.begin(SETTINGS, KEYS) == 0
    assert not is_store(path)  # nothing but the lock is written before the first piece
    store.put("a", piece(1.0), {"note": "first"})
    store.put("b", piece(2.0), {})
    assert is_store(path) and json.loads((path / RECORD).read_text())["rank"] == 4
    store.close()
    again = ResumeStore(path, {"name": "src"})
    assert again.begin(SETTINGS, KEYS) == 2  # (tuples compare as the lists they are read as)
    tensors, metadata = again.get("b")
    assert torch.equal(tensors["x"], piece(2.0)["x"]) and torch.equal(tensors["y"], piece(0)["y"])
    assert again.get("a")[1]["note"] == "first"
    again.remove()
    assert not path.exists()


def test_other_settings_or_another_source_are_named(tmp_path):
    path = tmp_path / "store"
    store = ResumeStore(path, {"name": "src", "bytes": 10})
    store.begin(SETTINGS, KEYS)
    store.put("a", piece(1.0), {})
    store.close()
    with pytest.raises(ResumeError, match=r"other settings \(rank 4 there, 8 now\); rerun with"):
        ResumeStore(path, {"name": "src", "bytes": 10}).begin({**SETTINGS, "rank": 8}, KEYS)
    with pytest.raises(ResumeError, match=r"options differs \(damp\); rank 4 there, None now"):
        ResumeStore(path, {"name": "src", "bytes": 10}).begin(
            {"options": {}, "multipliers": [1.0, 2.0]}, KEYS
        )
    with pytest.raises(
        ResumeError, match=r"\(source differs \(bytes\)\).*or delete that folder to start"
    ):
        ResumeStore(path, {"name": "src", "bytes": 11}).begin(SETTINGS, KEYS)
    with pytest.raises(
        ResumeError, match=r"source differs \(bytes\)\); rerun .*, or use the flag$"
    ):
        ResumeStore(path, {"name": "src"}, start_over="use the flag").begin(SETTINGS, KEYS)
    assert is_store(path)  # a refusal deletes nothing
    # restart: the old store goes with the new one's first piece (a job refused after begin
    # leaves it as it was)
    fresh = ResumeStore(path, {"name": "src", "bytes": 11}, restart=True)
    assert fresh.begin({**SETTINGS, "rank": 8}, KEYS) == 0 and is_store(path)
    fresh.close()
    old = ResumeStore(path, {"name": "src", "bytes": 10})
    assert old.begin(SETTINGS, KEYS) == 1
    old.close()
    fresh.begin({**SETTINGS, "rank": 8}, KEYS)
    fresh.put("a", piece(5.0), {})
    fresh.close()
    assert ResumeStore(path, {"name": "src", "bytes": 11}).begin({**SETTINGS, "rank": 8}, KEYS) == 1


def test_a_damaged_piece_is_dropped_with_the_pieces_after_it(tmp_path):
    path = tmp_path / "store"
    store = ResumeStore(path, {})
    store.begin(SETTINGS, KEYS)
    for i, key in enumerate(KEYS):
        store.put(key, piece(float(i)), {})
    store.close()
    damaged = path / "b.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0x80
    damaged.write_bytes(bytes(data))
    lines = []
    store = ResumeStore(path, {}, log=lines.append)
    assert store.begin(SETTINGS, KEYS) == 1
    assert lines == [
        f"{damaged}: damaged: its tensors do not match the sha256 in its header; computing it again"
    ]
    assert sorted(p.name for p in path.iterdir()) == ["a.safetensors", "lock", RECORD]
    (path / "a.safetensors").write_bytes(b"not a safetensors file")  # damaged after begin
    with pytest.raises(DamagedFileError, match="a.safetensors: not a readable resume piece"):
        store.get("a")


def test_what_is_not_a_store_is_refused_and_left_alone(tmp_path):
    in_the_way = tmp_path / "file"
    in_the_way.write_text("mine")
    with pytest.raises(ResumeError, match="is in the way of the resume store; move it away"):
        ResumeStore(in_the_way, {}, restart=True).begin(SETTINGS, KEYS)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ResumeError, match=r"not a resume store of this pack \(no run.json\)"):
        ResumeStore(folder, {}, restart=True).begin(SETTINGS, KEYS)
    (folder / RECORD).write_text("{not json")
    with pytest.raises(ResumeError, match="run.json is damaged .*delete that folder to start"):
        ResumeStore(folder, {}).begin(SETTINGS, KEYS)
    (folder / RECORD).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ResumeError, match="not a resume record of this pack"):
        ResumeStore(folder, {}, restart=True).begin(SETTINGS, KEYS)
    assert in_the_way.read_text() == "mine" and (folder / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", RECORD]  # no lock left
    # a store that holds a file of someone else's: removing it keeps that file
    store = ResumeStore(tmp_path / "store", {})
    store.begin(SETTINGS, KEYS)
    store.put("a", piece(1.0), {})
    (tmp_path / "store" / "notes.txt").write_text("mine")
    store.remove()
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"  # a folder made just before an interruption: a new store
    empty.mkdir()
    assert ResumeStore(empty, {}).begin(SETTINGS, KEYS) == 0


def test_store_path_and_file_identity(tmp_path):
    assert store_path(tmp_path / "o.safetensors", "calibration").name == (
        "o.safetensors.calibration-partial"
    )
    long = tmp_path / ("y" * 243 + ".safetensors")  # 255 bytes: the store's name would not fit
    name = store_path(long, "calibration").name
    assert len(name.encode()) <= 255 and name.endswith(".calibration-partial")
    assert name == store_path(long, "calibration").name  # the same output, the same store
    src = tmp_path / "src"
    src.write_bytes(b"12345")
    identity = file_identity(src)
    assert identity["name"] == "src" and identity["bytes"] == 5
    assert identity["path"] == str(src.resolve())
    src.write_bytes(b"123456")
    assert file_identity(src) != identity


@pytest.mark.parametrize("record", ["{not json", json.dumps({"format": FORMAT, "version": 99})])
def test_restart_clears_a_store_whose_record_is_damaged_or_of_another_version(tmp_path, record):
    path = tmp_path / "store"
    store = ResumeStore(path, {})
    store.begin(SETTINGS, KEYS)
    store.put("a", piece(1.0), {})
    store.put("b", piece(2.0), {})
    store.close()
    (path / RECORD).write_text(record)
    with pytest.raises(ResumeError, match="start over"):
        ResumeStore(path, {}).begin(SETTINGS, KEYS)  # (a refused begin releases the lock)
    fresh = ResumeStore(path, {}, restart=True)
    assert fresh.begin(SETTINGS, KEYS) == 0
    assert (path / "b.safetensors").exists()  # nothing removed before the first piece
    fresh.put("a", piece(5.0), {})
    fresh.close()
    assert sorted(p.name for p in path.iterdir()) == ["a.safetensors", RECORD]
    assert ResumeStore(path, {}).begin(SETTINGS, KEYS) == 1


def test_remove_deletes_the_record_last(tmp_path, monkeypatch):
    path = tmp_path / "store"
    store = ResumeStore(path, {})
    store.begin(SETTINGS, KEYS)
    for key in KEYS:
        store.put(key, piece(1.0), {})
    removed = []
    real = Path.unlink
    monkeypatch.setattr(
        Path, "unlink", lambda self, **kw: (removed.append(self.name), real(self, **kw))[1]
    )
    store.remove()
    assert removed[len(KEYS)] == RECORD  # after the pieces, before the lock
    assert sorted(removed[: len(KEYS)]) == [f"{k}.safetensors" for k in KEYS]
    assert not path.exists()


def test_a_store_of_another_torch_or_pack_version_is_refused_by_name(tmp_path, monkeypatch):
    path = tmp_path / "store"
    store = ResumeStore(path, {})
    store.begin(SETTINGS, KEYS)
    store.put("a", piece(1.0), {})
    store.close()
    monkeypatch.setattr(resume.torch, "__version__", "0.0.1")
    with pytest.raises(ResumeError, match=r"other settings \(torch '.*' there, '0.0.1' now\)"):
        ResumeStore(path, {}).begin(SETTINGS, KEYS)
    monkeypatch.undo()
    monkeypatch.setattr(resume, "PACK_VERSION", "9.9")
    with pytest.raises(ResumeError, match=r"pack '.*' there, '9.9' now"):
        ResumeStore(path, {}).begin(SETTINGS, KEYS)


def test_the_pack_version_is_pyproject_s():
    text = (Path(resume.__file__).parents[1] / "pyproject.toml").read_text()
    assert f'\nversion = "{PACK_VERSION}"\n' in text


def test_a_second_job_on_a_store_in_use_is_refused(tmp_path):
    path = tmp_path / "store"
    first = ResumeStore(path, {})
    first.begin(SETTINGS, KEYS)
    with pytest.raises(ValueError, match=rf"{path} is in use by process {os.getpid()} \(lock"):
        ResumeStore(path, {}).begin(SETTINGS, KEYS)
    first.put("a", piece(1.0), {})
    first.close()  # released: the next job resumes
    second = ResumeStore(path, {})
    assert second.begin(SETTINGS, KEYS) == 1
    second.close()
    refused = ResumeStore(tmp_path / "other", {})  # a refused job leaves no folder behind
    refused.begin(SETTINGS, KEYS)
    refused.close()
    assert not (tmp_path / "other").exists()
