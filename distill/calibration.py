"""Calibration examples from a teacher data set: the z_t, t and conditioning distillation
trains on, handed to the calibrated quantizer (models/flux1_calibrate.py). No velocities are
needed: calibration only runs the bf16 model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..models.flux1_calibrate import Calibration, Progress
from ..ternary.calibrate import CalibrationOptions
from .config import DistillConfig
from .teacher import TeacherDataError, TeacherDataset

DEFAULT_SAMPLES = 256


def calibration_indices(prompts: int, points: int, samples: int) -> list[int]:
    """Examples spread over prompts first, then over their training times: sample j is
    prompt ``j mod P`` at point ``(j mod P + j div P) mod points`` (example index
    ``prompt * points + point``), so a few samples already see many prompts and times."""
    order = [p * points + (p + r) % points for r in range(points) for p in range(prompts)]
    return order[:samples]


class TeacherExamples(Sequence):
    """Selected examples of a teacher data set, read on demand, without the velocities."""

    def __init__(self, dataset: TeacherDataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        example = self.dataset.example(self.indices[i])
        example.pop("v")
        return example


def teacher_calibration(
    directory: str | os.PathLike,
    samples: int | None = DEFAULT_SAMPLES,
    inputs: str = "quantized",
    progress: Progress | None = None,
    options: CalibrationOptions | None = None,
    dataset: TeacherDataset | None = None,
) -> Calibration:
    """A :class:`Calibration` on ``samples`` examples of the complete teacher data set in
    ``directory`` (refused by name when missing, incomplete or too small); ``samples=None``:
    :data:`DEFAULT_SAMPLES`, or every example of a smaller data set."""
    if not Path(directory).is_dir():
        raise TeacherDataError(f"teacher data set not found: {directory} is not a folder")
    dataset = dataset or TeacherDataset(directory)
    if samples is None:
        samples = min(DEFAULT_SAMPLES, len(dataset))
    if samples < 1:
        raise TeacherDataError(f"calibration samples must be at least 1, got {samples}")
    if samples > len(dataset):
        raise TeacherDataError(
            f"{samples} calibration samples asked for, but {directory} holds {len(dataset)} "
            f"examples ({len(dataset.sample_ids)} prompts x {dataset.points} points); ask for "
            "fewer or build more teacher data"
        )
    indices = calibration_indices(len(dataset.sample_ids), dataset.points, samples)
    return Calibration(
        TeacherExamples(dataset, indices),
        inputs=inputs,
        options=options or CalibrationOptions(),
        source={"data": Path(directory).name, "data_fingerprint": dataset.fingerprint},
        progress=progress,
    )


def config_calibration(
    config: DistillConfig,
    dataset: TeacherDataset | None = None,
    progress: Progress | None = None,
) -> Calibration | None:
    """The calibration a distillation config asks for (``init = "calibrated"``: on
    ``calibration_samples`` examples of its own teacher data set), or None."""
    if config.init != "calibrated":
        return None
    return teacher_calibration(
        config.data, config.calibration_samples, progress=progress, dataset=dataset
    )
