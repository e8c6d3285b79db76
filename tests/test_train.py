"""The trainer on a tiny FLUX: it learns, resumes bit for bit, writes a loadable v1 file,
and refuses bad configs."""

import json
from pathlib import Path

import pytest
import torch
from distill_helpers import build_data, tiny_config, write_teacher_file

from comfyui_ternary_flux.distill.config import (
    DistillConfig,
    DistillConfigError,
    load_config,
)
from comfyui_ternary_flux.distill.progress import read_progress
from comfyui_ternary_flux.distill.student import load_student
from comfyui_ternary_flux.distill.teacher import TeacherDataset
from comfyui_ternary_flux.distill.train import (
    TrainingDiverged,
    check_run,
    distill,
    learning_rate_factor,
)
from comfyui_ternary_flux.models.files import load_ternary_model as load_ternary_file
from comfyui_ternary_flux.models.flux1_torch import ternary_flux_from_state_dict
from comfyui_ternary_flux.ternary.integrity import DamagedFileError
from comfyui_ternary_flux.ternary.lock import WorkDirBusy


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    build_data(tmp / "data")
    write_teacher_file(tmp / "teacher.safetensors")
    return tmp


def run(config, **kwargs):
    student = load_student(config.model, config.lora_rank, dtype=torch.float32)
    kwargs.setdefault("log", lambda _: None)
    return distill(student, TeacherDataset(config.data), config, **kwargs)


def test_loss_decreases_and_output_loads(workspace, tmp_path):
    config = tiny_config(
        workspace, output=tmp_path / "out.safetensors", work_dir=tmp_path / "work",
        steps=20, checkpoint_every=20, lr_lora=3e-3, lr_scale=3e-3,
    )  # fmt: skip
    result = run(config)
    assert len(result.losses) == 20
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    status, steps = read_progress(tmp_path / "work")
    assert status["state"] == "finished" and [s["step"] for s in steps] == list(range(1, 21))
    assert [s["loss"] for s in steps] == result.losses

    ckpt = load_ternary_file(result.output)
    assert ckpt.lora_rank == 4 and len(ckpt.layers) == 26
    model = ternary_flux_from_state_dict(ckpt.state_dict, ckpt.layers, dtype=torch.float32)
    data = TeacherDataset(config.data)
    ex = data.example(3)
    args = [ex[k][None] for k in ("z_t", "t", "context", "pooled", "guidance")]
    trained_loss = torch.nn.functional.mse_loss(model(*args)[0], ex["v"]).item()
    untrained = load_student(config.model, 4, dtype=torch.float32)
    untrained_loss = torch.nn.functional.mse_loss(untrained(*args)[0], ex["v"]).item()
    assert trained_loss < untrained_loss


def test_killed_run_resumes_to_the_same_result(workspace, tmp_path):
    whole = tiny_config(workspace, output=tmp_path / "a.safetensors", work_dir=tmp_path / "a")
    reference = run(whole)

    killed = tiny_config(workspace, output=tmp_path / "b.safetensors", work_dir=tmp_path / "b")

    def crash(step, loss):
        if step == 3:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        run(killed, on_step=crash)
    assert not (tmp_path / "b.safetensors").exists()
    with open(tmp_path / "b" / "log.jsonl", "a") as log:
        log.write('{"step": 4, "lo')  # the kill also cut a line in half
    resumed = run(killed)
    assert resumed.losses == reference.losses[2:]  # resumed from the step-2 checkpoint
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for name, tensor in a["trainable"].items():
        assert torch.equal(tensor, b["trainable"][name]), name
    _, steps = read_progress(tmp_path / "b")
    assert [s["loss"] for s in steps] == reference.losses


def test_stop_saves_a_checkpoint_and_returns(workspace, tmp_path):
    config = tiny_config(workspace, output=tmp_path / "o.safetensors", work_dir=tmp_path / "w")
    calls = []
    result = run(config, should_stop=lambda: calls.append(1) or len(calls) == 3)
    assert result.output is None and result.step == 3
    assert torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=True)["step"] == 3
    assert read_progress(tmp_path / "w")[0]["state"] == "stopped"


