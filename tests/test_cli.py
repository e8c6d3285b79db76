import errno
import os
import re
import signal
import subprocess
import sys

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
    assert main(["quantize", str(tmp_path), "-o", str(tmp_path / "f.safetensors")]) == 4
    assert f"error: {tmp_path}: is a folder, not a safetensors file" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["quantize", "--device", "cuda", "-o", str(tmp_path / "c.safetensors")]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    for typo in ("gpu", "meta"):  # refused by name, not a traceback from the first tensor
        assert main(["quantize", "--device", typo, "-o", str(tmp_path / "c.safetensors")]) == 2
        assert f"--device {typo!r}: not a device to quantize on" in _one_line(
            capsys.readouterr().err
        )
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


def _tiny_source(folder):
    src = folder / "src.safetensors"
    save_file(random_flux_state_dict(TINY_FLUX, seed=3), str(src))
    return src


def _one_line(err):
    """The one ``error:`` line that ends stderr (progress lines may come before it)."""
    lines = err.splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert [line for line in lines if not line.startswith("quantizing")] == lines[-1:], err
    return lines[-1]


def _fail_fsync(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _no_access(path, mode):
    return False


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("disk full", 4, r"out\.safetensors: No space left on device$"),
        ("read-only folder", 4, r"ro: folder is not writable$"),
        ("permission denied", 4, r"denied/out\.safetensors: Permission denied$"),
        ("read-only file system", 4, r"denied/out\.safetensors: Read-only file system$"),
        ("force onto a folder", 4, r"folder: is a directory, not a file$"),
        ("name too long", 4, r"x{256}: file name longer than 255 bytes$"),
        ("inside a file", 4, r"src\.safetensors: is not a folder$"),
        ("unreadable source", 4, r"src\.safetensors: Permission denied$"),
    ],
)
def test_file_system_errors_are_one_line_naming_the_file(tmp_path, monkeypatch, capsys, case,
                                                         code, message):  # fmt: skip
    import builtins

    src = _tiny_source(tmp_path)
    out = tmp_path / "out.safetensors"
    extra = []
    if case == "disk full":  # file systems report a full disk at write or at fsync
        monkeypatch.setattr(os, "fsync", _fail_fsync)
    elif case == "read-only folder":
        (tmp_path / "ro").mkdir()
        out = tmp_path / "ro" / "out.safetensors"
        monkeypatch.setattr(os, "access", _no_access)
    elif case in ("permission denied", "read-only file system"):
        (tmp_path / "denied").mkdir()
        out = tmp_path / "denied" / "out.safetensors"
        number = errno.EACCES if case == "permission denied" else errno.EROFS
        real_open = builtins.open

        def refusing_open(file, mode="r", *args, **kwargs):
            if "w" in mode and os.path.dirname(str(file)) == str(out.parent):
                raise OSError(number, os.strerror(number), str(file))  # the temporary's name
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)
    elif case == "force onto a folder":
        out = tmp_path / "folder"
        out.mkdir()
        extra = ["--force"]
    elif case == "name too long":
        out = tmp_path / ("x" * 256)
    elif case == "inside a file":
        out = src / "out.safetensors"
    elif case == "unreadable source":
        real_open = builtins.open

        def refusing_open(file, mode="r", *args, **kwargs):
            if str(file) == str(src):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["quantize", str(src), "-o", str(out), *extra]) == code
    assert re.search(message, _one_line(capsys.readouterr().err).strip())
    monkeypatch.undo()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_long_name_that_fits_is_written(tmp_path):
    out = tmp_path / ("y" * 243 + ".safetensors")  # 255 bytes
    assert main(["quantize", str(_tiny_source(tmp_path)), "-o", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "src.safetensors"])


@pytest.mark.parametrize(
    ("how", "code", "said"),
    [("ctrl-c", 130, "interrupted (Ctrl-C)"), ("sigterm", 143, "terminated (SIGTERM)")],
)
def test_ctrl_c_and_sigterm_end_cleanly(tmp_path, monkeypatch, capsys, how, code, said):
    from comfyui_ternary_flux.models import files

    real = files.quantize_layer
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # mid-way through the file
            if how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(files, "quantize_layer", interrupted)
    src = _tiny_source(tmp_path)
    previous = signal.getsignal(signal.SIGTERM)
    assert main(["quantize", str(src), "-o", str(tmp_path / "out.safetensors")]) == code
    assert said in _one_line(capsys.readouterr().err)
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is the command's only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]


def test_ctrl_c_while_the_command_line_starts_is_one_line():
    """Ctrl-C in the seconds torch takes to load (before main runs): exit 130, no traceback."""
    script = (
        "import builtins, runpy\n"
        "real = builtins.__import__\n"
        "def interrupted(name, *args, **kwargs):\n"
        "    if name == 'torch':\n"
        "        raise KeyboardInterrupt\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = interrupted\n"
        "runpy.run_module('comfyui_ternary_flux', run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", script, "info", "x"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 130, done.stderr
    assert done.stderr == "error: interrupted (Ctrl-C) while starting; nothing was done\n"


def test_sigterm_from_outside_removes_the_partial_file(tmp_path):
    """A real process, terminated while it writes: exit code 143, nothing left behind."""
    src = _tiny_source(tmp_path)
    script = (
        "import sys, time\n"
        "from comfyui_ternary_flux.models import files\n"
        "real = files.quantize_layer\n"
        "def slow(*a, **k):\n"
        "    print('layer', flush=True); time.sleep(0.2); return real(*a, **k)\n"
        "files.quantize_layer = slow\n"
        "from comfyui_ternary_flux.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "out.safetensors"
    child = subprocess.Popen(
        [sys.executable, "-c", script, "quantize", str(src), "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for _ in range(3):
        assert child.stdout.readline().strip() == "layer"
    assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())  # it is writing
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 143, err
    assert err.strip().splitlines()[-1] == "error: terminated (SIGTERM); no partial output was left"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]
