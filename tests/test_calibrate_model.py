"""Calibrated quantization of a whole FLUX.1 model: the block-by-block Hessians against a
float64 reference, ``quantize --calibrate`` end to end and its refusals, the calibrated
student of ``init = "calibrated"``, and resuming an interrupted calibration."""

from __future__ import annotations

import json
import os
import signal
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
from comfyui_ternary_flux.models.files import calibration_store, load_ternary_model, quantize_file
from comfyui_ternary_flux.models.flux1 import FluxConfig, flux_shapes
from comfyui_ternary_flux.models.flux1_calibrate import Calibration, FluxCalibrator
from comfyui_ternary_flux.models.flux1_torch import flux_from_state_dict
from comfyui_ternary_flux.ternary.calibrate import CalibrationError, accumulate_hessian
from comfyui_ternary_flux.ternary.integrity import read_checked, write_checked
from comfyui_ternary_flux.ternary.resume import ResumeError, ResumeStore

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


# --------------------------------------------------------------------------- resume

# Two double and two single blocks (26 ternary layers), the widths of SMALL: the data set
# of ``job`` fits it (calibration only runs the source model on its latents and conditioning).
DEEP = FluxConfig(
    hidden_size=128, num_heads=1, depth=2, depth_single_blocks=2, mlp_ratio=2.0,
    context_in_dim=64, vec_in_dim=32,
)  # fmt: skip
DEEP_LAYERS = {"double": 10, "single": 3}  # ternary linears per block
ORDER = ["double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1"]


@pytest.fixture(scope="module")
def deep(job, tmp_path_factory) -> dict:
    """deep.safetensors beside the data set, and the file an uninterrupted run makes of it,
    for each inputs mode."""
    src = job / "deep.safetensors"
    save_file(random_weights(flux_shapes(DEEP), 7, dtype=torch.float32), str(src))
    folder = tmp_path_factory.mktemp("uninterrupted")
    reference = {}
    for inputs in flux1_calibrate.INPUTS:
        out = folder / f"{inputs}.safetensors"
        assert main([*_deep_args(job, src, out), "--calibration-inputs", inputs]) == 0
        reference[inputs] = out.read_bytes()
    return {"src": src, "reference": reference}


def _deep_args(job: Path, src: Path, out: Path) -> list[str]:
    return [
        "quantize", str(src), "-o", str(out), "--lora-rank", "4", "--packing", "2bit",
        "--calibrate", str(job / "data"), "--calibration-samples", "8",
    ]  # fmt: skip


def _layers_quantized(monkeypatch) -> list[str]:
    """Counts the layers the calibrator quantizes (the shapes of the weights it is given)."""
    calls: list[str] = []
    real = flux1_calibrate.quantize_layer

    def counting(weight, *args, **kwargs):
        calls.append(tuple(weight.shape))
        return real(weight, *args, **kwargs)

    monkeypatch.setattr(flux1_calibrate, "quantize_layer", counting)
    return calls


def _interrupt_after_blocks(monkeypatch, blocks: int, how: str = "ctrl-c") -> None:
    """Ctrl-C (or SIGTERM) right after the store kept its ``blocks``-th block."""
    real = ResumeStore.put
    kept = []

    def put(self, key, tensors, metadata):
        real(self, key, tensors, metadata)
        kept.append(key)
        if len(kept) == blocks:
            if how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ResumeStore, "put", put)


def _interrupted_run(
    job: Path, src: Path, tmp_path: Path, monkeypatch, blocks: int
) -> tuple[Path, list[str], Path]:
    """(output, command, store) of a calibrated quantize stopped by Ctrl-C after ``blocks``
    blocks were kept."""
    out = tmp_path / "out.safetensors"
    args = _deep_args(job, src, out)
    with monkeypatch.context() as patch:
        _interrupt_after_blocks(patch, blocks)
        assert main(args) == 130
    return out, args, calibration_store(out)


def _pieces(store: Path) -> list[str]:
    return sorted(p.name for p in store.glob("*.safetensors"))


