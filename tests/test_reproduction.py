"""Importer of the 1.58-bit FLUX reproduction's checkpoints, checked against synthetic ones.

The test builds its own checkpoint to the reproduction's spec: it slices a tiny BFL base
into diffusers-named linears (the inverse of the importer's mapping, written out here),
draws trained-looking scales and LoRAs for each, and compares every imported layer with
the reproduction's own formula, y = x (T s)^T + x B^T A^T + bias, in float64.
"""

import argparse

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from comfyui_ternary_flux.models import flux2
from comfyui_ternary_flux.models.family import random_weights
from comfyui_ternary_flux.models.files import load_ternary_model as load_ternary_file
from comfyui_ternary_flux.models.flux1 import (
    TINY_FLUX,
    TINY_SCHNELL,
    NotFluxError,
    random_flux_state_dict,
)
from comfyui_ternary_flux.models.flux1_torch import (
    flux_from_state_dict,
    ternary_flux_from_state_dict,
)
from comfyui_ternary_flux.models.reproduction import CheckpointError, import_reproduction
from comfyui_ternary_flux.ternary.module import TernaryLinear
from comfyui_ternary_flux.ternary.packing import unpack_2bit
from comfyui_ternary_flux.ternary.quantize import residual_factors, ternarize

CONFIG = TINY_FLUX
SWAPPED = "final_layer.adaLN_modulation.1"


def to_diffusers(bfl: dict[str, torch.Tensor], config=CONFIG):
    """Slice a BFL state dict into diffusers linears: ({name: (W, b)}, {BFL module: names}).

    The second dict lists, per BFL linear, the diffusers linears whose outputs concatenate
    to its output (the final layer's two halves are additionally swapped).
    """
    h = config.hidden_size
    linears, parts = {}, {}

    def take(name, module, rows=slice(None)):
        linears[name] = (bfl[f"{module}.weight"][rows], bfl[f"{module}.bias"][rows])
        parts.setdefault(module, []).append(name)

    take("x_embedder", "img_in")
    take("context_embedder", "txt_in")
    for bfl_name, diffusers_name in (
        ("time_in", "timestep_embedder"),
        ("guidance_in", "guidance_embedder"),
        ("vector_in", "text_embedder"),
    ):
        take(f"time_text_embed.{diffusers_name}.linear_1", f"{bfl_name}.in_layer")
        take(f"time_text_embed.{diffusers_name}.linear_2", f"{bfl_name}.out_layer")
    for i in range(config.depth):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        take(d + "norm1.linear", b + "img_mod.lin")
        take(d + "norm1_context.linear", b + "txt_mod.lin")
        for j, x in enumerate("qkv"):
            take(d + f"attn.to_{x}", b + "img_attn.qkv", slice(j * h, (j + 1) * h))
        for j, x in enumerate("qkv"):
            take(d + f"attn.add_{x}_proj", b + "txt_attn.qkv", slice(j * h, (j + 1) * h))
        take(d + "attn.to_out.0", b + "img_attn.proj")
        take(d + "attn.to_add_out", b + "txt_attn.proj")
        take(d + "ff.net.0.proj", b + "img_mlp.0")
        take(d + "ff.net.2", b + "img_mlp.2")
        take(d + "ff_context.net.0.proj", b + "txt_mlp.0")
        take(d + "ff_context.net.2", b + "txt_mlp.2")
    for i in range(config.depth_single_blocks):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for j, x in enumerate("qkv"):
            take(d + f"attn.to_{x}", b + "linear1", slice(j * h, (j + 1) * h))
        take(d + "proj_mlp", b + "linear1", slice(3 * h, None))
        take(d + "proj_out", b + "linear2")
        take(d + "norm.linear", b + "modulation.lin")
    take("proj_out", "final_layer.linear")
    w, bias = bfl[f"{SWAPPED}.weight"], bfl[f"{SWAPPED}.bias"]
    linears["norm_out.linear"] = (torch.cat([w[h:], w[:h]]), torch.cat([bias[h:], bias[:h]]))
    parts[SWAPPED] = ["norm_out.linear"]
    return linears, parts


