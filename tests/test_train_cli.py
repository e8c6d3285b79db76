"""The ``teacher`` and ``distill`` subcommands end to end on the tiny model (one process)."""

import json

import pytest

from comfyui_ternary_flux.cli.main import main
from comfyui_ternary_flux.distill.progress import read_progress
from comfyui_ternary_flux.distill.teacher import read_manifest
from comfyui_ternary_flux.models.files import load_ternary_model as load_ternary_file


def test_teacher_then_distill(tmp_path):
    teacher = {"model": "random:tiny:3", "output": "data", "prompts": ["a cat", "a dog", "a cup"],
               "width": 64, "height": 64, "steps": 2, "points_per_prompt": 2, "shard_size": 2,
               "device": "cpu"}  # fmt: skip
    (tmp_path / "teacher.json").write_text(json.dumps(teacher))
    assert main(["teacher", str(tmp_path / "teacher.json")]) == 0
    manifest = read_manifest(tmp_path / "data")
    assert manifest["complete"] and manifest["prompts"] == teacher["prompts"]
    assert manifest["settings"]["shift"] == pytest.approx(0.5 - 0.65 * 240 / 3840)

    (tmp_path / "distill.toml").write_text(
        'model = "random:tiny:3"\ndata = "data"\noutput = "student.safetensors"\n'
        "lora_rank = 2\nsteps = 3\nbatch_size = 2\ncheckpoint_every = 2\ndevice = 'cpu'\n"
    )
    assert main(["distill", str(tmp_path / "distill.toml")]) == 0
    assert load_ternary_file(tmp_path / "student.safetensors").lora_rank == 2
    status, steps = read_progress(tmp_path / "student.safetensors.work")
    assert status["state"] == "finished" and len(steps) == 3