@pytest.mark.parametrize(
    ("inputs", "blocks", "how", "code"),
    [
        ("quantized", 1, "ctrl-c", 130),  # inside the double stream
        ("quantized", 3, "sigterm", 143),  # past the switch to the single stream
        ("quantized", 4, "ctrl-c", 130),  # every block done, the file not yet written
        ("dense", 2, "ctrl-c", 130),
    ],
)
def test_an_interrupted_calibration_resumes_to_the_same_file(
    job, deep, tmp_path, monkeypatch, capsys, inputs, blocks, how, code
):
    """The must-have: interrupted after k blocks, the same command again loads those k
    blocks, restores the hidden states at block k + 1 and makes the file an uninterrupted
    run makes, byte for byte; the store is gone afterwards."""
    out = tmp_path / "out.safetensors"
    args = [*_deep_args(job, deep["src"], out), "--calibration-inputs", inputs]
    store = calibration_store(out)
    assert store == tmp_path / "out.safetensors.calibration-partial"
    with monkeypatch.context() as patch:
        _interrupt_after_blocks(patch, blocks, how)
        assert main(args) == code
    err = capsys.readouterr().err
    assert not out.exists() and _pieces(store) == sorted(f"{b}.safetensors" for b in ORDER[:blocks])
    assert f"the finished blocks are kept in {store}: run the same command again" in err
    assert err.strip().splitlines()[-1].startswith(("error: interrupted", "error: terminated"))

    calls = _layers_quantized(monkeypatch)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"resuming: {blocks} of 4 blocks done (kept in {store})" in text
    assert "26 of 26 layers lower" in text  # the report holds the kept blocks' errors too
    done = sum(DEEP_LAYERS[b.split("_")[0]] for b in ORDER[:blocks])
    assert len(calls) == 26 - done  # the kept blocks were not calibrated again
    assert out.read_bytes() == deep["reference"][inputs]
    assert not store.exists()


