"""The reference every ComfyUI test compares against: the dense model a ternary state dict
stands for, run by ComfyUI's own code."""

from __future__ import annotations

import torch

from comfyui_ternary_flux.ternary.packing import unpack_2bit


def dequantized(tensors, layers) -> dict[str, torch.Tensor]:
    """The dense float32 model of a ternary state dict: s T (+ LoRA) per ternary layer."""
    dense = {}
    for key, value in tensors.items():
        module, suffix = key.rsplit(".", 1)
        if module not in layers:
            dense[key] = value.float()
        elif suffix == "weight":
            n, k = layers[module]
            w = unpack_2bit(value, k, torch.float32) * tensors[f"{module}.weight_scale"][:, None]
            if f"{module}.lora_down" in tensors:
                alpha = float(tensors[f"{module}.lora_alpha"])
                down = tensors[f"{module}.lora_down"].float()
                w = w + alpha / down.shape[0] * tensors[f"{module}.lora_up"].float() @ down
            dense[key] = w
        elif suffix == "bias":
            dense[key] = value.float()
    return dense