def make_checkpoint(linears, rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A reproduction-style state dict: bf16 scale [out, 1], lora_A = UP, lora_B = DOWN.

    Like a trained one: scales moved away from absmean, and a LoRA that started as the SVD of
    the base's quantization residual W - s T and moved by as much again in random directions
    (median cosine with the residual on these weights: 0.10 at rank 4, 0.18 at rank 16, 0.33
    at rank 64; below 0.01 on another base)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, (w, _) in linears.items():
        n, k = w.shape
        absmean = w.float().abs().mean(dim=1, keepdim=True)
        scale = (absmean * (1 + 0.2 * torch.randn(n, 1, generator=gen))).bfloat16()
        state[f"{name}.scale"] = scale
        if rank:
            t, _ = ternarize(w)
            down, up = residual_factors(w.float() - t.float() * scale.float(), rank, seed)
            up = up + up.std() * torch.randn(n, rank, generator=gen)
            down = down + down.std() * torch.randn(rank, k, generator=gen)
            state[f"{name}.lora_A"] = up.bfloat16()
            state[f"{name}.lora_B"] = down.bfloat16()
    return state


def reproduction_output(x, w, bias, state, name):
    """The reproduction's layer in float64, with T from its rule on the diffusers weight."""
    t, _ = ternarize(w, "absmean")
    y = x @ (t.double() * state[f"{name}.scale"].double()).T + bias.double()
    if f"{name}.lora_A" in state:
        y = y + (x @ state[f"{name}.lora_B"].double().T) @ state[f"{name}.lora_A"].double().T
    return y


def reproduction_bound(x, w, state, name):
    """|x| |W_eff|^T with |W_eff| <= |T s| + |A| |B|: scale of the bf16 rounding error."""
    t, _ = ternarize(w, "absmean")
    size = (t.double() * state[f"{name}.scale"].double()).abs()
    if f"{name}.lora_A" in state:
        size = (
            size + state[f"{name}.lora_A"].double().abs() @ state[f"{name}.lora_B"].double().abs()
        )
    return x.abs() @ size.T


def check_against_reproduction(tensors, layers, bfl, state):
    """Every BFL linear of the imported model equals the reproduction's diffusers layers."""
    linears, parts = to_diffusers(bfl)
    h = CONFIG.hidden_size
    gen = torch.Generator().manual_seed(1)
    for module, names in parts.items():
        k = bfl[f"{module}.weight"].shape[1]
        x = torch.randn(3, k, generator=gen, dtype=torch.float64)
        ref = torch.cat([reproduction_output(x, *linears[n], state, n) for n in names], dim=1)
        bound = torch.cat([reproduction_bound(x, linears[n][0], state, n) for n in names], dim=1)
        if module == SWAPPED:
            ref, bound = (
                torch.cat([ref[:, h:], ref[:, :h]], 1),
                torch.cat([bound[:, h:], bound[:, :h]], 1),
            )
        if module in layers:
            n_out, k_in = layers[module]
            rank = (
                tensors[f"{module}.lora_down"].shape[0] if f"{module}.lora_down" in tensors else 0
            )
            assert rank == (len(names) * state[f"{names[0]}.lora_B"].shape[0] if rank else 0)
            layer = TernaryLinear(k_in, n_out, lora_rank=rank, dtype=torch.float64)
            layer.load_state_dict(
                {
                    key[len(module) + 1 :]: v
                    for key, v in tensors.items()
                    if key.rsplit(".", 1)[0] == module
                }
            )
            y = layer(x)
            torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10, msg=module)
        else:  # outside the blocks: dense float32 s T + A B, equal to float32 rounding
            assert tensors[f"{module}.weight"].dtype == torch.float32
            y = F.linear(
                x, tensors[f"{module}.weight"].double(), tensors[f"{module}.bias"].double()
            )
            assert torch.all((y - ref).abs() <= 2**-22 * bound + 1e-12), module


@pytest.fixture(scope="module")
def tiny():
    """A tiny bf16 FLUX base, its diffusers slices and a rank-16 reproduction checkpoint."""
    bfl = random_flux_state_dict(CONFIG, seed=3)
    linears, _ = to_diffusers(bfl)
    return bfl, linears, make_checkpoint(linears, rank=16, seed=4)


@pytest.fixture
def files(tmp_path, tiny):
    bfl, _, state = tiny
    save_file(bfl, tmp_path / "base.safetensors")
    torch.save(state, tmp_path / "ckpt.pt")
    return tmp_path / "base.safetensors", tmp_path / "ckpt.pt", tmp_path / "out.safetensors"


