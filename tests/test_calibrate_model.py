"""Calibrated quantization of a whole FLUX.1 model: the block-by-block Hessians against a
float64 reference, ``quantize --calibrate`` end to end and its refusals, the calibrated
student of ``init = "calibrated"``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfyui_ternary_flux.cli.main import main
from comfyui_ternary_flux.distill.calibration import (
    calibration_indices,
    config_calibration,
    teacher_calibration,
)
from comfyui_ternary_flux.distill.config import DistillConfig, DistillConfigError
from comfyui_ternary_flux.distill.student import load_student
from comfyui_ternary_flux.distill.teacher import (
    TeacherDataset,
    TeacherSettings,
    build_teacher_dataset,
    hashed_prompt_encoder,
    model_velocity_fn,
)
from comfyui_ternary_flux.distill.train import check_run, distill
from comfyui_ternary_flux.models import flux1_calibrate
from comfyui_ternary_flux.models.family import random_weights
from comfyui_ternary_flux.models.files import load_ternary_model
from comfyui_ternary_flux.models.flux1 import FluxConfig, flux_shapes
from comfyui_ternary_flux.models.flux1_calibrate import Calibration, FluxCalibrator
from comfyui_ternary_flux.models.flux1_torch import flux_from_state_dict
from comfyui_ternary_flux.ternary.calibrate import CalibrationError, accumulate_hessian

# One double and one single block, hidden 128 (one 128-wide head): 13 ternary layers.
SMALL = FluxConfig(
    hidden_size=128, num_heads=1, depth=1, depth_single_blocks=1, mlp_ratio=2.0,
    context_in_dim=64, vec_in_dim=32,
)  # fmt: skip
SETTINGS = TeacherSettings(
    width=64, height=64, steps=2, guidance=3.5, points_per_prompt=2, seed=1, shard_size=4,
    storage_dtype="float32",
)  # fmt: skip
PROMPTS = [f"a small cube number {i}" for i in range(8)]


def small_state(seed: int = 4) -> dict[str, torch.Tensor]:
    return random_weights(flux_shapes(SMALL), seed, dtype=torch.float32)


def encoder(context_dim: int = 64):
    return hashed_prompt_encoder(context_len=6, context_dim=context_dim, pooled_dim=32)


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """teacher.safetensors (random SMALL weights) and its teacher data set in data/."""
    root = tmp_path_factory.mktemp("calibrate")
    state = small_state()
    save_file(state, str(root / "teacher.safetensors"))
    teacher = flux_from_state_dict(state, dtype=torch.float32).eval()
    build_teacher_dataset(
        root / "data", PROMPTS, encoder(), model_velocity_fn(teacher), SETTINGS, log=lambda _: 0
    )
    return root


def test_calibration_samples_spread_over_prompts_then_times():
    assert calibration_indices(3, 2, 6) == [0, 3, 4, 1, 2, 5]  # (p0,t0) (p1,t1) (p2,t0) ...
    assert calibration_indices(3, 2, 2) == [0, 3]
    assert sorted(calibration_indices(4, 3, 12)) == list(range(12))


@pytest.mark.parametrize("inputs", ["dense", "quantized"])
def test_block_hessians_match_the_float64_model(job, inputs, monkeypatch):
    """The Hessian each layer is quantized with is X^T X of its inputs in the model: with
    dense inputs, the dense model's; with quantized inputs, block 0's first group sees the
    dense model's inputs too, and later layers what the quantized layers before them give."""
    seen: dict[str, torch.Tensor] = {}
    real = flux1_calibrate.quantize_layer

    def recording(weight, *args, hessian, **kwargs):
        seen[len(seen)] = hessian.clone()
        return real(weight, *args, hessian=hessian, **kwargs)

    monkeypatch.setattr(flux1_calibrate, "quantize_layer", recording)
    state = small_state()
    calibration = teacher_calibration(job / "data", 6, inputs=inputs)
    calibration = Calibration(calibration.examples, inputs=inputs, batch_size=4, dtype="float64")
    calibrator = FluxCalibrator(
        {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__, calibration
    )
    order = [n for n in flux1_calibrate.DOUBLE_GROUPS for n in n]
    order = [f"double_blocks.0.{n}" for n in order]
    order += [f"single_blocks.0.{n}" for g in flux1_calibrate.SINGLE_GROUPS for n in g]
    parts = {name: calibrator.layer(name) for name in sorted(order)}  # any order of asking
    assert len(parts) == 13 and calibrator.total_layers == 13
    hessians = dict(zip([e.name for e in calibrator.errors], seen.values(), strict=True))

    # float64 reference: hooks on the dense model's linears
    model = flux_from_state_dict(state, dtype=torch.float64).eval()
    inputs_of: dict[str, list[torch.Tensor]] = {name: [] for name in order}
    for name in order:
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, a, name=name: inputs_of[name].append(a[0])
        )
    with torch.no_grad():
        for i in range(len(calibration.examples)):
            ex = calibration.examples[i]
            model(
                ex["z_t"][None].double(), ex["t"].reshape(1), ex["context"][None].double(),
                ex["pooled"][None].double(), ex["guidance"].reshape(1),
            )  # fmt: skip
    dense_reference = {name: accumulate_hessian(xs) for name, xs in inputs_of.items()}
    same = order if inputs == "dense" else order[:4]  # mod.lin and qkv of block 0
    for name in same:
        torch.testing.assert_close(hessians[name], dense_reference[name], rtol=1e-9, atol=1e-9)
    if inputs == "quantized":
        for name in order[4:]:
            if name.endswith("modulation.lin"):  # silu(vec): no ternary layer touches it
                torch.testing.assert_close(hessians[name], dense_reference[name])
            else:  # fed by quantized layers: not the dense model's inputs
                assert not torch.allclose(hessians[name], dense_reference[name], rtol=1e-3)
    with pytest.raises(KeyError, match="handed out"):
        calibrator.layer(order[0])


