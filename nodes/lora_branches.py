"""ComfyUI's weight patches (LoraLoader & co.) on ternary layers, run as low-rank branches.

ComfyUI's own LoRA loaders put patches in ``ModelPatcher.patches`` under
``diffusion_model.<module>.weight`` (diffusers-named FLUX LoRAs land on row slices of the
fused ``qkv`` / ``linear1`` with an ``offset``). Merging them into a ternary weight would
destroy it, so a ModelPatcher injection (:func:`install`) hands each ternary layer its
patches when ComfyUI patches the model, and takes them back when it unpatches:

* a LoRA becomes rows of one extra branch ``up @ down`` beside the ternary matmul, with
  ``strength * alpha / rank`` folded into ``up`` and slices as zero rows elsewhere;
* other additive adapters (LoHa, LoKr, LoRA with a mid weight) and full weight diffs are
  exact only as their dense difference: the layer's are summed into one dense [N, K]
  patch in the compute dtype, run as one extra matmul (correct, as large as a dense layer);
* adapters whose effect depends on the original weight (DoRA, OFT, BOFT, GLoRA), "set"
  patches, model merges and patch functions are refused with a message naming the layer.

Bias patches are applied to the layer's bias with ComfyUI's own ``calculate_weight``.
"""

from __future__ import annotations

import comfy.lora
import comfy.weight_adapter as adapters
import torch
from comfy.patcher_extension import PatcherInjection

from .ternary_ops import ComfyTernaryLinear, ternary_modules

INJECTION_KEY = "ternary_flux_lora_branches"
_DORA_INDEX = {adapters.LoRAAdapter: 4, adapters.LoHaAdapter: 7, adapters.LoKrAdapter: 8}


class UnsupportedPatchError(ValueError):
    """A patch that cannot run on a ternary layer; the message says which and why."""


def _rows(offset, key: str, n: int) -> tuple[int, int]:
    if offset is None:
        return 0, n
    dim, start, size = offset
    if dim != 0:
        raise UnsupportedPatchError(
            f"{key}: a patch on a column slice cannot run on a ternary layer"
        )
    return start, size


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _kind(value) -> str:
    if isinstance(value, adapters.WeightAdapterBase):
        return value.name
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return value[0]
    return "diff" if isinstance(value, tuple) and len(value) == 1 else "merge"


def _patch_term(patch: tuple, key: str, module: ComfyTernaryLinear, device: torch.device):
    """(start row, down, up) float32 of one patch, or None when its strength is 0.

    A plain LoRA gives its low-rank pair: down [r, K], up [rows, r] with the strength folded
    in. Any other additive patch gives its dense difference [rows, K] as ``down`` and None.
    """
    strength, value, strength_model, offset, function = patch
    kind = _kind(value)
    if strength_model != 1.0 or function is not None or kind == "merge":
        raise UnsupportedPatchError(
            f"{key}: a model merge or a patch with a function cannot run on a ternary layer"
        )
    dora = type(value) in _DORA_INDEX and value.weights[_DORA_INDEX[type(value)]] is not None
    if dora or (type(value) not in _DORA_INDEX and kind != "diff"):
        raise UnsupportedPatchError(
            f"{key}: {'DoRA' if dora else kind} patches depend on the original dense weight and "
            "cannot run on a ternary layer; use a plain LoRA, or apply it to the bf16 model "
            "before quantizing"
        )
    if strength == 0.0:
        return None
    n, k = module.out_features, module.in_features
    start, size = _rows(offset, key, n)
    up = None
    if type(value) is adapters.LoRAAdapter and value.weights[3] is None and not value.weights[5]:
        up, down, alpha = value.weights[:3]
        down = down.flatten(1).to(device, torch.float32)
        scale = strength * (alpha / down.shape[0] if alpha is not None else 1.0)
        up = up.flatten(1).to(device, torch.float32) * scale
    elif kind == "diff":
        diff = value[0] if len(value) == 1 else value[1][0]
        down = strength * diff.to(device, torch.float32)
    else:
        zero = torch.zeros(size, k, device=device)
        down = value.calculate_weight(zero, key, strength, 1.0, None, _same, torch.float32)
    rows = down.shape[0] if up is None else up.shape[0]
    pair = up is None or up.shape[1] == down.shape[0]
    if tuple(down.shape[1:]) != (k,) or rows != size or not pair:
        found = list(down.shape) if up is None else f"up {list(up.shape)}, down {list(down.shape)}"
        raise UnsupportedPatchError(
            f"{key}: a {kind} patch of {found} for rows {start}:{start + size} does not fit "
            f"this [{n}, {k}] layer: the LoRA is for another model (or damaged); remove it "
            "from the LoRA loader or use one made for this model"
        )
    return start, down, up


def attach_patches(
    module: ComfyTernaryLinear, name: str, patches: dict, dtype: torch.dtype
) -> None:
    """Give one layer the branches and patched bias of a ModelPatcher's patch dict.

    Plain LoRAs become one low-rank branch (their pairs side by side); all other additive
    patches are summed into one dense [N, K] difference in ``dtype`` (the model's compute
    dtype): as large as a dense layer, but never larger.
    """
    module.clear_patches()
    weight_key, bias_key = f"diffusion_model.{name}.weight", f"diffusion_model.{name}.bias"
    device = module.weight.device
    n, k = module.out_features, module.in_features
    downs, ups, dense = [], [], None
    for patch in patches.get(weight_key, ()):
        term = _patch_term(patch, weight_key, module, device)
        if term is None:
            continue
        start, down, up = term
        if up is None:
            dense = torch.zeros(n, k, device=device) if dense is None else dense
            dense[start : start + down.shape[0]] += down
        else:
            up_full = torch.zeros(n, up.shape[1], device=device)
            up_full[start : start + up.shape[0]] = up
            downs.append(down)
            ups.append(up_full)
    if downs:
        module.patch_down = torch.cat(downs)
        module.patch_up = torch.cat(ups, 1)
    if dense is not None:
        module.patch_dense = dense.to(dtype)
    if bias_key in patches and module.bias is not None:
        bias = module.bias.detach().float().clone()
        module.patch_bias = comfy.lora.calculate_weight(patches[bias_key], bias, bias_key).to(
            device, module.bias.dtype
        )


def install(patcher) -> None:
    """Register the injection on a ModelPatcher holding ternary layers (clones inherit it)."""

    def inject(p) -> None:
        dtype = p.model.get_dtype_inference()
        for name, module in ternary_modules(p).items():
            try:
                attach_patches(module, name, p.patches, dtype)
            except Exception:
                for other in ternary_modules(p).values():
                    other.clear_patches()
                raise

    def eject(p) -> None:
        for module in ternary_modules(p).values():
            module.clear_patches()

    patcher.set_injections(INJECTION_KEY, [PatcherInjection(inject=inject, eject=eject)])