def test_mapping_covers_every_linear_once(tiny):
    bfl, linears, _ = tiny
    c = CONFIG
    # 504 for FLUX.1-dev: 8 embedders + 14 per double block + 6 per single block + 2 final.
    assert len(linears) == 8 + 14 * c.depth + 6 * c.depth_single_blocks + 2
    for module, names in to_diffusers(bfl)[1].items():
        rows = sum(linears[n][0].shape[0] for n in names)
        assert rows == bfl[f"{module}.weight"].shape[0], module


@pytest.mark.parametrize(
    ("rank", "prefix", "to_file"),
    [(64, "", True), (128, "model.diffusion_model.", True), (0, "", False)],
)
def test_import_matches_reproduction(tmp_path, tiny, rank, prefix, to_file):
    bfl, linears, _ = tiny
    state = make_checkpoint(linears, rank, seed=rank)
    save_file({prefix + k: v for k, v in bfl.items()}, tmp_path / "base.safetensors")
    torch.save(state, tmp_path / f"ternary_distilled_r{rank}_res1024_s10_fm.pt")
    out = tmp_path / "out.safetensors" if to_file else None
    seen = []
    result = import_reproduction(
        tmp_path / "base.safetensors",
        tmp_path / f"ternary_distilled_r{rank}_res1024_s10_fm.pt",
        out,
        packing="base3" if to_file else "2bit",
        progress=lambda done, total, key: seen.append((done, total)),
    )
    assert seen[-1] == (len(bfl), len(bfl))
    if to_file:
        assert result.tensors == {}
        loaded = load_ternary_file(out)
        tensors, layers = loaded.state_dict, loaded.layers
        assert loaded.lora_rank == rank and loaded.stored_packing == "base3"
        assert loaded.config == CONFIG
    else:
        tensors, layers = result.tensors, result.layers
        for module, (_, k) in layers.items():  # the packed codes are the base's T, per row
            codes = unpack_2bit(tensors[f"{module}.weight"], k)
            assert torch.equal(codes, ternarize(bfl[f"{module}.weight"])[0])
    assert set(layers) == {k[: -len(".weight")] for k in bfl if k.endswith(".weight")} - {
        "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer",
        "guidance_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
        "final_layer.linear", SWAPPED,
    }  # fmt: skip
    check_against_reproduction(tensors, layers, bfl, state)
    untouched = [k for k in bfl if not k.endswith((".weight", ".bias"))]
    assert untouched and all(torch.equal(tensors[k], bfl[k]) for k in untouched)
    assert all(torch.equal(tensors[f"{m}.bias"], bfl[f"{m}.bias"]) for m in layers)


def test_fused_lora_is_block_diagonal(files, tiny):
    _, _, state = tiny
    result = import_reproduction(*files[:2], packing="2bit")
    up = result.tensors["double_blocks.1.txt_attn.qkv.lora_up"]
    down = result.tensors["double_blocks.1.txt_attn.qkv.lora_down"]
    h, r = CONFIG.hidden_size, 16
    assert up.shape == (3 * h, 3 * r) and down.shape == (3 * r, h)
    assert float(result.tensors["double_blocks.1.txt_attn.qkv.lora_alpha"]) == 3 * r
    for j, x in enumerate("qkv"):
        name = f"transformer_blocks.1.attn.add_{x}_proj"
        assert torch.equal(up[j * h : (j + 1) * h, j * r : (j + 1) * r], state[f"{name}.lora_A"])
        assert torch.equal(down[j * r : (j + 1) * r], state[f"{name}.lora_B"])
    mask = torch.block_diag(*[torch.ones(h, r, dtype=torch.bool)] * 3)
    assert not up[~mask].any()


