"""How a ternary layer lives inside ComfyUI's FLUX model.

ComfyUI builds every FLUX linear through ``operations.Linear`` before it has seen any
weight, so a layer can only learn that it is ternary when its state dict arrives.
:class:`TernaryOps` (passed as ``model_options["custom_operations"]``, the route ComfyUI
offers quantized loaders) builds ordinary manual-cast linears; the one whose state dict
carries ``weight_scale`` turns itself into a :class:`ComfyTernaryLinear` right there.
Linears outside the blocks stay ComfyUI's own, with all of ComfyUI's casting and LoRA
merging.

Why a leaf module of its own and not a ``QuantizedTensor`` layout: ComfyUI applies a LoRA
to a ``QuantizedTensor`` weight by dequantizing, adding the LoRA and re-quantizing, which
for ternary weights would destroy both the weights and the LoRA. A ComfyTernaryLinear has
no ``comfy_cast_weights``, so the ModelPatcher (legacy and Dynamic VRAM alike) moves its
tensors as they are, counts their real bytes, never merges a patch into them, and leaves
its LoRA patches to :mod:`.lora_branches`, which runs them as low-rank branches.
"""

from __future__ import annotations

import comfy.ops
import torch

from ..kernels.op import ternary_linear
from ..kernels.weight import LoraBranch, TernaryWeight
from ..ternary.module import TernaryLinear


class ComfyTernaryLinear(TernaryLinear):
    """TernaryLinear with ComfyUI's needs: offload-safe forward and patch branches.

    ``bias`` is a buffer here, so the ModelPatcher never merges a bias patch on its own;
    :mod:`.lora_branches` applies weight and bias patches together (``patch_down``,
    ``patch_up``: the extra low-rank branch, strengths folded into ``patch_up``;
    ``patch_dense``: the summed dense difference of other adapters, [N, K];
    ``patch_bias``: the patched bias).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        bias = self.bias
        del self.bias
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.clear_patches()

    def clear_patches(self) -> None:
        self.patch_down: torch.Tensor | None = None
        self.patch_up: torch.Tensor | None = None
        self.patch_dense: torch.Tensor | None = None
        self.patch_bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        comfy.ops.run_every_op()
        device = x.device

        def here(t: torch.Tensor | None) -> torch.Tensor | None:
            # ComfyUI leaves a layer on the offload device under --lowvram / --novram:
            # then its few packed bytes travel per call.
            return t if t is None or t.device == device else t.to(device, non_blocking=True)

        down, up, scale = self.lora_down, self.lora_up, self.lora_scale
        if self.patch_down is not None:
            if down is None:
                down, up, scale = self.patch_down, self.patch_up, 1.0
            else:
                dtype = x.dtype
                down = torch.cat([here(down).to(dtype), here(self.patch_down).to(dtype)])
                up = torch.cat([here(up).to(dtype) * scale, here(self.patch_up).to(dtype)], 1)
                scale = 1.0
        bias = self.bias if self.patch_bias is None else self.patch_bias
        weight = TernaryWeight(here(self.weight), here(self.weight_scale), self.in_features)
        lora = None if down is None else LoraBranch(here(down), here(up), scale)
        out = ternary_linear(x, weight, here(bias), lora, self.act_bits)
        if self.patch_dense is not None:
            out = out + torch.nn.functional.linear(x, here(self.patch_dense).to(x.dtype))
        return out


def _become_ternary(module: torch.nn.Module, state_dict: dict, prefix: str) -> None:
    """Turn a freshly built linear into an empty ComfyTernaryLinear of the same size."""
    down = state_dict.get(f"{prefix}lora_down")
    bias = state_dict.get(f"{prefix}bias")
    like = bias if bias is not None else down
    fresh = ComfyTernaryLinear(
        module.in_features,
        module.out_features,
        bias=bias is not None,
        lora_rank=0 if down is None else down.shape[0],
        dtype=torch.bfloat16 if like is None else like.dtype,
    )
    module.__class__ = ComfyTernaryLinear
    module.__dict__ = fresh.__dict__


class TernaryOps(comfy.ops.manual_cast):
    """ComfyUI operations for a ternary FLUX file (``custom_operations``)."""

    class Linear(comfy.ops.manual_cast.Linear):
        def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
            if f"{prefix}weight_scale" not in state_dict:
                return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
            _become_ternary(self, state_dict, prefix)
            return ComfyTernaryLinear._load_from_state_dict(
                self, state_dict, prefix, *args, **kwargs
            )


def ternary_modules(model) -> dict[str, ComfyTernaryLinear]:
    """{BFL module name: layer} of a ComfyUI model (BaseModel or ModelPatcher)."""
    base = getattr(model, "model", model)
    return {
        name: module
        for name, module in base.diffusion_model.named_modules()
        if isinstance(module, ComfyTernaryLinear)
    }