def test_bad_command_configs(tmp_path, capsys):
    (tmp_path / "t.json").write_text(json.dumps({"model": "random:huge:1", "output": "d"}))
    assert main(["teacher", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert "'random:huge:1': expected random:PRESET:SEED" in err
    assert "FLUX.1 preset (dev, schnell, tiny, tiny-schnell)" in err
    (tmp_path / "t.json").write_text(json.dumps({"model": "random:tiny:1", "output": "d",
                                                 "step": 3}))  # fmt: skip
    assert main(["teacher", str(tmp_path / "t.json")]) == 2
    assert "unknown teacher setting" in capsys.readouterr().err
    (tmp_path / "d.json").write_text(json.dumps({"model": "none.safetensors", "data": "d",
                                                 "output": "o.safetensors"}))  # fmt: skip
    assert main(["distill", str(tmp_path / "d.json")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


@pytest.fixture
def distill_job(tmp_path):
    """A tiny teacher data set, its teacher file and a 4-step distill config file."""
    from distill_helpers import build_data, tiny_config, write_teacher_file

    build_data(tmp_path / "data")
    write_teacher_file(tmp_path / "teacher.safetensors")

    def config_file(**changes):
        values = {**tiny_config(tmp_path, steps=4).as_dict(), **changes}
        path = tmp_path / "distill.json"
        path.write_text(json.dumps({k: str(v) if hasattr(v, "parts") else v
                                    for k, v in values.items()}))  # fmt: skip
        return str(path)

    return tmp_path, config_file


def _left(folder):
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".partial"))


def test_distill_file_system_errors_are_one_line(distill_job, capsys, monkeypatch):
    import errno
    import os

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to find which file an fsync is for")

    tmp, config_file = distill_job
    (tmp / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: not str(p).endswith("ro") and real_access(p, m))
    assert main(["distill", config_file(output=str(tmp / "ro" / "o.safetensors"))]) == 4
    err = capsys.readouterr().err
    assert err == f"error: {tmp / 'ro'}: folder is not writable\n"
    assert not (tmp / "out.safetensors.work").exists()  # refused before training
    monkeypatch.undo()

    real_fsync = os.fsync

    def full(fd):  # the first checkpoint meets a full disk
        if "checkpoint.pt" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    assert main(["distill", config_file()]) == 4
    err = capsys.readouterr().err.splitlines()[-1]
    assert (
        err == f"error: {tmp / 'out.safetensors.work' / 'checkpoint.pt'}: No space left on device"
    )
    assert _left(tmp) == [] and not (tmp / "out.safetensors").exists()
    assert read_progress(tmp / "out.safetensors.work")[0]["state"] == "failed"


def test_distill_interrupted_ends_cleanly_and_resumes(distill_job, capsys, monkeypatch):
    from comfyui_ternary_flux.distill import train

    tmp, config_file = distill_job
    real, calls = train.collate, []

    def collate(*args):
        calls.append(1)
        if len(calls) == 4 * 3 + 1:  # the first micro-batch of step 4
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train, "collate", collate)
    assert main(["distill", config_file()]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: interrupted (Ctrl-C); no partial output was left"
    )
    work = tmp / "out.safetensors.work"
    assert read_progress(work)[0]["state"] == "interrupted"
    assert (work / "lock").read_text() == ""  # released
    assert _left(tmp) == [] and not (tmp / "out.safetensors").exists()
    monkeypatch.undo()
    assert main(["distill", config_file()]) == 0  # resumes from the step-2 checkpoint
    assert "resuming from" in capsys.readouterr().out
    assert read_progress(work)[0]["state"] == "finished"


def test_teacher_and_distill_refuse_other_families_by_name(tmp_path, capsys):
    from safetensors.torch import save_file

    from comfyui_ternary_flux.models import flux2
    from comfyui_ternary_flux.models.family import random_weights
    from comfyui_ternary_flux.models.files import quantize_file

    save_file(random_weights(flux2.flux2_shapes(flux2.TINY_KLEIN)), tmp_path / "klein.safetensors")
    quantize_file(tmp_path / "klein.safetensors", tmp_path / "klein-ternary.safetensors")
    message = "distillation supports FLUX.1 only; FLUX.2 is not supported yet"
    (tmp_path / "t.json").write_text(json.dumps({"model": "klein.safetensors", "output": "d"}))
    assert main(["teacher", str(tmp_path / "t.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    teacher = {"model": "random:tiny:3", "output": "data", "prompts": ["a cat"], "width": 32,
               "height": 32, "steps": 1, "points_per_prompt": 1, "device": "cpu"}  # fmt: skip
    (tmp_path / "teacher.json").write_text(json.dumps(teacher))
    assert main(["teacher", str(tmp_path / "teacher.json")]) == 0
    for model in ("klein.safetensors", "klein-ternary.safetensors"):
        (tmp_path / "d.json").write_text(json.dumps({"model": model, "data": "data",
                                                     "output": "o.safetensors",
                                                     "batch_size": 1}))  # fmt: skip
        assert main(["distill", str(tmp_path / "d.json")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_distill_command_trains_the_calibrated_start_with_its_recipe(distill_job):
    """A config that names only init = "calibrated" gets the start's recipe from
    distill/config.py (LoRA lr x2, warm-up 10 %, floor 0.1), as the quality proxy measured."""
    tmp, _ = distill_job
    config = {"model": "teacher.safetensors", "data": "data", "output": "cal.safetensors",
              "init": "calibrated", "calibration_samples": 8, "lora_rank": 2, "steps": 10,
              "batch_size": 2, "checkpoint_every": 10, "lr_lora": 1e-3, "lr_scale": 1e-3,
              "gradient_checkpointing": False, "device": "cpu"}  # fmt: skip
    (tmp / "cal.json").write_text(json.dumps(config))
    assert main(["distill", str(tmp / "cal.json")]) == 0
    assert load_ternary_file(tmp / "cal.safetensors").metadata["init"] == "calibrated"
    status, steps = read_progress(tmp / "cal.safetensors.work")
    assert status["state"] == "finished" and len(steps) == 10
    lora = [s["lr_lora"] for s in steps]
    assert lora[0] == pytest.approx(1e-3) and lora[1] == pytest.approx(2e-3)  # warm-up 1 step
    assert lora[-1] == pytest.approx(2e-4)  # the floor: 0.1 of 2 x lr_lora


def test_a_data_set_of_another_model_is_refused_by_name(distill_job, capsys):
    """A data set made by a model of another text width was a bare 'mat1 and mat2 shapes
    cannot be multiplied' traceback from the first forward pass."""
    from safetensors.torch import save_file

    from comfyui_ternary_flux.models import flux1

    tmp, config_file = distill_job
    other = flux1.FluxConfig(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1,
                             context_in_dim=512)  # fmt: skip
    save_file(flux1.random_flux_state_dict(other), tmp / "narrow.safetensors")
    assert main(["distill", config_file(model=str(tmp / "narrow.safetensors"))]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {tmp / 'data'} was made for another model: latents [16, 8, 8], text [8, 4096], "
        f"pooled [768]; {tmp / 'narrow.safetensors'} takes [16, h, w], [tokens, 512], [768]. "
        "Build the teacher data with this model"
    )
    assert not (tmp / "out.safetensors").exists() and not (tmp / "out.safetensors.work").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": 5}, "model must be a string, got 5"),
        ({"output": 5}, "output must be a string, got 5"),
        ({"prompts": 5}, "prompts must be a file name or a list, got 5"),
        ({"prompts": ["a cat", None]}, "prompts must be non-empty strings, got None"),
        ({"prompts": [1]}, "prompts must be non-empty strings, got 1"),
        ({"prompts": []}, "prompts is an empty list"),
        ({"prompt_count": 2.5}, "prompt_count must be a whole number, got 2.5"),
        ({"prompt_count": 0}, "prompt_count must be at least 1"),
        ({"prompt_seed": "a"}, "prompt_seed must be a whole number, got 'a'"),
        ({"device": 0}, "device must be a string, got 0"),
        ({"dtype": "fp16"}, "dtype must be one of auto, bfloat16, float16, float32"),
    ],
)
def test_teacher_settings_of_the_wrong_type_are_refused_by_name(tmp_path, capsys, change, message):
    """These were tracebacks ("'int' object has no attribute 'startswith'", "module 'torch'
    has no attribute 'fp16'"), foreign errors ("unsupported operand type(s) for /") or, for
    prompts that are not strings, prompts "1" and "None"."""
    teacher = {"model": "random:tiny:3", "output": "data", "prompts": ["a cat"], "width": 32,
               "height": 32, "steps": 1, "points_per_prompt": 1, "device": "cpu"}  # fmt: skip
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps({**teacher, **change}))
    assert main(["teacher", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.json"]


@pytest.mark.parametrize("command", ["teacher", "distill"])
def test_a_config_that_is_not_utf8_is_named(tmp_path, capsys, command):
    """It read "'utf-8' codec can't decode byte 0xff in position 30", naming no file."""
    path = tmp_path / "config.toml"
    path.write_bytes(b'model = "random:tiny:3"\noutput = "\xff"\n')
    assert main([command, str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: not UTF-8 text (invalid start byte)\n"