def test_imported_model_runs_like_the_reproduction(files, tiny):
    """Whole tiny FLUX: the imported model in this pack's model code vs a dense model of the
    reproduction's own formula, effective weights s T + A B in float64: equal to float32
    rounding (the layers outside the blocks are stored as float32)."""
    bfl, linears, state = tiny
    result = import_reproduction(*files[:2], packing="2bit")
    imported = ternary_flux_from_state_dict(result.tensors, result.layers, dtype=torch.float64)
    effective = dict(bfl)
    h = CONFIG.hidden_size
    for module, names in to_diffusers(bfl)[1].items():
        weights = []
        for name in names:
            t, _ = ternarize(linears[name][0])
            up, down = state[f"{name}.lora_A"].double(), state[f"{name}.lora_B"].double()
            weights.append(t.double() * state[f"{name}.scale"].double() + up @ down)
        w = torch.cat(weights)
        w = torch.cat([w[h:], w[:h]]) if module == SWAPPED else w
        effective[f"{module}.weight"] = w
    reference = flux_from_state_dict(effective, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    batch = dict(
        x=torch.randn(1, 16, 4, 6, generator=gen, dtype=torch.float64),
        timesteps=torch.rand(1, generator=gen, dtype=torch.float64),
        context=torch.randn(1, 5, CONFIG.context_in_dim, generator=gen, dtype=torch.float64),
        y=torch.randn(1, CONFIG.vec_in_dim, generator=gen, dtype=torch.float64),
        guidance=torch.full((1,), 3.5, dtype=torch.float64),
    )
    with torch.no_grad():
        want, got = reference(**batch), imported(**batch)
    assert float((got - want).norm() / want.norm()) < 1e-6  # bf16 outside layers: 2.5e-3


def expect_failure(files, error, match, **kwargs):
    """The import fails with this message and leaves nothing beside the inputs."""
    base, ckpt, out = files
    with pytest.raises(error, match=match):
        import_reproduction(base, ckpt, out, **kwargs)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted({base.name, ckpt.name})


def edit_checkpoint(files, tiny, edit):
    state = dict(tiny[2])
    edit(state)
    torch.save(state, files[1])


def test_missing_layer_is_named(files, tiny):
    edit_checkpoint(files, tiny, lambda s: s.pop("single_transformer_blocks.1.attn.to_k.lora_B"))
    expect_failure(files, CheckpointError, r"single_transformer_blocks\.1\.attn\.to_k .*lora_B")


def test_missing_outside_layer_is_named(files, tiny):
    def drop(state):
        for kind in ("scale", "lora_A", "lora_B"):
            del state[f"norm_out.linear.{kind}"]

    edit_checkpoint(files, tiny, drop)
    expect_failure(files, CheckpointError, r"norm_out\.linear \(part of final_layer")


def test_unknown_keys_are_named(files, tiny):
    def extra(state):
        state["transformer_blocks.0.attn.norm_q.weight"] = torch.ones(128, dtype=torch.bfloat16)

    edit_checkpoint(files, tiny, extra)
    expect_failure(files, CheckpointError, r"unknown keys transformer_blocks\.0\.attn\.norm_q")


def test_wrong_shapes_are_named(files, tiny):
    def flat_scale(state):
        state["transformer_blocks.0.attn.to_v.scale"] = state[
            "transformer_blocks.0.attn.to_v.scale"
        ][:, 0]

    edit_checkpoint(files, tiny, flat_scale)
    expect_failure(files, CheckpointError, r"to_v\.scale has shape \[256\], expected \[256, 1\]")

    def other_rank(state):
        state["proj_out.lora_A"] = state["proj_out.lora_A"][:, :8]

    edit_checkpoint(files, tiny, other_rank)
    expect_failure(
        files, CheckpointError, r"proj_out\.lora_A has shape \[64, 8\], expected \[64, 16\]"
    )


def test_non_finite_values_leave_no_partial_file(files, tiny):
    def poison(state):  # the last layer the importer reaches: found only while writing
        state["single_transformer_blocks.1.proj_out.scale"] = torch.full_like(
            state["single_transformer_blocks.1.proj_out.scale"], float("nan")
        )

    edit_checkpoint(files, tiny, poison)
    expect_failure(
        files, CheckpointError, r"single_transformer_blocks\.1\.proj_out\.scale holds NaN or inf"
    )


def test_base_that_is_not_flux(files):
    save_file({"encoder.weight": torch.zeros(4, 4, dtype=torch.bfloat16)}, files[0])
    expect_failure(files, NotFluxError, "not a FLUX.1 diffusion model")


def test_a_base_of_another_model_is_named(files):
    """FLUX.1 schnell lacks the guidance embedder the checkpoint has: that was blamed on the
    checkpoint ('unknown keys ... not a reproduction checkpoint'); FLUX.2 is named."""
    save_file(random_flux_state_dict(TINY_SCHNELL, seed=3), files[0])
    expect_failure(files, NotFluxError, "base.safetensors is FLUX.1 schnell-like .* FLUX.1-dev")
    save_file(random_weights(flux2.FAMILY.shapes(flux2.TINY_KLEIN)), files[0])
    expect_failure(files, NotFluxError, r"base.safetensors is FLUX.2 \(klein-like.* FLUX.1-dev")


def test_base_that_is_not_bf16(files, tiny):
    save_file({k: v.half() for k, v in tiny[0].items()}, files[0])
    expect_failure(files, ValueError, "use the bf16 base")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ([torch.zeros(2)], "not a state dict"),
        ({"x": argparse.Namespace(a=1)}, "holds a argparse.Namespace object"),
        ({"x.scale": torch.zeros(2, dtype=torch.int8)}, "expected float tensors"),
        (b"not a checkpoint", "not a PyTorch checkpoint"),
        ({3: torch.zeros(2)}, "key 3 is a int, not a layer name"),
        ({"x.scale": torch.zeros(2).to(torch.float8_e4m3fn)}, "found torch.float8_e4m3fn"),
        ({"x.scale": torch.zeros(2, 2).to_sparse()}, "x.scale is a torch.sparse_coo tensor"),
    ],
)
def test_checkpoint_that_is_not_a_state_dict(files, content, match):
    if isinstance(content, bytes):
        files[1].write_bytes(content)
    else:
        torch.save(content, files[1])
    expect_failure(files, CheckpointError, match)