def test_resume_with_other_settings_is_refused(workspace, tmp_path):
    config = tiny_config(workspace, output=tmp_path / "o.safetensors", work_dir=tmp_path / "w")
    run(config, should_stop=lambda: True)
    changed = tiny_config(
        workspace, output=tmp_path / "o.safetensors", work_dir=tmp_path / "w", lr_lora=5e-4
    )
    with pytest.raises(ValueError, match="lr_lora"):
        run(changed)
    copy = tmp_path / "other-model.safetensors"
    copy.write_bytes(Path(config.model).read_bytes())
    other_model = tiny_config(
        workspace, output=tmp_path / "o.safetensors", work_dir=tmp_path / "w", model=str(copy)
    )
    with pytest.raises(ValueError, match="model"):
        run(other_model)


def test_existing_output_is_not_overwritten(workspace, tmp_path):
    (tmp_path / "o.safetensors").write_bytes(b"mine")
    config = tiny_config(workspace, output=tmp_path / "o.safetensors", work_dir=tmp_path / "w")
    with pytest.raises(FileExistsError, match="overwrite"):
        run(config)
    assert (tmp_path / "o.safetensors").read_bytes() == b"mine"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stpes": 3}, "unknown setting"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"batch_size": 3, "micro_batch": 2}, "multiple of micro_batch"),
        ({"lr_lora": "fast"}, "lr_lora must be a float"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"scale_rule": "max"}, "scale_rule"),
    ],
)
def test_bad_config_values_are_refused(tmp_path, change, message):
    values = {"model": "m.safetensors", "data": "d", "output": "o.safetensors", **change}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(values))
    with pytest.raises(DistillConfigError, match=message):
        load_config(path)


def test_config_files(tmp_path):
    with pytest.raises(DistillConfigError, match="missing required setting"):
        DistillConfig.from_dict({"model": "m"})
    with pytest.raises(DistillConfigError, match="not found"):
        load_config(tmp_path / "none.json")
    (tmp_path / "c.yaml").write_text("a: 1")
    with pytest.raises(DistillConfigError, match="json or .toml"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "c.toml").write_text('model = "m.safetensors"\ndata = "d"\noutput = "o"\n')
    config = load_config(tmp_path / "c.toml")
    assert config.model == str(tmp_path / "m.safetensors")
    assert config.work_path == tmp_path / "o.work"
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DistillConfigError, match="cannot parse"):
        load_config(tmp_path / "bad.json")


def test_a_damaged_checkpoint_is_set_aside_and_the_one_before_resumes(workspace, tmp_path):
    from test_integrity import flip_member_byte

    whole = tiny_config(workspace, output=tmp_path / "a.safetensors", work_dir=tmp_path / "a")
    run(whole)
    config = tiny_config(workspace, output=tmp_path / "b.safetensors", work_dir=tmp_path / "b")
    calls = []
    run(config, should_stop=lambda: calls.append(1) or len(calls) == 4)
    work = tmp_path / "b"
    assert torch.load(work / "checkpoint.pt", weights_only=True)["step"] == 4
    assert torch.load(work / "checkpoint.prev.pt", weights_only=True)["step"] == 2
    flip_member_byte(work / "checkpoint.pt")
    messages = []
    result = run(config, log=messages.append)
    assert any("checkpoint.pt: damaged: member" in m and "moved to checkpoint.pt.damaged" in m
               for m in messages), messages  # fmt: skip
    assert f"resuming from {work / 'checkpoint.prev.pt'} at step 2" in messages
    assert len(result.losses) == 4  # steps 3 to 6 again
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert (work / "checkpoint.pt.damaged").exists()