def velocity_error(model, dataset: TeacherDataset, indices) -> float:
    """Mean squared velocity error to the teacher's stored velocities."""
    total = 0.0
    with torch.no_grad():
        for i in indices:
            ex = dataset.example(i)
            v = model(
                ex["z_t"][None], ex["t"].reshape(1), ex["context"][None], ex["pooled"][None],
                ex["guidance"].reshape(1),
            )  # fmt: skip
            total += float((v[0] - ex["v"]).square().mean())
    return total / len(indices)


def test_quantize_calibrate_round_trip(job, capsys):
    src, data = job / "teacher.safetensors", job / "data"
    out, plain = job / "calibrated.safetensors", job / "plain.safetensors"
    args = ["quantize", str(src), "--lora-rank", "4", "--packing", "2bit"]
    assert main([*args, "-o", str(plain)]) == 0
    capsys.readouterr()
    assert (
        main([*args, "-o", str(out), "--calibrate", str(data), "--calibration-samples", "8"]) == 0
    )
    text = capsys.readouterr().out
    assert "output error on the calibration inputs" in text and "13 of 13 layers lower" in text
    assert "calibration time" in text and f"wrote {out}" in text
    ckpt = load_ternary_model(out)
    assert ckpt.metadata["scale_rule"] == "calibrated" and ckpt.lora_rank == 4
    header = json.loads(ckpt.metadata["calibration"])
    assert header["samples"] == 8 and header["inputs"] == "quantized"
    assert header["data_fingerprint"] == TeacherDataset(data).fingerprint
    assert main(["info", str(out)]) == 0
    assert "scale rule calibrated" in capsys.readouterr().out
    # on examples it was not calibrated on, the calibrated model is closer to the teacher
    dataset = TeacherDataset(data)
    held_out = sorted(set(range(len(dataset))) - set(calibration_indices(8, 2, 8)))
    assert held_out  # the other point of every prompt
    models = {
        p: load_student(p, 4, dtype=torch.float32, gradient_checkpointing=False)
        for p in (out, plain)
    }
    errors = {p: velocity_error(m, dataset, held_out) for p, m in models.items()}
    assert errors[out] < 0.7 * errors[plain]  # (0.12 against 0.25 when written)


