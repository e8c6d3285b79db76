import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from comfyui_ternary_flux.models.family import ModelFamilyError
from comfyui_ternary_flux.models.files import load_ternary_model as load_ternary_file
from comfyui_ternary_flux.models.files import quantize_file, quantize_state_dict
from comfyui_ternary_flux.models.flux1 import TINY_FLUX, FluxConfig, random_flux_state_dict
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
    code, the forward output of the pure-torch model (one CPU thread) after its RMSNorm eps
    became 1e-6 (2.5e-7 relative from the output recorded before)."""
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU sums depend on the thread count; recorded with one thread
    with torch.no_grad():
        out = model(
            expected["x"], torch.tensor([0.6]), expected["context"], expected["y"],
            torch.tensor([3.5]),
        )  # fmt: skip
    torch.set_num_threads(threads)
    assert torch.equal(out, expected["out"])


# --- Malformed and damaged files: every one is a TernaryFormatError naming the problem. ---

MICRO = FluxConfig(
    hidden_size=32, num_heads=2, depth=1, depth_single_blocks=1, in_channels=4,
    context_in_dim=8, vec_in_dim=8,
)  # fmt: skip


@pytest.fixture(scope="module")
def micro_files(tmp_path_factory):
    """Valid ternary files of about 80 KB (FLUX.1 architecture, hidden 32, LoRA rank 2), one
    per packing."""
    folder = tmp_path_factory.mktemp("micro")
    state = random_flux_state_dict(MICRO, seed=1)
    files = {}
    for packing in ("base3", "2bit"):
        tensors, layers, _ = quantize_state_dict(state, lora_rank=2, packing=packing)
        files[packing] = folder / f"micro-{packing}.safetensors"
        save_ternary_file(
            files[packing], tensors, layers, packing, lora_rank=2, architecture="flux"
        )
    return files


def _split(path):
    """(header dict, the bytes after the header) of a safetensors file."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _write(path, header, body, raw=None):
    raw = json.dumps(header).encode() if raw is None else raw
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return path


def _edit_tensor(src, dst, key, edit):
    """Copy ``src`` to ``dst`` with tensor ``key``'s bytes changed by ``edit(bytearray)``."""
    header, body = _split(src)
    begin, end = header[key]["data_offsets"]
    body = bytearray(body)
    part = bytearray(body[begin:end])
    edit(part)
    body[begin:end] = part
    return _write(dst, header, bytes(body))


@pytest.mark.parametrize(
    ("marker", "match"),
    [
        ("pt", r"format 'pt'\): an ordinary safetensors model\? quantize it first"),
        (None, r"format None\): an ordinary safetensors model\? quantize it first"),
        ("gguf", r"marker is 'gguf'.*made by another tool; if it is an ordinary model, quantize"),
    ],
)
def test_foreign_format_markers_get_a_hint(tmp_path, marker, match):
    path = tmp_path / "plain.safetensors"
    state = random_flux_state_dict(MICRO, seed=2)
    save_file(state, str(path), metadata=None if marker is None else {"format": marker})
    with pytest.raises(TernaryFormatError, match=match):
        load_ternary_file(path)


def _meta(**changes):
    def edit(header):
        header["__metadata__"].update(changes)

    return edit


def _entry(key, **changes):
    def edit(header):
        header[key].update(changes)

    return edit


def _set(key, value):
    def edit(header):
        header[key] = value

    return edit


def _rename(old, new):
    def edit(header):
        header[new] = header.pop(old)

    return edit