def test_when_every_checkpoint_is_damaged_the_message_says_how_to_go_on(workspace, tmp_path):
    from test_integrity import flip_member_byte

    config = tiny_config(workspace, output=tmp_path / "o.safetensors", work_dir=tmp_path / "w")
    calls = []
    run(config, should_stop=lambda: calls.append(1) or len(calls) == 4)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        flip_member_byte(tmp_path / "w" / name)
    with pytest.raises(DamagedFileError, match=r"checkpoint.pt: damaged: .* No good checkpoint "
                       r"is left: run again to start from step 0"):  # fmt: skip
        run(config)
    assert not (tmp_path / "o.safetensors").exists()
    result = run(config)  # not blocked: it starts again
    assert result.step == 6 and len(result.losses) == 6


def test_a_non_finite_loss_stops_the_run_and_writes_nothing(workspace, tmp_path):
    config = tiny_config(workspace, output=tmp_path / "o.safetensors", work_dir=tmp_path / "w")
    student = load_student(config.model, config.lora_rank, dtype=torch.float32)
    with torch.no_grad():
        student.double_blocks[0].img_attn.qkv.lora_up.fill_(float("inf"))
    with pytest.raises(TrainingDiverged, match=r"step 1: the loss is (nan|inf): training "
                       r"diverged .*/o.safetensors was not written"):  # fmt: skip
        distill(student, TeacherDataset(config.data), config, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]
    assert not (tmp_path / "w" / "checkpoint.pt").exists()
    status = read_progress(tmp_path / "w")[0]
    assert status["state"] == "failed" and "training diverged" in status["error"]


def test_a_non_finite_trained_tensor_is_never_saved(workspace, tmp_path):
    config = tiny_config(workspace, output=tmp_path / "o.safetensors", work_dir=tmp_path / "w")
    student = load_student(config.model, config.lora_rank, dtype=torch.float32)

    def poison(step, loss):
        if step == 2:  # after the update, before the step-2 checkpoint
            with torch.no_grad():
                student.single_blocks[1].linear2.weight_scale[3] = float("nan")

    with pytest.raises(TrainingDiverged, match=r"step 2: single_blocks.1.linear2.weight_scale "
                       "became NaN or infinite; no checkpoint"):  # fmt: skip
        distill(student, TeacherDataset(config.data), config, on_step=poison, log=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["lock", "log.jsonl",
                                                                "status.json"]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lr_lora": float("nan")}, "lr_lora must be a finite number, got nan"),
        ({"lr_scale": float("inf")}, "lr_scale must be a finite number, got inf"),
        ({"lr_lora": 1e30}, r"lr_lora 1e\+30 is far too large \(at most 1.0"),
        ({"lr_scale": 2.0}, "lr_scale 2.0 is far too large"),
        ({"weight_decay": float("-inf")}, "weight_decay must be a finite number"),
        ({"lora_rank": "-3"}, "lora_rank must be a int, got '-3'"),
        ({"lora_rank": -3}, "lora_rank must be at least 1, got -3"),
        ({"lora_rank": 4.0}, "lora_rank must be a int, got 4.0"),
        ({"lr_lora_factor": float("nan")}, "lr_lora_factor must be a finite number, got nan"),
        ({"lr_lora_factor": -1.0}, "lr_lora_factor must not be negative"),
        ({"lr_lora_factor": "x2"}, "lr_lora_factor must be a float, got 'x2'"),
        ({"lr_lora": 0.6, "init": "calibrated"}, r"lr_lora 0.6 x lr_lora_factor 2.0 is far too"),
        ({"warmup_steps": 2.5}, "warmup_steps must be a int"),
    ],
)
def test_values_that_cannot_train_are_refused(workspace, change, message):
    with pytest.raises(DistillConfigError, match=message):
        tiny_config(workspace, **change)


