"""``teacher`` and ``distill`` subcommands (work alone or under ``torchrun --nproc-per-node N``).

``model`` in either config is a dense FLUX safetensors file (BFL names), or
``random:PRESET:SEED`` (a FLUX.1 preset of models/registry.py: ``random:tiny:3``,
``random:dev:0``; no SEED: 0) for a FLUX.1 model with seeded random weights (tests,
benchmarks). The command-line teacher encodes prompts with a seeded stand-in encoder (no
text encoders outside ComfyUI): real teacher data comes from the Build Teacher Dataset node.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..distill.calibration import config_calibration
from ..distill.config import (
    DTYPES,
    DistillConfig,
    DistillConfigError,
    load_config,
    read_settings_file,
)
from ..distill.distributed import DistEnv, init_distributed, shutdown
from ..distill.student import distillable, load_student, student_from_tensors
from ..distill.teacher import (
    TeacherDataset,
    TeacherSettings,
    build_teacher_dataset,
    hashed_prompt_encoder,
    model_velocity_fn,
)
from ..distill.train import check_run, compute_dtype, distill
from ..models.family import ModelFamilyError, random_weights
from ..models.files import dense_tensors, logical
from ..models.flux1 import FAMILY as FLUX1
from ..models.flux1_torch import flux_from_state_dict
from ..models.registry import random_spec
from ..ternary.fileformat import MmapReader

# The teacher command's own settings (the rest are TeacherSettings) and their types.
TEACHER_KEYS = {
    "model": str, "output": str, "prompts": (str, list), "prompt_count": int,
    "prompt_seed": int, "device": str, "dtype": str,
}  # fmt: skip


def random_state_dict(spec: str, device: torch.device | str) -> dict[str, torch.Tensor] | None:
    """The state dict of ``random:PRESET:SEED``, read as the registry's ``flux:PRESET:SEED``,
    or None for a file path."""
    if not spec.startswith("random:"):
        return None
    try:
        family, _, config, seed = random_spec(f"{FLUX1.name}:{spec.removeprefix('random:')}")
    except ModelFamilyError:
        raise DistillConfigError(
            f"model {spec!r}: expected random:PRESET:SEED with a FLUX.1 preset "
            f"({', '.join(FLUX1.presets)}), e.g. random:tiny:3"
        ) from None
    return random_weights(family.shapes(config), seed, device=device)


@contextmanager
def model_tensors(
    spec: str, device: torch.device | str
) -> Iterator[tuple[dict, Callable[[str], torch.Tensor]]]:
    """(shapes, get) of a dense model spec, for a ``with`` block: ``get`` reads a file
    lazily, and the file is closed when the block ends."""
    state = random_state_dict(spec, device)
    if state is not None:
        yield {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__
        return
    if not Path(spec).is_file():
        raise FileNotFoundError(f"model file not found: {spec}")
    with MmapReader(spec) as reader:
        shapes, get = dense_tensors(reader)
        yield logical(shapes), get


def check_teacher_values(values: dict, path: str) -> None:
    """Refuse a teacher config's own settings of the wrong type by name (a number for a path,
    a list of non-strings as prompts were tracebacks or silently stringified)."""
    names = {str: "a string", int: "a whole number", (str, list): "a file name or a list"}
    for key, kind in TEACHER_KEYS.items():
        value = values.get(key)
        if key in values and (not isinstance(value, kind) or isinstance(value, bool)):
            raise DistillConfigError(f"{path}: {key} must be {names[kind]}, got {value!r}")
    prompts = values.get("prompts")
    if isinstance(prompts, list):
        if not prompts:
            raise DistillConfigError(f"{path}: prompts is an empty list")
        bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
        if bad:
            raise DistillConfigError(f"{path}: prompts must be non-empty strings, got {bad[0]!r}")
    if values.get("prompt_count", 1) < 1:
        raise DistillConfigError(f"{path}: prompt_count must be at least 1")
    if values.get("dtype", "auto") not in DTYPES:
        raise DistillConfigError(f"{path}: dtype must be one of {', '.join(DTYPES)}")


def teacher_prompts(values: dict, base: Path) -> list[str]:
    from ..distill.prompts import generate_prompts, read_prompt_file

    if "prompts" in values:
        source = values["prompts"]
        if isinstance(source, list):
            return [p.strip() for p in source]
        return read_prompt_file(base / source)
    return generate_prompts(int(values.get("prompt_count", 64)), int(values.get("prompt_seed", 0)))


def cmd_teacher(args: argparse.Namespace) -> int:
    values = read_settings_file(args.config)
    check_teacher_values(values, args.config)
    base = Path(args.config).parent
    settings = TeacherSettings.from_dict({k: v for k, v in values.items() if k not in TEACHER_KEYS})
    for key in ("model", "output"):
        if key not in values:
            raise DistillConfigError(f"{args.config}: missing required setting {key!r}")
    env = init_distributed(values.get("device", "auto"))
    try:
        dtype = compute_dtype(values.get("dtype", "auto"), env.device)
        model_spec = values["model"]
        if not model_spec.startswith("random:"):
            model_spec = str(base / model_spec)
        with model_tensors(model_spec, env.device) as (shapes, get):
            distillable(shapes)  # FLUX.1 only: other families are refused by name
            teacher = flux_from_state_dict({k: get(k) for k in shapes}, dtype, env.device).eval()
        context_dim = shapes["txt_in.weight"][1]
        encode = hashed_prompt_encoder(context_dim=context_dim)
        build_teacher_dataset(
            base / values["output"],
            teacher_prompts(values, base),
            encode,
            model_velocity_fn(teacher),
            settings,
            device=env.device,
            rank=env.rank,
            world_size=env.world_size,
            barrier=env.barrier,
            log=print if env.is_main else lambda _: None,
        )
    finally:
        shutdown(env)
    return 0


def build_student(
    config: DistillConfig, env: DistEnv, dataset: TeacherDataset | None = None
) -> torch.nn.Module:
    """The student of a config (the dense weights it came from are freed on return);
    ``init = "calibrated"`` calibrates it on the config's teacher data set."""
    dtype = compute_dtype(config.dtype, env.device)
    calibration = config_calibration(config, dataset)
    if calibration is not None and env.is_main:
        print(f"calibrating the student on {len(calibration.examples)} examples of {config.data}")
    if not config.model.startswith("random:"):
        return load_student(
            config.model, config.lora_rank, config.scale_rule, dtype, env.device,
            config.gradient_checkpointing, calibration,
        )  # fmt: skip
    with model_tensors(config.model, env.device) as (shapes, get):
        return student_from_tensors(
            shapes, get, config.lora_rank, config.scale_rule, dtype, env.device,
            config.gradient_checkpointing, calibration,
        )  # fmt: skip


def run_distill(config: DistillConfig, env: DistEnv) -> None:
    dataset = TeacherDataset(config.data)
    check_run(config, dataset, env.world_size, check_lock=env.is_main)  # before the student
    student = build_student(config, env, dataset)
    distill(student, dataset, config, env, log=print if env.is_main else (lambda _: None))


def cmd_distill(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    env = init_distributed(config.device)
    try:
        run_distill(config, env)
    finally:
        shutdown(env)
    return 0


def add_distill_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``teacher`` and ``distill`` on the main parser's subcommands."""
    t = sub.add_parser(
        "teacher",
        help="build a teacher data set with the pure-torch model (stand-in text encoder)",
    )
    t.add_argument("config", help="JSON or TOML: model, output, prompts and teacher settings")
    t.set_defaults(func=cmd_teacher)
    d = sub.add_parser("distill", help="distill a ternary + LoRA student from a teacher data set")
    d.add_argument("config", help="JSON or TOML distillation config (see distill/config.py)")
    d.set_defaults(func=cmd_distill)