def test_existing_output_needs_overwrite(files):
    base, ckpt, out = files
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="exists"):
        import_reproduction(base, ckpt, out)
    assert out.read_bytes() == b"keep me"
    import_reproduction(base, ckpt, out, overwrite=True)
    assert load_ternary_file(out).lora_rank == 16


def test_a_base_with_other_weights_is_refused(files, tiny):
    """Same architecture, other weights: the LoRAs do not fit its quantization residual."""
    base, ckpt, out = files
    import_reproduction(base, ckpt, out)
    cosine = float(load_ternary_file(out).metadata["base_cosine"])
    assert 0.1 < cosine < 1  # rank 16 on the right base
    out.unlink()
    save_file(random_flux_state_dict(CONFIG, seed=99), base)
    expect_failure(
        files, CheckpointError,
        r"ckpt.pt was not trained on base.safetensors: .* \(median cosine -?0\.00\d over 24 layers",
    )  # fmt: skip
    # Scales alone (rank 0) give nothing to compare: imported, and the file says so.
    torch.save(make_checkpoint(to_diffusers(tiny[0])[0], rank=0), ckpt)
    import_reproduction(base, ckpt, out)
    assert "base_cosine" not in load_ternary_file(out).metadata


def test_a_damaged_checkpoint_is_refused_by_its_checksums(files):
    """torch.load accepts a zip member with a flipped byte; the CRC-32 check does not."""
    import zipfile

    base, ckpt, out = files
    with zipfile.ZipFile(ckpt) as archive:
        member = next(i for i in archive.infolist() if "/data/" in i.filename)
    data = bytearray(ckpt.read_bytes())
    start = member.header_offset + 30 + len(member.filename) + len(member.extra)
    data[start + member.file_size // 2] ^= 0x01
    ckpt.write_bytes(bytes(data))
    assert torch.load(ckpt, weights_only=True)  # torch itself does not notice
    expect_failure(
        files, CheckpointError, rf"ckpt.pt: damaged: member {member.filename} does not match"
    )
    ckpt.write_bytes(bytes(data[: len(data) - 30]))  # the end of the archive cut off
    expect_failure(files, CheckpointError, "ckpt.pt")


def test_a_float64_checkpoint_is_written_as_a_file_its_reader_accepts(files, tiny):
    base, ckpt, out = files
    torch.save({k: v.double() for k, v in tiny[2].items()}, ckpt)
    import_reproduction(base, ckpt, out)
    loaded = load_ternary_file(out)
    assert loaded.state_dict["single_blocks.0.linear2.lora_down"].dtype == torch.float32
    assert torch.equal(
        loaded.state_dict["single_blocks.0.linear2.lora_down"],
        tiny[2]["single_transformer_blocks.0.proj_out.lora_B"].float(),
    )
