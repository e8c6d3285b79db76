import pytest
import torch
from safetensors.torch import save_file

from comfyui_ternary_flux.cli.main import main
from comfyui_ternary_flux.models.files import load_ternary_model as load_ternary_file
from comfyui_ternary_flux.models.flux1 import TINY_FLUX, random_flux_state_dict


def test_default_job_quantizes_the_embedded_tiny_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "--lora-rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "parameters quantized" in out and "wrote tiny-flux-ternary.safetensors" in out
    ckpt = load_ternary_file(tmp_path / "tiny-flux-ternary.safetensors")
    assert ckpt.config == TINY_FLUX and ckpt.lora_rank == 4
    # A second run refuses to overwrite, and --force replaces the file.
    assert main(["quantize"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["quantize", "--force", "--packing", "2bit"]) == 0
    assert load_ternary_file(tmp_path / "tiny-flux-ternary.safetensors").lora_rank == 0
    assert main(["info", "tiny-flux-ternary.safetensors"]) == 0
    assert "26 ternary" in capsys.readouterr().out


def test_full_checkpoint_with_prefix_and_other_models(tmp_path, capsys):
    state = random_flux_state_dict(TINY_FLUX, seed=3)
    full = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    full["vae.decoder.conv_in.weight"] = torch.zeros(4, 4)
    save_file(full, str(tmp_path / "ckpt.safetensors"))
    assert (
        main(
            ["quantize", str(tmp_path / "ckpt.safetensors"), "-o", str(tmp_path / "o.safetensors")]
        )
        == 0
    )
    ckpt = load_ternary_file(tmp_path / "o.safetensors")
    assert "vae.decoder.conv_in.weight" not in ckpt.state_dict
    assert torch.equal(ckpt.state_dict["img_in.weight"], state["img_in.weight"])


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    save_file({"x.weight": torch.zeros(2, 2)}, str(tmp_path / "notflux.safetensors"))
    assert main(["quantize", str(tmp_path / "notflux.safetensors")]) == 2
    assert (
        "not a model this pack knows (top-level keys: x); supported: FLUX.1"
        in capsys.readouterr().err
    )
    assert main(["quantize", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["quantize", "--device", "cuda", "-o", str(tmp_path / "c.safetensors")]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    state = random_flux_state_dict(TINY_FLUX, seed=3)
    state["double_blocks.0.img_attn.qkv.scale_weight"] = torch.ones(1)
    save_file(state, str(tmp_path / "fp8scaled.safetensors"))
    assert main(["quantize", str(tmp_path / "fp8scaled.safetensors")]) == 2
    assert "scaled-fp8" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fp8scaled.safetensors",
        "notflux.safetensors",
    ]


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "quantize" in capsys.readouterr().out


def test_import_reproduction_command(tmp_path, capsys):
    from test_reproduction import CONFIG, make_checkpoint, to_diffusers

    bfl = random_flux_state_dict(CONFIG, seed=3)
    linears, _ = to_diffusers(bfl)
    save_file(bfl, str(tmp_path / "base.safetensors"))
    torch.save(make_checkpoint(linears, rank=4, seed=4), tmp_path / "r4.pt")
    args = ["import-reproduction", str(tmp_path / "base.safetensors"), str(tmp_path / "r4.pt")]
    out = str(tmp_path / "o.safetensors")
    assert main([*args, "-o", out]) == 0
    assert "LoRA rank 4" in capsys.readouterr().out
    ckpt = load_ternary_file(out)
    assert ckpt.lora_rank == 4
    assert ckpt.state_dict["double_blocks.0.img_attn.qkv.lora_down"].shape[0] == 12  # 3 slices
    assert main([*args, "-o", out]) == 2
    assert "exists" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main(["import-reproduction", args[1], str(tmp_path / "bad.pt"), "-o", out + "2"]) == 2
    assert "bad.pt" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors2").exists()