def test_a_resume_with_other_settings_is_refused_and_restart_starts_over(
    job, deep, tmp_path, monkeypatch, capsys
):
    out, args, store = _interrupted_run(job, deep["src"], tmp_path, monkeypatch, 2)
    kept = {p.name: p.read_bytes() for p in store.iterdir()}
    capsys.readouterr()

    def refused(*changed: str) -> str:
        assert main([*args, *changed]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err  # one line, no note about resuming
        assert {p.name: p.read_bytes() for p in store.iterdir()} == kept and not out.exists()
        assert f"{store} holds an interrupted run with other settings" in err
        assert "start over with --restart (or delete that folder)" in err
        return err

    assert "lora_rank 4 there, 8 now" in refused("--lora-rank", "8")
    assert "samples 8 there, 6 now" in refused("--calibration-samples", "6")
    assert "inputs 'quantized' there, 'dense' now" in refused("--calibration-inputs", "dense")
    assert "packing '2bit' there, 'base3' now" in refused("--packing", "base3")
    other_data = tmp_path / "other-data"  # same examples' shapes, other prompts
    teacher = flux_from_state_dict(small_state(), dtype=torch.float32).eval()
    build_teacher_dataset(other_data, [p + "!" for p in PROMPTS], encoder(),
                          model_velocity_fn(teacher), SETTINGS, log=lambda _: 0)  # fmt: skip
    err = refused("--calibrate", str(other_data))
    assert "data 'data' there, 'other-data' now" in err and "data_fingerprint" in err
    stat = deep["src"].stat()
    try:  # the same name, but the file changed since
        os.utime(deep["src"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert "(source differs (mtime_ns)); rerun" in refused()
    finally:
        os.utime(deep["src"], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # a plain quantize to the same output leaves the kept blocks as they are, and says so
    assert main(["quantize", str(deep["src"]), "-o", str(out), "--lora-rank", "4"]) == 0
    err = capsys.readouterr().err
    assert f"note: {store} holds the finished blocks of an interrupted calibrated run" in err
    assert {p.name: p.read_bytes() for p in store.iterdir()} == kept
    out.unlink()

    calls = _layers_quantized(monkeypatch)
    assert main([*args, "--lora-rank", "8", "--restart"]) == 0
    assert "resuming" not in capsys.readouterr().out and len(calls) == 26
    assert load_ternary_model(out).lora_rank == 8 and not store.exists()
    assert main(["quantize", str(deep["src"]), "--restart", "-o", str(tmp_path / "x")]) == 2
    assert "--restart needs --calibrate" in capsys.readouterr().err


def test_a_damaged_block_is_computed_again_with_the_blocks_after_it(
    job, deep, tmp_path, monkeypatch, capsys
):
    out, args, store = _interrupted_run(job, deep["src"], tmp_path, monkeypatch, 3)
    damaged = store / "double_blocks.1.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 0x01  # a flipped bit in the last tensor's bytes
    damaged.write_bytes(bytes(data))
    capsys.readouterr()
    calls = _layers_quantized(monkeypatch)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"{damaged}: damaged: its tensors do not match the sha256 in its header; " in text
    assert "computing it again" in text and "resuming: 1 of 4 blocks done" in text
    assert len(calls) == 26 - 10  # double block 1 and everything after it: again
    assert out.read_bytes() == deep["reference"]["quantized"] and not store.exists()


def test_a_store_piece_of_other_tensors_is_named(job, deep, tmp_path, monkeypatch, capsys):
    """A piece whose digest is right but whose tensors are not the block's layers (written by
    another version, or by hand) is refused by name, not loaded."""
    out, args, store = _interrupted_run(job, deep["src"], tmp_path, monkeypatch, 2)
    piece = store / "double_blocks.0.safetensors"
    tensors, metadata = read_checked(piece)
    tensors.pop("double_blocks.0.img_mlp.2.lora_alpha")
    metadata.pop("sha256")
    write_checked(piece, tensors, metadata)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{store}: the piece of double_blocks.0 does not hold its layers" in err
    assert "lora_alpha" in err and not out.exists() and piece.exists()
    assert len(err.strip().splitlines()) == 1, err  # a refusal: no note about resuming
    out.write_bytes(b"an output already there")  # (Ctrl-C after it was written, say)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "exists; pass --force" in err, err


def test_a_source_swapped_with_its_size_and_mtime_kept_is_refused_by_block(
    job, deep, tmp_path, monkeypatch, capsys
):
    """The record's file identity (path, size, mtime) cannot tell a swapped file of the same
    size whose mtime was kept: each kept block's source digest does, by name."""
    src = tmp_path / "src.safetensors"
    src.write_bytes(deep["src"].read_bytes())
    out, args, _ = _interrupted_run(job, src, tmp_path, monkeypatch, 2)
    stat = src.stat()
    weights = random_weights(flux_shapes(DEEP), 7, dtype=torch.float32)
    key = "double_blocks.1.img_mlp.0.weight"
    weights[key] = weights[key] + 1.0  # the same shapes and dtypes: the same size
    save_file(weights, str(src))
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert src.stat().st_size == stat.st_size
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "double_blocks.1 was calibrated from other source weights" in err
    assert not out.exists() and len(_pieces(calibration_store(out))) == 2


def test_other_examples_of_the_same_count_without_a_named_source_are_refused(
    job, deep, tmp_path, monkeypatch
):
    """quantize_file's calibration may name no data set (``source`` empty): the examples'
    digest is what tells a rerun on other examples of the same count."""
    examples = list(teacher_calibration(job / "data", 8).examples)
    out = tmp_path / "out.safetensors"
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        _interrupt_after_blocks(patch, 1)
        quantize_file(deep["src"], out, 4, packing="2bit", calibration=Calibration(examples))
    others = [{**e, "t": e["t"] * 0.5} for e in examples]  # the same count and shapes
    with pytest.raises(ResumeError, match=r"other settings \(examples_sha256 '"):
        quantize_file(deep["src"], out, 4, packing="2bit", calibration=Calibration(others))
    assert len(_pieces(calibration_store(out))) == 1 and not out.exists()


def test_joining_the_streams_frees_each_batch_of_the_double_streams_as_it_goes(monkeypatch):
    """At the first single block the hidden states become one stream: each batch's double-
    stream tensors are freed once its examples are joined (on FLUX.1-dev the whole-list join
    held both copies, 6.4 GiB each, and was the calibration's peak)."""
    import types
    import weakref

    gen = torch.Generator().manual_seed(0)
    img_batches = [torch.randn(2, 5, 3, generator=gen) for _ in range(3)]
    txt_batches = [torch.randn(2, 4, 3, generator=gen) for _ in range(3)]
    expected = [
        torch.cat((t[j], i[j]))
        for t, i in zip(txt_batches, img_batches, strict=True)
        for j in (0, 1)
    ]
    alive_refs = [weakref.ref(b) for b in img_batches + txt_batches]
    state = types.SimpleNamespace(
        img=[b[j] for b in img_batches for j in (0, 1)],  # views, as the blocks' outputs are
        txt=[b[j] for b in txt_batches for j in (0, 1)],
        joint=[],
    )
    del img_batches, txt_batches
    alive_at_each_join, real_cat = [], torch.cat

    def counting_cat(tensors):
        alive_at_each_join.append(sum(ref() is not None for ref in alive_refs))
        return real_cat(tensors)

    monkeypatch.setattr(torch, "cat", counting_cat)
    FluxCalibrator._join_streams(state)
    monkeypatch.undo()
    assert alive_at_each_join == [6, 6, 4, 4, 2, 2]  # img + txt tensors of the batches left
    assert all(ref() is None for ref in alive_refs)
    assert (state.img, state.txt) == ([], [])
    assert all(torch.equal(a, b) for a, b in zip(state.joint, expected, strict=True))
