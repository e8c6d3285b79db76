import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfyui_ternary_flux.models.family import ModelFamilyError
from comfyui_ternary_flux.models.files import load_ternary_model as load_ternary_file
from comfyui_ternary_flux.models.files import quantize_file, quantize_state_dict
from comfyui_ternary_flux.models.flux1 import TINY_FLUX, random_flux_state_dict
from comfyui_ternary_flux.ternary.fileformat import (
    StreamingWriter,
    TernaryFormatError,
    read_header,
    save_ternary_file,
)
from comfyui_ternary_flux.ternary.module import TernaryLinear
from comfyui_ternary_flux.ternary.packing import unpack_2bit
from comfyui_ternary_flux.ternary.quantize import ternarize


@pytest.fixture(scope="module")
def tiny_state():
    return random_flux_state_dict(TINY_FLUX, seed=7)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny_state):
    path = tmp_path_factory.mktemp("src") / "tiny.safetensors"
    save_file(tiny_state, str(path))
    return path


def _files(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("packing", ["2bit", "base3"])
def test_file_round_trip_gives_the_same_layers(tmp_path, tiny_file, tiny_state, packing):
    out = tmp_path / "t.safetensors"
    report = quantize_file(tiny_file, out, lora_rank=4, packing=packing)
    ckpt = load_ternary_file(out)
    assert ckpt.config == TINY_FLUX
    assert ckpt.lora_rank == 4 and ckpt.stored_packing == packing
    assert len(ckpt.layers) == len(report.layers) == 2 * 10 + 2 * 3
    for name, (_, k) in ckpt.layers.items():
        w = tiny_state[f"{name}.weight"]
        t, s = ternarize(w)
        assert torch.equal(unpack_2bit(ckpt.state_dict[f"{name}.weight"], k), t)
        assert torch.equal(ckpt.state_dict[f"{name}.weight_scale"], s)
        assert torch.equal(ckpt.state_dict[f"{name}.bias"], tiny_state[f"{name}.bias"])
    # Everything outside the blocks is kept exactly.
    for key in ("img_in.weight", "txt_in.bias", "final_layer.adaLN_modulation.1.weight"):
        assert torch.equal(ckpt.state_dict[key], tiny_state[key])
    assert _files(tmp_path) == ["t.safetensors"]


def test_in_memory_and_file_quantization_agree(tmp_path, tiny_file, tiny_state):
    tensors, layers, _ = quantize_state_dict(tiny_state, lora_rank=2, packing="2bit")
    save_ternary_file(tmp_path / "m.safetensors", tensors, layers, packing="2bit", lora_rank=2)
    quantize_file(tiny_file, tmp_path / "f.safetensors", lora_rank=2, packing="2bit")
    a = load_ternary_file(tmp_path / "m.safetensors").state_dict
    b = load_ternary_file(tmp_path / "f.safetensors").state_dict
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loaded_layer_computes_the_float64_reference(tmp_path, tiny_file, tiny_state):
    out = tmp_path / "t.safetensors"
    quantize_file(tiny_file, out, lora_rank=4)
    ckpt = load_ternary_file(out)
    name = "single_blocks.1.linear2"
    n, k = ckpt.layers[name]
    layer = TernaryLinear(k, n, lora_rank=4, dtype=torch.bfloat16)
    layer.load_state_dict({s: ckpt.state_dict[f"{name}.{s}"] for s in layer.state_dict()})
    x = torch.randn(3, 5, k, dtype=torch.float32)
    w = tiny_state[f"{name}.weight"].double()
    t, s = ternarize(w)
    down = ckpt.state_dict[f"{name}.lora_down"].double()
    up = ckpt.state_dict[f"{name}.lora_up"].double()
    ref = x.double() @ (t.double() * s.double()[:, None]).T + tiny_state[f"{name}.bias"].double()
    ref = ref + (x.double() @ down.T) @ up.T
    y = layer.float()(x)
    assert torch.linalg.norm(y.double() - ref) / torch.linalg.norm(ref) < 1e-5


def test_full_flux_dev_size_is_planned_under_3_1_gb():
    from comfyui_ternary_flux.models.files import ternary_layers
    from comfyui_ternary_flux.models.flux1 import FAMILY, FLUX_DEV, flux_shapes
    from comfyui_ternary_flux.ternary.convert import plan_entries

    shapes = {k: (torch.bfloat16, s) for k, s in flux_shapes(FLUX_DEV).items()}
    bf16 = sum(torch.Size(s).numel() * 2 for _, s in shapes.values())
    for packing, limit in (("2bit", 3.11e9), ("base3", 2.6e9)):
        layers = ternary_layers(FAMILY, shapes, 0)
        entries = plan_entries(shapes, layers, packing)
        size = sum(
            torch.Size(s).numel() * torch.empty((), dtype=d).element_size()
            for d, s in entries.values()
        )
        assert len(layers) == 19 * 10 + 38 * 3
        assert size < limit, (packing, size)
    assert bf16 / size > 9.0  # base3


def test_not_flux_is_refused_and_leaves_nothing(tmp_path):
    src = tmp_path / "sdxl.safetensors"
    save_file(
        {"conv_in.weight": torch.zeros(4, 4), "time_embed.0.weight": torch.zeros(8, 4)}, str(src)
    )
    with pytest.raises(
        ModelFamilyError,
        match=r"not a model this pack knows \(top-level keys: conv_in, time_embed\); "
        r"supported: FLUX.1 \(flux\)",
    ):
        quantize_file(src, tmp_path / "out.safetensors")
    with pytest.raises(TernaryFormatError, match="not a ternary-flux file"):
        load_ternary_file(src)
    assert _files(tmp_path) == ["sdxl.safetensors"]


def test_truncated_files_are_named_as_such(tmp_path, tiny_file):
    out = tmp_path / "t.safetensors"
    quantize_file(tiny_file, out)
    data = out.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TernaryFormatError, match="truncated file"):
        load_ternary_file(cut)
    cut.write_bytes(data[:5])
    with pytest.raises(TernaryFormatError, match="truncated or not a safetensors file"):
        load_ternary_file(cut)
    cut.write_bytes(b"\xff" * 64)
    with pytest.raises(TernaryFormatError, match="not a safetensors file"):
        load_ternary_file(cut)
    with pytest.raises(ValueError, match="truncated"):
        quantize_file(cut, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def _rewrite_header(src, dst, edit):
    data = src.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def test_unknown_version_and_wrong_shapes_are_named(tmp_path, tiny_file):
    out = tmp_path / "t.safetensors"
    quantize_file(tiny_file, out)
    bad = tmp_path / "bad.safetensors"
    _rewrite_header(out, bad, lambda h: h["__metadata__"].update(format_version="7"))
    with pytest.raises(TernaryFormatError, match="unknown ternary-flux version '7'"):
        load_ternary_file(bad)

    def shrink(h):
        h["single_blocks.0.linear1.weight_scale"]["shape"] = [3]
        h["single_blocks.0.linear1.weight_scale"]["data_offsets"][1] = (
            h["single_blocks.0.linear1.weight_scale"]["data_offsets"][0] + 12
        )

    _rewrite_header(out, bad, shrink)
    with pytest.raises(
        TernaryFormatError, match=r"single_blocks.0.linear1.weight_scale is F32 \[3\]"
    ):
        load_ternary_file(bad)

    def drop(h):
        del h["double_blocks.1.txt_mlp.2.weight"]

    _rewrite_header(out, bad, drop)
    with pytest.raises(TernaryFormatError, match="has no tensor double_blocks.1.txt_mlp.2.weight"):
        load_ternary_file(bad)


def test_existing_output_is_never_overwritten_without_asking(tmp_path, tiny_file):
    out = tmp_path / "t.safetensors"
    out.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="exists"):
        quantize_file(tiny_file, out)
    assert out.read_bytes() == b"user data"
    quantize_file(tiny_file, out, overwrite=True)
    assert load_ternary_file(out).config == TINY_FLUX
    assert _files(tmp_path) == ["t.safetensors"]


