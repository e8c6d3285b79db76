"""Shared set-up for the teacher / trainer / distributed tests: a tiny FLUX teacher, its data
set, and a config for a short distillation run."""

from pathlib import Path

import torch
from safetensors.torch import save_file

from comfyui_ternary_flux.distill.config import DistillConfig
from comfyui_ternary_flux.distill.teacher import (
    TeacherSettings,
    build_teacher_dataset,
    hashed_prompt_encoder,
    model_velocity_fn,
)
from comfyui_ternary_flux.models.flux1 import TINY_FLUX, random_flux_state_dict
from comfyui_ternary_flux.models.flux1_torch import flux_from_state_dict

PROMPTS = [f"a red cube number {i}" for i in range(6)]
SETTINGS = TeacherSettings(
    width=64, height=64, steps=3, guidance=3.5, points_per_prompt=2, seed=5, shard_size=2,
    storage_dtype="float32",
)  # fmt: skip
TEACHER_SEED = 11


def teacher_state() -> dict[str, torch.Tensor]:
    return random_flux_state_dict(TINY_FLUX, seed=TEACHER_SEED, dtype=torch.bfloat16)


def tiny_encoder():
    return hashed_prompt_encoder(context_len=8)


def build_data(directory: Path, settings=SETTINGS, prompts=PROMPTS, **kwargs) -> dict:
    teacher = flux_from_state_dict(teacher_state(), dtype=torch.float32).eval()
    kwargs.setdefault("log", lambda _: None)
    return build_teacher_dataset(
        directory, prompts, tiny_encoder(), model_velocity_fn(teacher), settings, **kwargs
    )


def write_teacher_file(path: Path) -> Path:
    save_file(teacher_state(), str(path))
    return path


def tiny_config(tmp: Path, **overrides) -> DistillConfig:
    """A 6-step run on the data set in tmp/data with the teacher file tmp/teacher.safetensors."""
    values = dict(
        model=str(tmp / "teacher.safetensors"), data=str(tmp / "data"),
        output=str(tmp / "out.safetensors"), lora_rank=4, steps=6, batch_size=4,
        micro_batch=1, lr_lora=1e-3, lr_scale=1e-3, checkpoint_every=2,
        gradient_checkpointing=True, dtype="float32", device="cpu", seed=3,
    )  # fmt: skip
    values.update(overrides)
    return DistillConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in values.items()})