def test_quantize_calibrate_refusals_name_the_problem_and_write_nothing(job, tmp_path, capsys):
    src = job / "teacher.safetensors"
    out = tmp_path / "o.safetensors"

    def refused(*args: str) -> str:
        assert main(["quantize", *args, "-o", str(out)]) == 2
        assert not out.exists() and not list(tmp_path.glob(".*partial"))
        return capsys.readouterr().err

    assert "not found" in refused(str(src), "--calibrate", str(tmp_path / "nothing"))
    incomplete = tmp_path / "incomplete"
    state = small_state()
    teacher = flux_from_state_dict(state, dtype=torch.float32).eval()
    build_teacher_dataset(incomplete, PROMPTS, encoder(), model_velocity_fn(teacher), SETTINGS,
                          log=lambda _: 0)  # fmt: skip
    next(incomplete.glob("shard-*.safetensors")).unlink()
    manifest = json.loads((incomplete / "manifest.json").read_text())
    manifest.update(complete=False, done_prompts=4)
    (incomplete / "manifest.json").write_text(json.dumps(manifest))
    assert "incomplete (4/8 prompts)" in refused(str(src), "--calibrate", str(incomplete))
    err = refused(str(src), "--calibrate", str(job / "data"), "--calibration-samples", "17")
    assert "17 calibration samples asked for" in err and "holds 16 examples" in err
    assert "has no effect with --calibrate" in refused(
        str(src), "--calibrate", str(job / "data"), "--scale-rule", "lsq"
    )
    assert "needs a SRC file" in refused("--random", "flux:tiny", "--calibrate", str(job / "data"))
    assert "need --calibrate" in refused(str(src), "--calibration-samples", "4")
    # a data set of another model: text conditioning 48 wide, this model takes 64
    other = tmp_path / "other"
    build_teacher_dataset(other, PROMPTS[:2], encoder(48), lambda z, t, c: torch.zeros_like(z),
                          SETTINGS, log=lambda _: 0)  # fmt: skip
    err = refused(str(src), "--calibrate", str(other), "--calibration-samples", "2")
    assert "calibration example 0: text conditioning of shape [6, 48]" in err
    assert "[tokens, 64]" in err
    # another family
    from comfyui_ternary_flux.models import flux2

    klein = tmp_path / "klein.safetensors"
    save_file(random_weights(flux2.flux2_shapes(flux2.TINY_KLEIN)), str(klein))
    assert main(["quantize", str(src), "--calibrate", str(job / "data"), "-o", str(out)]) == 0
    assert json.loads(load_ternary_model(out).metadata["calibration"])["samples"] == 16  # all
    out.unlink()
    capsys.readouterr()
    err = refused(str(klein), "--calibrate", str(job / "data"))
    assert "calibration supports FLUX.1 only; FLUX.2 is not supported" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "incomplete",
        "klein.safetensors",
        "other",
    ]


def test_calibration_settings_are_checked():
    with pytest.raises(CalibrationError, match="inputs must be one of"):
        Calibration([{}], inputs="teacher")
    with pytest.raises(CalibrationError, match="at least one example"):
        Calibration([])


def test_distillation_from_the_calibrated_start(job, tmp_path):
    base = dict(
        model=str(job / "teacher.safetensors"), data=str(job / "data"),
        output=str(tmp_path / "out.safetensors"), lora_rank=4, steps=2, batch_size=4,
        micro_batch=4, checkpoint_every=2, gradient_checkpointing=False, dtype="float32",
        device="cpu", calibration_samples=8,
    )  # fmt: skip
    with pytest.raises(DistillConfigError, match="init must be one of"):
        DistillConfig(**base, init="gptq")
    config = DistillConfig(**base, init="calibrated")
    assert config.result_settings()["init"] == "calibrated"
    assert "init" not in DistillConfig(**base).result_settings()  # old runs resume as before
    dataset = TeacherDataset(config.data)
    calibration = config_calibration(config, dataset)
    assert len(calibration.examples) == 8 and config_calibration(DistillConfig(**base)) is None
    student = load_student(config.model, 4, dtype=torch.float32, gradient_checkpointing=False,
                           calibration=calibration)  # fmt: skip
    # the student holds what the calibrator makes (with float32 LoRA factors, as the student)
    state = small_state()
    calibrator = FluxCalibrator(
        {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__,
        teacher_calibration(config.data, 8), lora_rank=4, lora_dtype=torch.float32,
    )  # fmt: skip
    student_state = student.state_dict()
    for name in [n for n, m in student.named_modules() if hasattr(m, "weight_scale")]:
        parts, _ = calibrator.layer(name)
        for part, tensor in parts.items():
            torch.testing.assert_close(student_state[f"{name}.{part}"], tensor, rtol=0, atol=0)
    assert student.double_blocks[0].img_attn.qkv.scale_rule == "calibrated"
    result = distill(student, dataset, config, log=lambda _: None)
    assert result.output is not None
    trained = load_ternary_model(result.output)
    assert (
        trained.metadata["scale_rule"] == "calibrated" and trained.metadata["init"] == "calibrated"
    )
    # refusals: a ternary model cannot be calibrated again; more samples than examples
    with pytest.raises(ValueError, match="already ternary"):
        load_student(result.output, 4, calibration=calibration)
    with pytest.raises(ValueError, match="calibration_samples 99 is larger"):
        check_run(DistillConfig(**{**base, "calibration_samples": 99}, init="calibrated"), dataset)
