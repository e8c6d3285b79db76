"""The distillation student: ternary FLUX with LoRA, what it trains, and what it saves.

Trainable: every TernaryLinear's ``weight_scale`` and LoRA factors, kept in float32 (they are
the optimizer's master copies; the forward casts them to the compute dtype). Frozen: the
ternary weights, biases and every other tensor of the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..models import flux1
from ..models.family import ModelFamilyError
from ..models.files import dense_tensors, load_ternary_model, logical
from ..models.flux1 import FluxConfig, is_block_linear
from ..models.flux1_calibrate import Calibration, FluxCalibrator
from ..models.flux1_torch import FluxTransformer, ternary_flux_from_state_dict
from ..models.registry import detect_family, family_named
from ..ternary.calibrate import CALIBRATED
from ..ternary.fileformat import FORMAT_NAME, MmapReader
from ..ternary.module import TernaryLinear


def distillable(shapes: Mapping[str, tuple[int, ...]]) -> FluxConfig:
    """The FLUX.1 configuration of a model to distill (or to make teacher data with).

    Distillation runs the pure-torch FLUX.1 (models/flux1_torch.py), which exists for FLUX.1
    only: any other family the pack knows is refused by name.
    """
    family, config = detect_family(shapes)
    if family is not flux1.FAMILY:
        raise ModelFamilyError(refusal(family.title))
    return config


def refusal(title: str) -> str:
    return f"distillation supports FLUX.1 only; {title} is not supported yet"


def refuse_other_families(reader: MmapReader) -> None:
    """Refuse, by name, a model file of a family other than FLUX.1, from its header alone:
    a ternary file's ``architecture``, a dense file's shapes."""
    if reader.metadata.get("format") == FORMAT_NAME:
        architecture = reader.metadata.get("architecture")
        if architecture not in (None, flux1.FAMILY.name):
            raise ModelFamilyError(refusal(family_named(architecture).title))
        return
    shapes, _ = dense_tensors(reader)
    distillable(logical(shapes))


def student_from_tensors(
    shapes: Mapping[str, tuple[int, ...]],
    get: Callable[[str], torch.Tensor],
    lora_rank: int,
    scale_rule: str = "absmean",
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    gradient_checkpointing: bool = True,
    calibration: Calibration | None = None,
) -> FluxTransformer:
    """Quantize a dense FLUX model layer by layer (only one dense block linear on the device).

    ``shapes`` / ``get`` give the BFL-named tensors (``get`` may read lazily from a file).
    LoRA factors start from a rank-r SVD of each layer's quantization residual; with
    ``calibration`` (``init = "calibrated"``) codes, scales and LoRA are those of the
    calibrated quantizer on its examples, made block by block as the student is built.
    """
    config = distillable(shapes)
    calibrator = None
    if calibration is not None:
        calibrator = FluxCalibrator(
            shapes, get, calibration, lora_rank=lora_rank, scale_rule=scale_rule,
            packing="2bit", lora_dtype=dtype, device=device,
        )  # fmt: skip

    def make(name: str, k: int, n: int, bias: bool) -> nn.Module:
        if not is_block_linear(name):
            return nn.Linear(k, n, bias=bias, dtype=dtype, device=device)
        b = get(f"{name}.bias").to(device) if bias else None
        if calibrator is None:
            weight = get(f"{name}.weight").to(device)
            return TernaryLinear.from_dense(weight, b, lora_rank, scale_rule, dtype=dtype)
        parts, _ = calibrator.layer(name)
        parts = {key: value.to(device) for key, value in parts.items()}
        return TernaryLinear.from_parts(parts, n, k, b, dtype, CALIBRATED)

    model = FluxTransformer(config, make, dtype, device, gradient_checkpointing)
    rest = {
        key: get(key).to(device=device, dtype=dtype)
        for key in shapes
        if not is_block_linear(key.rsplit(".", 1)[0])
    }
    missing, unexpected = model.load_state_dict(rest, strict=False)
    ternary_keys = {k for k in model.state_dict() if is_block_linear(k.rsplit(".", 1)[0])}
    if unexpected or set(missing) - ternary_keys:
        absent = sorted(set(missing) - ternary_keys)
        raise ValueError(f"weights do not fit FLUX: missing {absent[:3]}, extra {unexpected[:3]}")
    return model


def load_student(
    path: str | os.PathLike,
    lora_rank: int,
    scale_rule: str = "absmean",
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    gradient_checkpointing: bool = True,
    calibration: Calibration | None = None,
) -> FluxTransformer:
    """Student from a dense FLUX safetensors file (quantized here, calibrated with
    ``calibration``) or a ternary-flux v1 file (used as it is; its LoRA rank must equal
    ``lora_rank``)."""
    with MmapReader(path) as reader:
        refuse_other_families(reader)  # from the header, before reading the weights
        if reader.metadata.get("format") != FORMAT_NAME:
            shapes, get = dense_tensors(reader)
            return student_from_tensors(
                logical(shapes), get, lora_rank, scale_rule, dtype, device,
                gradient_checkpointing, calibration,
            )  # fmt: skip
    if calibration is not None:
        raise ValueError(
            f'{path} is already ternary: init = "calibrated" quantizes a dense model; '
            'give the bf16 model, or use init = "svd" to train this file as it is'
        )
    ckpt = load_ternary_model(path, device)
    if ckpt.family is not flux1.FAMILY:
        raise ModelFamilyError(refusal(ckpt.family.title))
    if ckpt.lora_rank != lora_rank:
        raise ValueError(
            f"{path} has LoRA rank {ckpt.lora_rank}, the config asks for {lora_rank}; "
            "start from the bf16 model to get a new rank"
        )
    return ternary_flux_from_state_dict(
        ckpt.state_dict, ckpt.layers, dtype, device, gradient_checkpointing
    )


def ternary_layers(model: nn.Module) -> dict[str, TernaryLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TernaryLinear)}


def prepare_for_training(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """Freeze everything but scales and LoRA factors, which become float32.

    Returns {"lora": {name: param}, "scale": {name: param}} (names as in the state dict).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    groups: dict[str, dict[str, nn.Parameter]] = {"lora": {}, "scale": {}}
    layers = ternary_layers(model)
    if not layers:
        raise ValueError("the student has no ternary layers to train")
    for name, layer in layers.items():
        if layer.lora_rank == 0:
            raise ValueError(f"ternary layer {name} has no LoRA branch to train")
        for attr, group in (("lora_down", "lora"), ("lora_up", "lora"), ("weight_scale", "scale")):
            param = getattr(layer, attr)
            param.data = param.data.float()
            param.requires_grad_(True)
            groups[group][f"{name}.{attr}"] = param
    return groups