def test_streaming_writer_leaves_no_partial_file_on_error(tmp_path):
    out = tmp_path / "w.safetensors"
    entries = {"a": (torch.float32, (2,)), "b": (torch.uint8, (3,))}
    with pytest.raises(ValueError, match="declared"):
        with StreamingWriter(out, entries, {}) as writer:
            writer.write("a", torch.ones(2))
            writer.write("b", torch.ones(3))  # wrong dtype
    with pytest.raises(RuntimeError, match="closed before tensor 'b'"):
        with StreamingWriter(out, entries, {}) as writer:
            writer.write("a", torch.ones(2))
    assert _files(tmp_path) == []
    with StreamingWriter(out, entries, {"k": "v"}) as writer:
        writer.write("a", torch.tensor([1.5, -2.0]))
        writer.write("b", torch.tensor([1, 2, 3], dtype=torch.uint8))
    metadata, infos = read_header(out)
    assert metadata == {"k": "v"} and infos == {"a": ("F32", (2,)), "b": ("U8", (3,))}
    from safetensors.torch import load_file

    assert load_file(str(out))["a"].tolist() == [1.5, -2.0]


def test_bad_weights_are_refused_and_leave_nothing(tmp_path, tiny_state):
    cases = {
        "nan": {"double_blocks.1.img_mlp.0.weight": torch.full((1024, 256), float("nan"))},
        "gap": {"double_blocks.5.img_mlp.0.weight": torch.zeros(1024, 256)},
        "int64": {"extra.index": torch.zeros(3, dtype=torch.int64)},
    }
    messages = {
        "nan": "double_blocks.1.img_mlp.0: weight of shape .* NaN",
        "gap": r"double blocks \[2, 3, 4\] are missing",
        "int64": "dtype I64, which is not supported",
    }
    for name, change in cases.items():
        src = tmp_path / f"{name}.safetensors"
        save_file(
            {
                **tiny_state,
                **{
                    k: v.to(torch.bfloat16) if v.is_floating_point() else v
                    for k, v in change.items()
                },
            },
            str(src),
        )
        with pytest.raises(ValueError, match=messages[name]):
            quantize_file(src, tmp_path / "out.safetensors")
        assert not (tmp_path / "out.safetensors").exists()
    assert len(list(tmp_path.iterdir())) == len(cases)