def test_impossible_runs_are_refused_before_any_training(workspace, tmp_path, monkeypatch):
    import os

    data = TeacherDataset(workspace / "data")
    assert len(data) == 12
    cases = [
        ({"batch_size": 10**9}, ValueError, r"batch_size 1000000000 is larger than the teacher "
         r"data set \(12 examples"),
        ({"output": tmp_path / "folder"}, IsADirectoryError, "is a directory"),
        ({"output": tmp_path / ("x" * 256)}, OSError, "longer than 255 bytes"),
        ({"output": tmp_path / "ro" / "o.safetensors"}, PermissionError, "folder is not "
         "writable: '.*ro'"),
    ]  # fmt: skip
    (tmp_path / "folder").mkdir()
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: not str(p).endswith("ro") and real_access(p, m))
    student = load_student(str(workspace / "teacher.safetensors"), 4, dtype=torch.float32)
    before = student.state_dict()["double_blocks.0.img_mod.lin.lora_up"].clone()
    for change, error, message in cases:
        config = tiny_config(workspace, work_dir=tmp_path / "w", **change)
        with pytest.raises(error, match=message):
            distill(student, data, config, log=lambda _: None)
    assert not (tmp_path / "w").exists()  # nothing was started
    assert torch.equal(student.state_dict()["double_blocks.0.img_mod.lin.lora_up"], before)


def test_a_second_run_on_the_same_work_folder_is_refused(workspace, tmp_path):
    import subprocess
    import sys

    from test_progress import HOLD

    config = tiny_config(workspace, output=tmp_path / "o.safetensors", work_dir=tmp_path / "w")
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "w")],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(WorkDirBusy, match=f"w is in use by process {child.pid}"):
            run(config)
        assert not (tmp_path / "w" / "log.jsonl").exists()  # not one line doubled
    finally:
        child.kill()
        child.wait()
    messages = []
    run(config, log=messages.append)  # the killed holder's lock is taken over, and said so
    assert any(f"locked by process {child.pid}, which is gone: taking it over" in m
               for m in messages)  # fmt: skip
    assert read_progress(tmp_path / "w")[0]["state"] == "finished"


def test_the_calibrated_start_has_its_own_recipe():
    """init = "calibrated" trains the LoRA at twice lr_lora, warms up over 10 % of the steps
    and keeps a floor of 0.1 under the cosine (distill/config.py RECIPES, measured on the
    quality proxy's held-out seeds); the SVD start trains as before. Set values win."""
    from comfyui_ternary_flux.distill.config import RECIPES, StartRecipe

    assert RECIPES["calibrated"] == StartRecipe(lr_lora_factor=2.0, warmup_share=0.1,
                                                min_lr_ratio=0.1)  # fmt: skip
    assert RECIPES["svd"] == StartRecipe(1.0, 0.0, 0.0)
    paths = {"model": "m.safetensors", "data": "d", "output": "o.safetensors"}
    calibrated = DistillConfig(**paths, init="calibrated", steps=400)
    filled = calibrated.resolved()
    assert (filled.lr_lora_factor, filled.warmup_steps, filled.min_lr_ratio) == (2.0, 40, 0.1)
    assert calibrated.lr_lora == 1e-4 and calibrated.lora_lr == 2e-4
    assert calibrated.result_settings()["lr_lora_factor"] == 2.0
    svd = DistillConfig(**paths, steps=400)
    filled = svd.resolved()
    assert (filled.lr_lora_factor, filled.warmup_steps, filled.min_lr_ratio, svd.lora_lr) == (
        1.0, 0, 0.0, 1e-4,
    )  # fmt: skip
    assert "lr_lora_factor" not in svd.result_settings()  # old runs resume as before
    own = DistillConfig(**paths, init="calibrated", steps=400, lr_lora_factor=1.0,
                        warmup_steps=0, min_lr_ratio=0.0)  # fmt: skip
    assert own.resolved() is own and (own.lora_lr, own.warmup_steps) == (1e-4, 0)
    # What Distill Job writes for torchrun reads back the same, open fields still open
    again = DistillConfig.from_dict(calibrated.as_dict())
    assert again == calibrated and again.as_dict()["warmup_steps"] is None
    assert DistillConfig.from_dict(own.as_dict()) == own  # a saved number stays that number


