"""The distillation job's settings, read from a JSON or TOML file and checked up front, so a
typo fails in the first second rather than after hours of training."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..ternary.quantize import SCALE_RULES

DTYPES = ("auto", "bfloat16", "float16", "float32")
# How the student starts: "svd" = the scale rule's ternary codes and a truncated SVD of the
# residual as LoRA; "calibrated" = codes, scales and LoRA chosen for each layer's output on
# examples of the training data set (ternary/calibrate.py, models/flux1_calibrate.py).
INITS = ("svd", "calibrated")
MAX_LR = 1.0  # AdamW moves each weight by about lr per step: above 1 nothing can converge
# Settings that change the result: a resumed run must use the same values.
RESULT_KEYS = (
    "model", "lora_rank", "scale_rule", "steps", "batch_size", "lr_lora", "lr_scale",
    "weight_decay", "warmup_steps", "min_lr_ratio", "seed", "dtype",
)  # fmt: skip


class DistillConfigError(ValueError):
    """A bad distillation config; the message names the setting."""


@dataclass(frozen=True)
class DistillConfig:
    model: str  # dense bf16 FLUX (BFL names) or a ternary-flux v1 file with LoRA
    data: str  # teacher data set folder (manifest.json + shards)
    output: str  # final ternary + LoRA file, format v1
    work_dir: str = ""  # checkpoints + log.jsonl + status.json; default: <output>.work
    lora_rank: int = 64
    scale_rule: str = "absmean"
    init: str = "svd"
    calibration_samples: int = 256  # examples of the data set that init = "calibrated" uses
    steps: int = 1000
    batch_size: int = 4  # examples per optimizer step, all processes together
    micro_batch: int = 1  # examples per forward pass (gradient accumulation for the rest)
    lr_lora: float = 1e-4
    lr_scale: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    checkpoint_every: int = 100
    gradient_checkpointing: bool = True
    dtype: str = "auto"  # compute dtype: auto = bfloat16 on GPUs, float32 on CPUs
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False  # replace an existing output file

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            expected = {"str": str, "int": int, "float": (int, float), "bool": bool}[f.type]
            if not isinstance(value, expected) or (f.type != "bool" and isinstance(value, bool)):
                raise DistillConfigError(f"{f.name} must be a {f.type}, got {value!r}")
        for name in ("model", "data", "output"):
            if not getattr(self, name):
                raise DistillConfigError(f"{name} must name a path")
        for name in (
            "lora_rank", "steps", "batch_size", "micro_batch", "checkpoint_every",
            "calibration_samples",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise DistillConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for f in fields(self):
            if f.type == "float" and not math.isfinite(getattr(self, f.name)):
                raise DistillConfigError(
                    f"{f.name} must be a finite number, got {getattr(self, f.name)}"
                )
        for name in ("lr_lora", "lr_scale", "weight_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                raise DistillConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("lr_lora", "lr_scale"):
            if getattr(self, name) > MAX_LR:
                raise DistillConfigError(
                    f"{name} {getattr(self, name)} is far too large (at most {MAX_LR}; "
                    "1e-4 to 1e-3 are usual): the run would diverge"
                )
        if not 0 <= self.min_lr_ratio <= 1:
            raise DistillConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.scale_rule not in SCALE_RULES:
            raise DistillConfigError(f"scale_rule must be one of {SCALE_RULES}")
        if self.init not in INITS:
            raise DistillConfigError(f"init must be one of {INITS}, got {self.init!r}")
        if self.dtype not in DTYPES:
            raise DistillConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.batch_size % self.micro_batch:
            raise DistillConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch "
                f"({self.micro_batch})"
            )

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir or f"{self.output}.work")

    def result_settings(self) -> dict:
        settings = {k: getattr(self, k) for k in RESULT_KEYS}
        if self.init != "svd":  # (the fingerprint of runs from before init existed is kept)
            settings.update(init=self.init, calibration_samples=self.calibration_samples)
        return settings

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, base: Path | None = None) -> DistillConfig:
        """Build from a dict; relative paths are taken relative to ``base``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DistillConfigError(
                f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        missing = [k for k in ("model", "data", "output") if k not in values]
        if missing:
            raise DistillConfigError(f"missing required setting(s): {', '.join(missing)}")
        values = dict(values)
        if base is not None:
            for key in ("model", "data", "output", "work_dir"):
                value = values.get(key)
                if isinstance(value, str) and value and not value.startswith("random:"):
                    values[key] = str(base / Path(values[key]).expanduser())
        return cls(**values)


def read_settings_file(path: str | os.PathLike) -> dict:
    """The table of settings in a .json or .toml file, with readable errors."""
    path = Path(path)
    if not path.is_file():
        raise DistillConfigError(f"config file not found: {path}")
    if path.suffix not in (".json", ".toml"):
        raise DistillConfigError(f"{path}: config must be a .json or .toml file")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:
                raise DistillConfigError("TOML configs need Python 3.11+; use JSON") from None
            values = tomllib.loads(text)
    except ValueError as err:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        if isinstance(err, DistillConfigError):
            raise
        raise DistillConfigError(f"{path}: cannot parse: {err}") from None
    if not isinstance(values, dict):
        raise DistillConfigError(f"{path}: expected a table / object of settings")
    return values


def load_config(path: str | os.PathLike) -> DistillConfig:
    """Read a .json or .toml distillation config; relative paths are relative to the file."""
    return DistillConfig.from_dict(read_settings_file(path), base=Path(path).parent)
