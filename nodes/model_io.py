"""Ternary FLUX state dicts <-> ComfyUI MODELs (ModelPatchers).

Loading goes through ComfyUI's own ``load_diffusion_model_state_dict`` with
``custom_operations`` = :class:`TernaryOps`, so detection, dtype choice, device placement,
offloading and Dynamic VRAM are ComfyUI's, and the result is an ordinary MODEL.
"""

from __future__ import annotations

import os
import re

import comfy.lora
import comfy.model_management
import comfy.sd
import torch
from comfy_api.latest import io

from ..models.files import load_ternary_model
from ..models.registry import detect_family
from ..models.reproduction import base_config
from .lora_branches import install
from .ternary_ops import TernaryOps, ternary_modules

ACT_BITS = {"16-bit": 16, "8-bit (fp8 per token)": 8}
_PATCHED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def activations_input() -> io.Combo.Input:
    """The ``activations`` input of every node that makes a ternary MODEL."""
    return io.Combo.Input(
        "activations",
        options=list(ACT_BITS),
        default="16-bit",
        tooltip="16-bit keeps the activations as they are. 8-bit rounds them per token to fp8 "
        "before the ternary matmul: faster on GPUs with fp8 tensor cores, slightly less exact.",
    )


def refuse_patches(patcher, advice: str) -> None:
    """Raise a readable error when a MODEL carries weight patches (LoRAs) a node would lose."""
    if patcher.patches:
        raise ValueError(
            f"this MODEL carries patches on {len(patcher.patches)} weights (LoRAs?): {advice}"
        )


def patcher_from_state_dict(
    tensors: dict[str, torch.Tensor],
    act_bits: int = 16,
    *,
    scale_rule: str | None,
    calibration: str | None = None,
):
    """A ComfyUI MODEL of a v1 state dict (2bit-packed ternary layers, BFL names).

    ``scale_rule`` is the rule that made its scales (the Quantize node's choice, a file's
    header) and ``calibration`` the header entry of a calibrated model; its ternary layers
    carry both, so Save Ternary Model writes them into the file.

    Always ComfyUI's legacy ModelPatcher, also where Dynamic VRAM is on: the dynamic patcher
    streams only ComfyUI's own cast weights and copies every other tensor to the GPU again on
    each load (each sampler node; about 0.45 s per prompt for FLUX.1-dev on an H200), while
    the legacy one keeps a model that fits resident between prompts, frees VRAM by unloading
    other models when needed, and can be cloned for TorchCompileModel without re-creating it
    from a file. Mixing both kinds of patcher is what ComfyUI does for its own legacy models.
    """
    patcher = comfy.sd.load_diffusion_model_state_dict(
        dict(tensors), model_options={"custom_operations": TernaryOps}, disable_dynamic=True
    )
    if patcher is None:
        raise ValueError("ComfyUI did not recognise these weights as a diffusion model")
    layers = ternary_modules(patcher)
    if not layers:
        raise ValueError("no ternary layers found in this model")
    for module in layers.values():
        module.act_bits = act_bits
        module.scale_rule = scale_rule
        module.calibration = calibration
    install(patcher)
    return patcher


def load_ternary_patcher(path: str | os.PathLike, act_bits: int = 16, disable_dynamic=True):
    """A ComfyUI MODEL of a v1 ternary file (raises TernaryFormatError on a bad file).

    ``disable_dynamic`` is accepted for ComfyUI's ``cached_patcher_init`` calls; the MODEL
    is always a legacy ModelPatcher (see :func:`patcher_from_state_dict`). base3 files are
    converted to the 2bit layout on the compute device (36 s of CPU for FLUX.1-dev, a
    fraction of a second on a GPU).
    """
    checkpoint = load_ternary_model(path, convert_device=comfy.model_management.get_torch_device())
    patcher = patcher_from_state_dict(
        checkpoint.state_dict,
        act_bits,
        scale_rule=checkpoint.metadata.get("scale_rule"),
        calibration=checkpoint.metadata.get("calibration"),
    )
    patcher.cached_patcher_init = (load_ternary_patcher, (str(path), act_bits))
    return patcher


_RMS_NORMS = re.compile(r"(query_norm|key_norm|distilled_guidance_layer\.norms\.\d+)\.weight$")


def bfl_key(key: str) -> str:
    """A diffusion-model key in BFL names: ComfyUI names the RMSNorm weights ``*.weight``
    that BFL files name ``*.scale`` (q / k norms of every family, Chroma's guidance net)."""
    if _RMS_NORMS.search(key):
        return key[: -len("weight")] + "scale"
    return key