SCALE = "double_blocks.0.img_attn.qkv.weight_scale"  # F32 [96]
NORM = "double_blocks.0.txt_attn.norm.key_norm.scale"
MALFORMED = {
    "deep nesting": (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    "not JSON": (b"{not json" + b" " * 7, "corrupt safetensors header"),
    "a JSON list": (b"[1, 2, 3]", r"not a JSON object"),
    "__metadata__ a list": (_set("__metadata__", [1]), "__metadata__ must be an object"),
    "__metadata__ numbers": (_meta(lora_rank=2), "__metadata__ must be an object of strings"),
    "layers a list": (_meta(layers="[1, 2]"), "layer list must be a non-empty object"),
    "layers not JSON": (_meta(layers="{"), "corrupt layer list"),
    "layers deep": (_meta(layers="[" * 100_000), "corrupt layer list"),
    "layer shape zero": (
        _meta(layers='{"single_blocks.0.linear2": [0, 160]}'),
        r"'single_blocks.0.linear2' has shape \[0, 160\], expected \[N, K\]",
    ),
    "layer shape scalar": (_meta(layers='{"single_blocks.0.linear2": 5}'), "has shape 5"),
    "layer shape float": (
        _meta(layers='{"single_blocks.0.linear2": [32.0, 160]}'),
        r"has shape \[32.0, 160\]",
    ),
    "layer shape infinite": (
        _meta(layers='{"single_blocks.0.linear2": [Infinity, 160]}'),
        r"has shape \[inf, 160\]",
    ),
    "lora_rank negative": (_meta(lora_rank="-3"), "lora_rank '-3' is not a whole number"),
    "entry not an object": (_set(SCALE, 5), f"corrupt header entry for '{SCALE}'"),
    "entry without offsets": (
        _set(SCALE, {"dtype": "F32", "shape": [96]}),
        f"corrupt header entry for '{SCALE}'",
    ),
    "tensor shape zero": (_entry(SCALE, shape=[0]), r"malformed shape \[0\]"),
    "tensor shape scalar": (_entry(SCALE, shape=96), "malformed shape 96"),
    "tensor shape float": (_entry(SCALE, shape=[96.0]), r"malformed shape \[96.0\]"),
    "tensor shape negative": (_entry(SCALE, shape=[-96]), r"malformed shape \[-96\]"),
    "tensor shape bool": (_entry(SCALE, shape=[True]), r"malformed shape \[True\]"),
    "tensor shape infinite": (_entry(SCALE, shape=[float("inf")]), r"malformed shape \[inf\]"),
    "tensor shape huge": (_entry(SCALE, shape=[2**41]), r"malformed shape \[2199023255552\]"),
    "offsets out of file": (_entry(SCALE, data_offsets=[0, 10**12]), "truncated file"),
    "offsets negative": (_entry(SCALE, data_offsets=[-384, 0]), "truncated file"),
    "offsets reversed": (_entry(SCALE, data_offsets=[384, 0]), "truncated file"),
    "offsets float": (_entry(SCALE, data_offsets=[0.0, 384]), "corrupt header entry"),
    "offsets overlap": (_entry(SCALE, data_offsets=[0, 384]), "overlap in the file"),
    "bytes for shape": (_entry(SCALE, shape=[95]), "bytes for its shape"),
    "unknown dtype": (_entry(SCALE, dtype="F128"), "dtype F128, which is not supported"),
    "dtype a number": (_entry(SCALE, dtype=3), "corrupt header entry"),
    "block index a word": (
        _rename(NORM, NORM.replace(".0.", ".x.")),
        "block index 'x' is not a number",
    ),
    "block index not ASCII": (
        _rename(NORM, NORM.replace(".0.", ".\u0661.")),
        "is not a number",
    ),
    "block index of a billion": (
        _rename(NORM, NORM.replace(".0.", ".1000000000.")),
        r"double blocks \[1, 2, 3, 4\] are missing",
    ),
    "other size in the embedder": (
        _entry("img_in.weight", shape=[64, 2]),
        r"img_in.bias has shape \[32\], expected \[64\] for FLUX.1",
    ),
    "unknown family": (_meta(architecture="sd3"), "unknown model family 'sd3'"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_headers_are_format_errors(tmp_path, micro_files, case):
    edit, match = MALFORMED[case]
    header, body = _split(micro_files["base3"])
    path = tmp_path / "bad.safetensors"
    if isinstance(edit, bytes):
        _write(path, header, body, raw=edit)
    else:
        header = json.loads(json.dumps(header))
        offset = header[SCALE]["data_offsets"][0]
        if case == "offsets overlap":  # the scale's bytes moved onto the tensor before it
            edit = _entry(SCALE, data_offsets=[offset - 8, offset + 376])
        edit(header)
        _write(path, header, body)
    with pytest.raises(TernaryFormatError, match=match):
        load_ternary_file(path)


def _nan(part):
    part[0:4] = struct.pack("<f", float("nan"))


def _inf(part):
    part[-4:] = struct.pack("<f", float("inf"))


DAMAGED = {
    "2bit code 3": ("2bit", "single_blocks.0.linear1.weight", lambda p: p.__setitem__(5, 0xFF),
                    "1 bytes with the invalid 2-bit code 3"),
    "base3 byte 243": ("base3", "single_blocks.0.linear1.weight",
                       lambda p: p.__setitem__(7, 243), "base3 bytes above 242"),
    "NaN scale": ("base3", SCALE, _nan, f"{SCALE} holds NaN or infinite values"),
    "infinite alpha": ("base3", "single_blocks.0.linear2.lora_alpha", _inf,
                       "single_blocks.0.linear2.lora_alpha holds NaN or infinite values"),
    "NaN dense weight": ("2bit", "img_in.weight", lambda p: p.__setitem__(slice(0, 2), b"\xc0\x7f"),
                         "img_in.weight holds NaN or infinite values"),
}  # fmt: skip


@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_tensor_contents_are_refused_by_the_loader_and_by_info(
    tmp_path, micro_files, capsys, case
):
    from comfyui_ternary_flux.cli.main import main

    packing, key, edit, match = DAMAGED[case]
    bad = _edit_tensor(micro_files[packing], tmp_path / "bad.safetensors", key, edit)
    with pytest.raises(TernaryFormatError, match=match):
        load_ternary_file(bad)
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad.safetensors: ") and re.search(match, err)
    assert err.count("\n") == 1  # one line, no traceback
    assert main(["info", str(micro_files[packing])]) == 0


def test_quantizing_a_ternary_file_says_already_ternary_first(tmp_path, micro_files, capsys):
    from comfyui_ternary_flux.cli.main import main

    with pytest.raises(TernaryFormatError, match="already ternary .* nothing to quantize"):
        quantize_file(micro_files["base3"], tmp_path / "again.safetensors")
    assert main(["quantize", str(micro_files["2bit"]), "-o", str(tmp_path / "b.safetensors")]) == 2
    captured = capsys.readouterr()
    assert "already ternary" in captured.err and "quantizing" not in captured.err
    assert _files(tmp_path) == []


def test_quantize_refuses_sources_with_overlapping_or_negative_offsets(tmp_path):
    src = tmp_path / "src.safetensors"
    save_file(random_flux_state_dict(MICRO, seed=3), str(src))
    header, body = _split(src)
    key = "img_in.weight"
    begin, end = header[key]["data_offsets"]
    for offsets, match in (([begin - 2, end - 2], "overlap"), ([-2, end - begin - 2], "truncated")):
        header[key]["data_offsets"] = offsets
        _write(tmp_path / "bad.safetensors", header, body)
        with pytest.raises(TernaryFormatError, match=match):
            quantize_file(tmp_path / "bad.safetensors", tmp_path / "out.safetensors")
    assert _files(tmp_path) == ["bad.safetensors", "src.safetensors"]


# --- Fuzzing: whatever is done to a valid file, the loader answers with its own error. ---

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _mutate_header(header, draw_path, value):
    """Replace the value at a path of keys (the header's own keys picked by index)."""
    node = header
    for step in draw_path[:-1]:
        if isinstance(node, dict) and node:
            node = node[sorted(node)[step % len(node)]]
        elif isinstance(node, list) and node:
            node = node[step % len(node)]
    last = draw_path[-1]
    if isinstance(node, dict) and node:
        node[sorted(node)[last % len(node)]] = value
    elif isinstance(node, list) and node:
        node[last % len(node)] = value


@settings(
    max_examples=int(os.environ.get("TERNARY_FLUX_FUZZ_EXAMPLES", 150)),
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_fuzzed_files_give_only_format_errors(tmp_path, micro_files, data):
    """Bytes flipped anywhere, header values replaced by any JSON, metadata strings replaced,
    files cut or extended: loading either succeeds or raises TernaryFormatError."""
    packing = data.draw(st.sampled_from(sorted(micro_files)))
    raw = micro_files[packing].read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    kind = data.draw(st.sampled_from(["bytes", "header", "metadata", "length"]))
    if kind == "bytes":
        blob = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(blob)
    elif kind == "header":
        path = data.draw(st.lists(st.integers(0, 10_000), min_size=1, max_size=4))
        _mutate_header(header, path, data.draw(JSON_VALUES))
        blob = struct.pack("<Q", len(encoded := json.dumps(header).encode())) + encoded + body
    elif kind == "metadata":
        meta = header["__metadata__"]
        key = data.draw(st.sampled_from(sorted(meta)))
        meta[key] = data.draw(st.text(max_size=40) | JSON_VALUES.map(json.dumps))
        blob = struct.pack("<Q", len(encoded := json.dumps(header).encode())) + encoded + body
    else:
        cut = data.draw(st.integers(0, len(raw) + 64))
        blob = raw[:cut] + bytes(max(cut - len(raw), 0))
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(blob)
    try:
        load_ternary_file(path)
    except TernaryFormatError:
        pass
