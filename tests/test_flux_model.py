"""The pure-torch FLUX model against ComfyUI's Flux on the same weights, and its pieces
against hand-written float64 references."""

import math

import pytest
import torch
from comfyui_harness import import_comfyui

from comfyui_ternary_flux.models.flux1 import TINY_FLUX, random_flux_state_dict
from comfyui_ternary_flux.models.flux1_torch import (
    FluxTransformer,
    apply_rope,
    flux_from_state_dict,
    position_ids,
    quantize_model,
    rope_angles,
    ternary_flux_from_state_dict,
    timestep_embedding,
)
from comfyui_ternary_flux.ternary.module import TernaryLinear


def inputs(batch=2, txt_len=5, height=8, width=6, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, 16, height, width, generator=gen, dtype=dtype),
        timesteps=torch.rand(batch, generator=gen, dtype=dtype),
        context=torch.randn(batch, txt_len, 4096, generator=gen, dtype=dtype),
        y=torch.randn(batch, 768, generator=gen, dtype=dtype),
        guidance=torch.full((batch,), 3.5, dtype=dtype),
    )


def comfyui_flux(state_dict):
    """ComfyUI's own Flux class built for TINY_FLUX and loaded with these weights."""
    import_comfyui()  # skips loudly without a ComfyUI checkout
    import comfy.ldm.flux.model
    import comfy.ops

    c = TINY_FLUX
    model = comfy.ldm.flux.model.Flux(
        in_channels=16, out_channels=16, vec_in_dim=c.vec_in_dim,
        context_in_dim=c.context_in_dim, hidden_size=c.hidden_size, mlp_ratio=c.mlp_ratio,
        num_heads=c.num_heads, depth=c.depth, depth_single_blocks=c.depth_single_blocks,
        axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
        guidance_embed=True, txt_ids_dims=[], dtype=torch.float32,
        operations=comfy.ops.disable_weight_init,
    )  # fmt: skip
    renamed = {
        (k[: -len(".scale")] + ".weight" if k.endswith("_norm.scale") else k): v
        for k, v in state_dict.items()
    }
    model.load_state_dict(renamed, strict=True)
    return model.eval()


def test_matches_comfyui_flux():
    state = random_flux_state_dict(TINY_FLUX, seed=3, dtype=torch.float32)
    ours = flux_from_state_dict(state)
    theirs = comfyui_flux(state)
    batch = inputs()
    with torch.no_grad():
        expected = theirs(batch["x"], batch["timesteps"], batch["context"], batch["y"],
                          guidance=batch["guidance"])  # fmt: skip
        got = ours(**batch)
    assert got.shape == (2, 16, 8, 6)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_float32_close_to_float64():
    state = random_flux_state_dict(TINY_FLUX, seed=4, dtype=torch.float64)
    batch64 = inputs(dtype=torch.float64)
    with torch.no_grad():
        ref = flux_from_state_dict(state)(**batch64)
        got = flux_from_state_dict(state, dtype=torch.float32)(
            **{k: v.float() for k, v in batch64.items()}
        )
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_rope_rotates_pairs_by_position_times_frequency():
    ids = position_ids(1, txt_len=2, height=6, width=4)
    assert ids.shape == (1, 2 + 3 * 2, 3)
    assert ids[0, 2 + 5].tolist() == [0.0, 2.0, 1.0]  # patch (row 2, column 1)
    rope = rope_angles(ids)
    x = torch.randn(1, 1, ids.shape[1], 128, dtype=torch.float64)
    got = apply_rope(x, rope)
    # Reference: complex multiplication by exp(i * pos * theta^(-2j/dim)) per axis.
    want = torch.empty_like(x)
    for p in range(ids.shape[1]):
        freqs = []
        for axis, dim in enumerate((16, 56, 56)):
            for j in range(dim // 2):
                freqs.append(float(ids[0, p, axis]) * 10000 ** (-2 * j / dim))
        for j, angle in enumerate(freqs):
            z = complex(x[0, 0, p, 2 * j], x[0, 0, p, 2 * j + 1]) * complex(
                math.cos(angle), math.sin(angle)
            )
            want[0, 0, p, 2 * j], want[0, 0, p, 2 * j + 1] = z.real, z.imag
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_timestep_embedding_is_cos_sin_of_1000t():
    t = torch.tensor([0.0, 0.25, 1.0])
    emb = timestep_embedding(t, 8)
    freqs = [10000 ** (-j / 4) for j in range(4)]
    want = [[math.cos(1000 * v * f) for f in freqs] + [math.sin(1000 * v * f) for f in freqs]
            for v in t.tolist()]  # fmt: skip
    torch.testing.assert_close(emb, torch.tensor(want), rtol=1e-4, atol=1e-4)


def test_modulation_applies_shift_scale_gate():
    """A single block with zero attention / MLP weights except the modulation bias is
    x + gate * bias2 (linear2's bias), independent of shift and scale."""
    model = FluxTransformer(TINY_FLUX, dtype=torch.float64)
    block = model.single_blocks[0]
    h = TINY_FLUX.hidden_size
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()
        block.modulation.lin.bias[2 * h :] = 0.5  # gate
        block.linear2.bias.fill_(2.0)
    x = torch.randn(1, 7, h, dtype=torch.float64)
    vec = torch.randn(1, h, dtype=torch.float64)
    rope = rope_angles(torch.zeros(1, 7, 3))
    torch.testing.assert_close(block(x, vec, rope), x + 1.0)


def test_quantized_model_equals_dense_model_of_dequantized_weights():
    state = random_flux_state_dict(TINY_FLUX, seed=5, dtype=torch.float32)
    ternary = quantize_model(flux_from_state_dict(state), lora_rank=4)
    swapped = [n for n, m in ternary.named_modules() if isinstance(m, TernaryLinear)]
    assert len(swapped) == 2 * 10 + 2 * 3
    dense_state = dict(state)
    for name in swapped:
        dense_state[f"{name}.weight"] = ternary.get_submodule(name).dequantized_weight()
    dense = flux_from_state_dict(dense_state)
    batch = inputs(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(ternary(**batch), dense(**batch), rtol=1e-4, atol=1e-4)


def test_ternary_model_round_trips_through_its_state_dict():
    state = random_flux_state_dict(TINY_FLUX, seed=6, dtype=torch.float32)
    ternary = quantize_model(flux_from_state_dict(state), lora_rank=3)
    layers = {
        n: (m.out_features, m.in_features)
        for n, m in ternary.named_modules()
        if isinstance(m, TernaryLinear)
    }
    rebuilt = ternary_flux_from_state_dict(ternary.state_dict(), layers, dtype=torch.float32)
    batch = inputs(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**batch), ternary(**batch), rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    state = random_flux_state_dict(TINY_FLUX, seed=7, dtype=torch.float32)
    batch = inputs(batch=1)
    grads = []
    for flag in (False, True):
        model = flux_from_state_dict(state, gradient_checkpointing=flag)
        model(**batch).square().mean().backward()
        grads.append(model.double_blocks[0].img_attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_odd_latent_size_is_refused():
    model = FluxTransformer(TINY_FLUX)
    batch = inputs(batch=1, height=7)
    with pytest.raises(ValueError, match="even"):
        model(**batch)


def test_rms_norm_uses_the_eps_of_bfl_and_comfyui():
    """eps = 1e-6 (BFL, ComfyUI, diffusers): visible on inputs whose mean square is near it."""
    from comfyui_ternary_flux.models.flux1_torch import RMSNorm

    x = torch.full((2, 8), 1e-3, dtype=torch.float64)
    norm = RMSNorm(8, dtype=torch.float64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=0)