def bfl_state_dict(patcher) -> dict[str, torch.Tensor]:
    """The diffusion model's state dict in BFL names, as the model holds it (no patches)."""
    return {bfl_key(k): v for k, v in patcher.model.diffusion_model.state_dict().items()}


def dense_state_dict(patcher) -> dict[str, torch.Tensor]:
    """The diffusion model's weights with the MODEL's patches (LoRAs) merged, in BFL names,
    each in its stored dtype (:func:`stored_dtype`).

    Computed weight by weight on the compute device, without loading the model: ComfyUI's
    ``force_patch_weights`` load is refused by Dynamic VRAM and would put the whole model on
    the GPU. Each patched weight starts from the original (ComfyUI's backup, when a clone
    has merged its own patches into the shared module) and goes through ComfyUI's own
    ``calculate_weight``. Quantized ComfyUI weights (comfy_quant) come back dequantized.
    """
    from comfy.quant_ops import QuantizedTensor

    device = comfy.model_management.get_torch_device()
    base = patcher.model.diffusion_model
    quantized = {
        n
        for n, m in base.named_modules()
        if isinstance(getattr(m, "weight", None), QuantizedTensor)
    }
    state = {}
    for name, tensor in [*base.named_parameters(), *base.named_buffers()]:
        module, _, suffix = name.rpartition(".")
        if module in quantized and suffix not in ("weight", "bias"):
            continue  # a quantization parameter (input_scale): part of the dequantized weight
        key = f"diffusion_model.{name}"
        if key in patcher.backup:
            tensor = patcher.backup[key].weight
        if isinstance(tensor, QuantizedTensor):
            tensor = tensor.dequantize()
        if key in patcher.patches:
            dtype = tensor.dtype if tensor.dtype in _PATCHED_DTYPES else torch.bfloat16
            merged = tensor.to(device, torch.float32, copy=True)
            merged = comfy.lora.calculate_weight(patcher.patches[key], merged, key)
            tensor = merged.to("cpu", dtype)
        state[bfl_key(name)] = stored_dtype(tensor.detach())
    return state


def stored_dtype(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 tensor whose values are all bf16 (or fp16) values, in that dtype, else the
    tensor itself. ComfyUI holds bf16 weights as float32 on the CPU; this gives them back
    in the dtype of their file, exactly (the quantization is bit for bit the same), at half
    the memory, and counted at their stored size."""
    if tensor.dtype != torch.float32:
        return tensor
    for dtype in (torch.bfloat16, torch.float16):
        narrow = tensor.to(dtype)
        if torch.equal(narrow.float(), tensor):
            return narrow
    return tensor


def check_flux(patcher) -> None:
    """Raise a readable error unless this MODEL is a dense model of a known family."""
    if ternary_modules(patcher):
        raise ValueError("this MODEL is already ternary")
    detect_family(logical_shapes(patcher))  # raises ModelFamilyError naming what was found


def logical_shapes(patcher) -> dict[str, tuple[int, ...]]:
    """{BFL key: logical shape} of a MODEL's diffusion model; ternary layers count as [N, K]."""
    shapes = {k: tuple(v.shape) for k, v in bfl_state_dict(patcher).items()}
    for name, layer in ternary_modules(patcher).items():
        shapes[f"{name}.weight"] = (layer.out_features, layer.in_features)
    return shapes


def check_bf16_flux(patcher) -> None:
    """Raise a readable error unless this MODEL holds the plain bf16 weights of a FLUX.1 model.

    ComfyUI may hold bf16 weights upcast to fp32 (on the CPU): those are accepted when
    every value is still a bf16 value, so the ternary values recomputed from them are the
    reproduction's own.
    """
    from comfy.quant_ops import QuantizedTensor

    if ternary_modules(patcher):
        raise ValueError("this MODEL is already ternary")
    base_config(logical_shapes(patcher), "this MODEL")  # the reproduction is of FLUX.1-dev
    refuse_patches(patcher, "connect the plain bf16 FLUX.1-dev, from before the LoRA loaders")
    for key, tensor in bfl_state_dict(patcher).items():
        if isinstance(tensor, QuantizedTensor):
            found = "a quantized weight"
        elif tensor.dtype not in (torch.bfloat16, torch.float32):
            found = str(tensor.dtype)
        elif tensor.dtype == torch.float32 and not torch.equal(tensor, tensor.bfloat16().float()):
            found = "float32 with values that are not bf16 values"
        else:
            continue
        raise ValueError(
            f"this MODEL is not the bf16 FLUX.1-dev: {key} is {found}. Load the bf16 file "
            "with Load Diffusion Model (weight_dtype default): the reproduction's ternary "
            "weights are recomputed from exactly those weights"
        )