def test_schnell_architecture_without_guidance_round_trips(tmp_path):
    from dataclasses import replace

    schnell = replace(TINY_FLUX, guidance_embed=False)
    state = random_flux_state_dict(schnell, seed=5)
    assert not any(k.startswith("guidance_in") for k in state)
    tensors, layers, report = quantize_state_dict(state)
    assert report.model.startswith("FLUX.1 (schnell-like)")
    save_ternary_file(tmp_path / "s.safetensors", tensors, layers)
    assert load_ternary_file(tmp_path / "s.safetensors").config == schnell


def test_format_v1_file_of_the_code_before_the_restructuring_loads_bit_identically():
    """tests/data/v1_tiny_base3_lora4.safetensors was written by the code of commit 4120ace
    (tiny FLUX, base3, LoRA rank 4, lsq); its loaded tensors' digests were recorded by that
    code, the forward output of the pure-torch model after its RMSNorm eps became 1e-6
    (2.5e-7 relative from the output recorded before)."""
    import hashlib

    from safetensors.torch import load_file

    from comfyui_ternary_flux.models.flux1_torch import ternary_flux_from_state_dict

    data = Path(__file__).parent / "data"
    loaded = load_ternary_file(data / "v1_tiny_base3_lora4.safetensors")
    assert loaded.stored_packing == "base3" and loaded.lora_rank == 4
    assert loaded.family.name == "flux" and loaded.config.hidden_size == 128
    digests = json.loads((data / "v1_tiny_loaded_sha256.json").read_text())["sha256"]
    got = {
        key: hashlib.sha256(
            t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        ).hexdigest()
        for key, t in loaded.state_dict.items()
    }
    assert got == digests
    expected = load_file(data / "v1_tiny_expected.safetensors")
    model = ternary_flux_from_state_dict(loaded.state_dict, loaded.layers, dtype=torch.float32)
    with torch.no_grad():
        out = model(
            expected["x"], torch.tensor([0.6]), expected["context"], expected["y"],
            torch.tensor([3.5]),
        )  # fmt: skip
    assert torch.equal(out, expected["out"])