def test_an_open_recipe_follows_a_changed_start_or_length():
    """The recipe is filled in where it is used, not at construction: a config copied with
    another init or another number of steps gets that start's and length's values."""
    import dataclasses

    paths = {"model": "m.safetensors", "data": "d", "output": "o.safetensors"}
    svd = DistillConfig(**paths, steps=400)
    assert dataclasses.replace(svd, init="calibrated").lora_lr == 2 * svd.lr_lora
    switched = dataclasses.replace(svd, init="calibrated").resolved()
    assert (switched.lr_lora_factor, switched.warmup_steps, switched.min_lr_ratio) == (
        2.0, 40, 0.1,
    )  # fmt: skip
    calibrated = DistillConfig(**paths, init="calibrated", steps=1000)
    longer = DistillConfig.from_dict({**calibrated.as_dict(), "steps": 4000})
    assert longer.result_settings()["warmup_steps"] == 400  # the trainer's fingerprint
    assert longer.resolved().warmup_steps == 400


def test_a_run_from_before_the_recipe_resumes_with_its_own_values(workspace, tmp_path):
    """A calibrated-start checkpoint with the old schedule (no factor in its fingerprint,
    no warm-up, no floor) resumes under a config that leaves the recipe open, keeping its
    values; a value the config sets against the checkpoint is still refused."""
    common = dict(output=tmp_path / "o.safetensors", work_dir=tmp_path / "w", steps=6,
                  checkpoint_every=2, init="calibrated", calibration_samples=8)  # fmt: skip
    old = tiny_config(workspace, **common, lr_lora_factor=1.0, warmup_steps=0, min_lr_ratio=0.0)
    run(old, should_stop=lambda: True)
    saved = torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=True)["fingerprint"]
    assert "lr_lora_factor" not in saved and saved["warmup_steps"] == 0  # as before RECIPES
    with pytest.raises(ValueError, match=r"\(warmup_steps differ\)"):
        run(tiny_config(workspace, **common, warmup_steps=1))
    # refused by check_run, before a student is built (a calibrated start takes minutes)
    with pytest.raises(ValueError, match=r"belongs to a run with other settings \(steps differ"):
        check_run(tiny_config(workspace, **{**common, "steps": 8}), TeacherDataset(old.data))
    check_run(tiny_config(workspace, **common), TeacherDataset(old.data))  # its own: resumes
    logged = []
    result = run(tiny_config(workspace, **common), log=logged.append)
    assert result.step == 6 and result.output is not None
    assert any("began with lr_lora_factor 1.0, warmup_steps 0, min_lr_ratio 0.0" in line
               for line in logged), logged  # fmt: skip
    _, steps = read_progress(tmp_path / "w")
    lr = tiny_config(workspace, **common).lr_lora
    assert steps[1]["lr_lora"] == pytest.approx(lr * learning_rate_factor(1, old))  # no x2


def test_the_optimizer_follows_the_recipe(workspace, tmp_path):
    """What the trainer does with the calibrated start's recipe: LoRA at lr_lora x 2, a
    1-step warm-up (10 % of 10), the cosine down to 0.1 of it; the scales share the schedule."""
    config = tiny_config(
        workspace, output=tmp_path / "out.safetensors", work_dir=tmp_path / "work",
        steps=10, checkpoint_every=10, lr_lora=1e-3, lr_scale=4e-3, init="calibrated",
        calibration_samples=8,
    )  # fmt: skip
    run(config)  # (the start is the SVD one here: the schedule is what is checked)
    _, steps = read_progress(tmp_path / "work")
    assert steps[0]["lr_lora"] == pytest.approx(2e-3 / 2)  # warm-up step 1 of 1
    assert steps[1]["lr_lora"] == pytest.approx(2e-3)
    assert steps[-1]["lr_lora"] == pytest.approx(2e-3 * 0.1)
    assert steps[-1]["lr_scale"] == pytest.approx(4e-3 * 0.1)
