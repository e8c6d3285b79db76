"""Quality proxy for ternary FLUX: what plain ternary quantization loses, and how much of it
calibrated post-training quantization (no training) and distillation (LoRA + scales trained
against teacher velocities) win back. FLUX.1-dev cannot be had here, so the question is asked
of a tiny FLUX-architecture model trained on scikit-learn's 8x8 digits.

The digits are upsampled and folded into FLUX's 16-channel latent without a VAE (pixel
unshuffle by 4: a 32x32 image is a [16, 8, 8] latent, 16 image tokens); the digit is the
prompt, through a fixed random table that plays the frozen text encoder (context tokens and a
pooled vector). A full-precision teacher learns rectified flow as FLUX does. The pack's own
pipeline then does the rest: the teacher data set builder stores teacher samples and
velocities (no real digits); ``quantize_file(..., calibration=teacher_calibration(data))``
(what ``quantize --calibrate DATA`` runs) makes the calibrated file; the distillation CLI's
``build_student`` (``init = "svd"`` or ``"calibrated"``) and ``train.distill`` train LoRA
and scales. Every model samples the same held-out noise; a classifier trained on real digits
judges the samples: accuracy on the digit asked for, and a Frechet distance in its feature
space. ``--ablations`` adds what each part buys (inputs, rank, samples, scale search,
damping; start, steps, scale training, schedule).

    python bench/distill_proxy.py --size small --seed 0 --out bench/results [--ablations]
    python bench/distill_proxy.py --size small --summarize --out bench/results

``--size large`` is meant for a GPU (``--device cuda``, the default when one is present) and
takes longer than one call on a lent machine: ``--work DIR`` keeps every stage's output (the
classifier, the teacher and its checkpoint, the teacher data set, each student's trainer
checkpoints, each finished row) and a rerun of the same command reuses it; ``--time-limit S``
stops cleanly before the first unit of work (a stage, a teacher step, a data shard, a
distillation step) that would start after S seconds, with exit code 3. A run cut and resumed
gives the rows of one uninterrupted run (on the CPU bit for bit; the tests check it).

    python bench/distill_proxy.py --size large --work /tmp/pl --time-limit 450 --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from comfyui_ternary_flux.bench.proxy_metrics import (
    DigitClassifier,
    frechet_distance,
    sample_quality,
    train_classifier,
)
from comfyui_ternary_flux.cli.distill import build_student
from comfyui_ternary_flux.distill.calibration import teacher_calibration
from comfyui_ternary_flux.distill.config import DistillConfig
from comfyui_ternary_flux.distill.distributed import DistEnv
from comfyui_ternary_flux.distill.progress import read_progress
from comfyui_ternary_flux.distill.schedule import (
    derived_seed,
    resolution_shift,
    sampling_sigmas,
    shift_time,
)
from comfyui_ternary_flux.distill.student import load_student
from comfyui_ternary_flux.distill.teacher import (
    TeacherDataset,
    TeacherSettings,
    build_teacher_dataset,
    euler_sample,
    model_velocity_fn,
)
from comfyui_ternary_flux.distill.train import distill
from comfyui_ternary_flux.models.files import quantize_file
from comfyui_ternary_flux.models.flux1 import FluxConfig
from comfyui_ternary_flux.models.flux1_torch import PATCH, FluxTransformer
from comfyui_ternary_flux.ternary.atomic import atomic_path
from comfyui_ternary_flux.ternary.calibrate import CalibrationOptions
from comfyui_ternary_flux.ternary.lock import WorkDirBusy, WorkLock

FOLD = 4  # pixel unshuffle: 16 latent channels, as FLUX's VAE
TEXT_TOKENS = 2
CONTEXT_DIM = 64
POOLED_DIM = 32
HEAD_DIM = 128  # FLUX.1's RoPE split fixes the head size
ROWS = (
    "teacher",
    "plain ternary",
    "calibrated ternary + LoRA",
    "distilled ternary + LoRA",
    "distilled from calibrated",
)
METRICS = ("accuracy", "frechet_distance")
STOPPED = 3  # exit code of a run that --time-limit stopped: rerun the same command
TEACHER_CHECKPOINT_EVERY = 250  # teacher steps; a kill loses at most these
DISTILL_CHECKPOINT_EVERY = 250  # distillation steps (the trainer's checkpoint_every)
IDENTITY = "proxy.json"  # what a --work folder holds: size, seed, settings, device
SPENT = "spent.json"  # seconds of the calls that stopped before, so a total can be given


LATENT_CHANNELS = 16  # FLUX.1's latent space


@dataclass(frozen=True)
class ProxySize:
    latent_side: int  # latent [16, side, side]; images are 4 * side pixels
    heads: int
    depth: int
    depth_single_blocks: int
    mlp_ratio: float
    teacher_steps: int
    teacher_batch: int
    teacher_lr: float
    distill_prompts_per_digit: int  # teacher samples the student learns from
    points_per_prompt: int  # (t, eps) points with a stored teacher velocity, per sample
    distill_steps: int
    distill_batch: int
    lora_rank: int
    lora_lr: float
    scale_lr: float
    eval_samples_per_digit: int
    sampling_steps: int
    classifier_epochs: int
    calibration_samples: int  # teacher data examples the calibrated quantizer runs on


SIZES = {
    "tiny": ProxySize(  # the end-to-end test: wiring only, its numbers mean nothing
        latent_side=4,
        heads=1,
        depth=1,
        depth_single_blocks=1,
        mlp_ratio=1.0,
        teacher_steps=20,
        teacher_batch=32,
        teacher_lr=1e-3,
        distill_prompts_per_digit=2,
        points_per_prompt=2,
        distill_steps=5,
        distill_batch=8,
        lora_rank=2,
        lora_lr=1e-3,
        scale_lr=3e-3,
        eval_samples_per_digit=3,
        sampling_steps=3,
        classifier_epochs=1,
        calibration_samples=8,
    ),
    "small": ProxySize(
        latent_side=8,
        heads=1,
        depth=1,
        depth_single_blocks=1,
        mlp_ratio=2.0,
        teacher_steps=1500,
        teacher_batch=64,
        teacher_lr=1e-3,
        distill_prompts_per_digit=50,
        points_per_prompt=4,
        distill_steps=400,
        distill_batch=32,
        lora_rank=4,
        lora_lr=1e-3,
        scale_lr=3e-3,
        eval_samples_per_digit=50,
        sampling_steps=16,
        classifier_epochs=8,
        calibration_samples=256,
    ),
    "large": ProxySize(
        latent_side=16,
        heads=2,
        depth=2,
        depth_single_blocks=4,
        mlp_ratio=4.0,
        teacher_steps=8000,
        teacher_batch=256,
        teacher_lr=5e-4,
        distill_prompts_per_digit=200,
        points_per_prompt=8,
        distill_steps=4000,
        distill_batch=128,
        lora_rank=8,
        lora_lr=5e-4,
        scale_lr=1e-3,
        eval_samples_per_digit=200,
        sampling_steps=28,
        classifier_epochs=30,
        calibration_samples=256,
    ),
}


@dataclass
class Digits:
    """Real digits as [N, 1, S, S] images in [-1, 1]; a fixed stratified train/test split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_digits(image_size: int, seed: int, test_share: float = 0.2) -> Digits:
    """scikit-learn's 1797 digits, upsampled bilinearly; ``test_share`` of each digit held out."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    labels = torch.tensor(data.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for digit in range(10):
        members = (labels == digit).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=gen)]
        test[members[: round(test_share * len(members))]] = True
    return Digits(images[~test], labels[~test], images[test], labels[test])


def to_latent(images: torch.Tensor) -> torch.Tensor:
    return F.pixel_unshuffle(images, FOLD)


def to_images(latents: torch.Tensor) -> torch.Tensor:
    return F.pixel_shuffle(latents, FOLD)


def flux_config(size: ProxySize) -> FluxConfig:
    return FluxConfig(
        hidden_size=HEAD_DIM * size.heads,
        num_heads=size.heads,
        depth=size.depth,
        depth_single_blocks=size.depth_single_blocks,
        in_channels=LATENT_CHANNELS * PATCH**2,
        context_in_dim=CONTEXT_DIM,
        vec_in_dim=POOLED_DIM,
        mlp_ratio=size.mlp_ratio,
        guidance_embed=False,
    )


class DigitPrompts:
    """The frozen 'text encoder': a fixed random (context, pooled) pair per digit. Also the
    ``encode(prompt)`` of the teacher data set builder, for prompts ``digit 0`` ... ``digit 9``."""

    def __init__(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.context = torch.randn(10, TEXT_TOKENS, CONTEXT_DIM, generator=gen)
        self.pooled = torch.randn(10, POOLED_DIM, generator=gen)

    @staticmethod
    def text(digit: int) -> str:
        return f"digit {digit}"

    def __call__(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        digit = int(prompt.removeprefix("digit "))
        return self.context[digit].clone(), self.pooled[digit].clone()  # own storage per sample

    def condition(self, labels: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The model's conditioning for a batch of digits (no guidance embedding)."""
        return {"context": self.context[labels], "pooled": self.pooled[labels], "guidance": None}


def time_shift(size: ProxySize) -> float:
    """FLUX's mu for this many image tokens (a latent cell stands for 8 FLUX pixels)."""
    return resolution_shift(8 * size.latent_side, 8 * size.latent_side)


def teacher_settings(size: ProxySize, seed: int) -> TeacherSettings:
    return TeacherSettings(
        width=8 * size.latent_side,
        height=8 * size.latent_side,
        steps=size.sampling_steps,
        guidance=0.0,
        points_per_prompt=size.points_per_prompt,
        seed=derived_seed(seed, 6),
        shard_size=256,
        storage_dtype="float32",
    )


def training_times(count: int, mu: float, gen: torch.Generator) -> torch.Tensor:
    """t = shift(u), u uniform: the times of FLUX's sampling schedule and the teacher data."""
    return shift_time(1.0 - torch.rand(count, generator=gen, dtype=torch.float64), mu).float()


def flow_point(clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = (1 - t) z_0 + t eps (rectified flow; the velocity target is eps - z_0)."""
    t = t.view(-1, 1, 1, 1)
    return (1 - t) * clean + t * noise


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Stopped(Exception):
    """The time limit came before the next unit of work; what was done is saved."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage


class WorkFolderMismatch(ValueError):
    """A --work folder that holds another run's stages; the message says which settings."""


class Deadline:
    """--time-limit: whether a unit of work that would start now may start. ``stage`` names
    the unit (what a stop reports), so a test can stop the run at any one of them."""

    def __init__(self, limit: float | None) -> None:
        self.limit = limit
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def passed(self, stage: str) -> bool:
        return self.limit is not None and self.elapsed() >= self.limit

    def check(self, stage: str) -> None:
        if self.passed(stage):
            raise Stopped(stage)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file through the pack's atomic writer: a cut call never leaves half."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def train_teacher(
    size: ProxySize,
    latents: torch.Tensor,
    labels: torch.Tensor,
    prompts: DigitPrompts,
    seed: int,
    device: torch.device | str = "cpu",
    checkpoint: Path | None = None,
    deadline: Deadline | None = None,
) -> FluxTransformer:
    """Full-precision rectified-flow training on real digits, AdamW with a cosine schedule.
    Batches are drawn on the CPU (the same data on every device).

    With ``checkpoint``, everything the next step depends on (weights, AdamW, schedule, the
    batch generator) is saved there every TEACHER_CHECKPOINT_EVERY steps and before
    ``deadline`` stops the loop (raising Stopped), and training goes on from it: the steps
    of one uninterrupted run."""
    torch.manual_seed(derived_seed(seed, 1))
    model = FluxTransformer(flux_config(size)).to(device)
    gen = torch.Generator().manual_seed(derived_seed(seed, 2))
    mu = time_shift(size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.teacher_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, size.teacher_steps)
    saved = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        gen.set_state(state["generator"])
        saved = state["step"]
        log(f"teacher: resuming from {checkpoint} at step {saved}")

    def save(step: int) -> None:
        state = {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "generator": gen.get_state(),
        }
        with atomic_path(checkpoint) as tmp:
            torch.save(state, tmp)

    for step in range(saved, size.teacher_steps):
        stage = f"teacher step {step + 1}/{size.teacher_steps}"
        if deadline is not None and deadline.passed(stage):
            if checkpoint is not None and step > saved:
                save(step)
            raise Stopped(stage)
        index = torch.randint(len(latents), (size.teacher_batch,), generator=gen)
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=gen)
        t = training_times(size.teacher_batch, mu, gen)
        cond = prompts.condition(labels[index])
        z_t, t, target = (v.to(device) for v in (flow_point(clean, noise, t), t, noise - clean))
        v = model(z_t, t, cond["context"].to(device), cond["pooled"].to(device))
        loss = F.mse_loss(v, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == size.teacher_steps - 1:
            log(f"teacher step {step + 1}/{size.teacher_steps} loss {loss.item():.4f}")
        if checkpoint is not None and (step + 1) % TEACHER_CHECKPOINT_EVERY == 0:
            save(step + 1)
            saved = step + 1
    return model.eval()


def _on(cond: dict, device) -> dict:
    return {k: None if v is None else v.to(device) for k, v in cond.items()}


def sample(
    model: torch.nn.Module,
    noise: torch.Tensor,
    labels: torch.Tensor,
    prompts: DigitPrompts,
    size: ProxySize,
    batch_size: int = 250,
) -> torch.Tensor:
    """Latents (on the CPU) from the pack's Euler sampler on the teacher data set's schedule."""
    device = next(model.parameters()).device
    sigmas = sampling_sigmas(size.sampling_steps, time_shift(size))
    velocity = model_velocity_fn(model)
    return torch.cat(
        [
            euler_sample(
                velocity,
                noise[i : i + batch_size].to(device),
                _on(prompts.condition(labels[i : i + batch_size]), device),
                sigmas,
            ).cpu()
            for i in range(0, len(noise), batch_size)
        ]
    )


def seeded_noise(count: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))


def balanced_labels(per_digit: int) -> torch.Tensor:
    return torch.arange(10).repeat_interleave(per_digit)


@dataclass(frozen=True)
class Calibrated:
    """A calibrated PTQ variant: ``quantize_file`` with a teacher data set calibration."""

    name: str
    lora_rank: int | None = None  # None: the size's rank
    samples: int | None = None  # None: the size's calibration_samples; 0: every example
    inputs: str = "quantized"
    options: tuple[tuple[str, object], ...] = ()  # CalibrationOptions overrides


@dataclass(frozen=True)
class Distilled:
    """A distillation variant: the CLI's student (``init``) and trainer at the size's steps,
    batch and learning rates. The rest of the schedule is the start's own recipe in the pack
    (``distill.config.RECIPES``: what a config that leaves it open gets) unless set here."""

    name: str
    init: str = "svd"
    step_share: float = 1.0  # of the size's distill_steps
    scale_lr: float | None = None
    lr_lora_factor: float | None = None  # the LoRA learns at the size's lora_lr times this
    warmup_share: float | None = None  # of the steps
    min_lr_ratio: float | None = None


MAIN = {
    "calibrated ternary + LoRA": Calibrated("calibrated ternary + LoRA"),
    "distilled ternary + LoRA": Distilled("distilled ternary + LoRA", init="svd"),
    "distilled from calibrated": Distilled("distilled from calibrated", init="calibrated"),
}
ABLATIONS = (
    Calibrated("PTQ: dense-model inputs (not the quantized blocks')", inputs="dense"),
    Calibrated("PTQ: no LoRA (rank 0)", lora_rank=0),
    Calibrated("PTQ: 64 calibration samples", samples=64),
    Calibrated("PTQ: every example of the data set", samples=0),
    Calibrated("PTQ: absmean scale, no search", options=(("multipliers", (1.0,)),)),
    Calibrated("PTQ: damping 0.01", options=(("damp", 0.01), ("lora_damp", 0.01))),
    Distilled("distill: calibrated start, half the steps", init="calibrated", step_share=0.5),
    Distilled("distill: calibrated start, a quarter of the steps", "calibrated", 0.25),
    Distilled("distill: calibrated start, scales frozen", init="calibrated", scale_lr=0.0),
    # The calibrated start's recipe (LoRA lr x2, warm-up 10 %, floor 0.1), one part at a time
    Distilled(
        "distill: calibrated start, the SVD start's recipe (LoRA lr x1, no warm-up, no floor)",
        init="calibrated",
        lr_lora_factor=1.0,
        warmup_share=0.0,
        min_lr_ratio=0.0,
    ),
    Distilled(
        "distill: calibrated start, LoRA lr x1 (warm-up, floor kept)",
        init="calibrated",
        lr_lora_factor=1.0,
    ),
    Distilled(
        "distill: calibrated start, no warm-up, no floor (LoRA lr x2 kept)",
        init="calibrated",
        warmup_share=0.0,
        min_lr_ratio=0.0,
    ),
    Distilled("distill: svd start, scales frozen", init="svd", scale_lr=0.0),
    Distilled("distill: svd start, half the steps", init="svd", step_share=0.5),
)


def row_file_stem(name: str) -> str:
    """A row's file name in a --work folder: its name's letters and digits."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def identity(size_name: str, seed: int, device: torch.device) -> dict:
    """What decides a run's stages: a --work folder serves only a run of these."""
    size = SIZES[size_name]
    described = {
        "benchmark": "distill_proxy",
        "size": size_name,
        "seed": seed,
        "device": str(device),
        "settings": asdict(size),
        "flux_config": flux_config(size).as_dict(),
    }
    return json.loads(json.dumps(described))  # as it reads back from the file


def claim_work(work: Path, described: dict) -> None:
    """Mark an empty --work folder as this run's; refuse one that holds another run (or
    anything else), before any of its files is read or replaced."""
    path = work / IDENTITY
    if path.is_file():
        held = json.loads(path.read_text())
        if held != described:
            keys = described.keys() | held.keys()
            changed = sorted(k for k in keys if held.get(k) != described.get(k))
            raise WorkFolderMismatch(
                f"{work} holds the proxy run of size {held.get('size')}, seed "
                f"{held.get('seed')}, device {held.get('device')}, not this command's "
                f"(different: {', '.join(changed)}); use another --work folder, or the same "
                "--size, --seed and --device"
            )
        return
    if work.exists() and any(work.iterdir()):
        raise WorkFolderMismatch(
            f"{work} is not empty and holds no {IDENTITY}: not a proxy work folder; use an "
            "empty or new folder"
        )
    write_atomically(path, json.dumps(described, indent=2) + "\n")


class Spent:
    """Seconds of the calls that stopped before this one: the run's and each unfinished
    row's, so that a run cut into several calls still reports what it cost in all."""

    def __init__(self, path: Path) -> None:
        self.path = path
        saved = json.loads(path.read_text()) if path.is_file() else {}
        self.calls = saved.get("calls", 0)
        self.seconds = saved.get("seconds", 0.0)
        self.rows: dict[str, float] = saved.get("rows", {})

    def save_stop(self, seconds: float) -> None:
        """Add this call (which stopped after ``seconds``) and write the file."""
        self.calls += 1
        self.seconds += seconds
        record = {"calls": self.calls, "seconds": self.seconds, "rows": self.rows}
        write_atomically(self.path, json.dumps(record, indent=2) + "\n")


class Proxy:
    """One seed's set-up: real digits, the classifier, the teacher, its file and data set.

    Every stage's output lies in ``work`` and is reused when present (the classifier, the
    teacher or its checkpoint, the data set's shards, the teacher's samples, each row), so
    a run that ``deadline`` stopped, or a kill, continues where it was."""

    def __init__(
        self,
        size_name: str,
        seed: int,
        work: Path,
        device: torch.device,
        deadline: Deadline | None = None,
        spent: Spent | None = None,
    ) -> None:
        self.size_name, self.size, self.seed = size_name, SIZES[size_name], seed
        self.work, self.device = work, device
        self.deadline = deadline or Deadline(None)
        self.spent = spent or Spent(work / SPENT)
        size = self.size
        self.digits = load_digits(FOLD * size.latent_side, seed)
        self.prompts = DigitPrompts(derived_seed(seed, 3))
        digits = self.digits
        self.classifier = self._classifier()
        with torch.no_grad():
            self.reference = self.classifier.features(digits.test_images)
            self.real_accuracy = float(
                (self.classifier(digits.test_images).argmax(1) == digits.test_labels)
                .double()
                .mean()
            )
            self.real_distance = frechet_distance(
                self.classifier.features(digits.train_images), self.reference
            )
        log(f"classifier accuracy on held-out real digits: {self.real_accuracy:.4f}")
        self.teacher_file = work / "teacher.safetensors"
        self.teacher = self._teacher()
        self.data = work / "teacher_data"
        self._teacher_data()
        self.eval_labels = balanced_labels(size.eval_samples_per_digit)
        latent_shape = (LATENT_CHANNELS, size.latent_side, size.latent_side)
        self.eval_noise = seeded_noise(len(self.eval_labels), latent_shape, derived_seed(seed, 7))
        self.teacher_latents = self._teacher_samples()

    def _classifier(self) -> DigitClassifier:
        """Trained once and kept: at the large size its 30 epochs run on the CPU."""
        path = self.work / "classifier.safetensors"
        if path.is_file():
            classifier = DigitClassifier(self.digits.train_images.shape[-1])
            classifier.load_state_dict(load_file(path))
            return classifier.eval()
        self.deadline.check("classifier")
        digits = self.digits
        epochs, seed = self.size.classifier_epochs, derived_seed(self.seed, 4)
        classifier = train_classifier(digits.train_images, digits.train_labels, epochs, seed)
        save_tensors(path, classifier.state_dict())
        return classifier

    def _teacher(self) -> FluxTransformer:
        """The trained teacher from its file; else trained (or finished from its
        checkpoint), and its file written."""
        if self.teacher_file.is_file():
            teacher = FluxTransformer(flux_config(self.size))
            teacher.load_state_dict(load_file(self.teacher_file))
            return teacher.to(self.device).eval()
        checkpoint = self.work / "teacher.checkpoint.pt"
        digits = self.digits
        latents, labels = to_latent(digits.train_images), digits.train_labels
        teacher = train_teacher(
            self.size,
            latents,
            labels,
            self.prompts,
            self.seed,
            self.device,
            checkpoint,
            self.deadline,
        )
        save_tensors(self.teacher_file, teacher.state_dict())
        checkpoint.unlink(missing_ok=True)  # the file above supersedes it
        return teacher

    def _teacher_data(self) -> None:
        """The pack's builder, which skips the shards already built."""
        texts = [
            self.prompts.text(int(d)) for d in balanced_labels(self.size.distill_prompts_per_digit)
        ]
        manifest = build_teacher_dataset(
            self.data,
            texts,
            self.prompts,
            model_velocity_fn(self.teacher),
            teacher_settings(self.size, self.seed),
            device=self.device,
            log=log,
            should_stop=lambda: self.deadline.passed("teacher data"),
        )
        if not manifest["complete"]:
            raise Stopped(f"teacher data ({manifest['done_prompts']}/{len(texts)} prompts)")

    def _teacher_samples(self) -> torch.Tensor:
        """The teacher's samples of the held-out noise: its row and every velocity error."""
        path = self.work / "teacher_samples.safetensors"
        if path.is_file():
            return load_file(path)["latents"]
        self.deadline.check("teacher samples")
        latents = sample(self.teacher, self.eval_noise, self.eval_labels, self.prompts, self.size)
        save_tensors(path, {"latents": latents})
        return latents

    def row(
        self, name: str, compute: Callable[[], dict], variant: Calibrated | Distilled | None = None
    ) -> dict:
        """Row ``name``: read from its file in the work folder, else computed and written."""
        path = self.work / "rows" / f"{row_file_stem(name)}.json"
        described = None if variant is None else json.loads(json.dumps(asdict(variant)))
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved["name"] != name or saved["variant"] != described:
                raise WorkFolderMismatch(
                    f"{path} was measured for another definition of {name!r}; delete it to "
                    "measure the row again"
                )
            return saved["row"]
        self.deadline.check(name)
        row = compute()
        record = {"name": name, "variant": described, "row": row}
        write_atomically(path, json.dumps(record, indent=2) + "\n")
        self.spent.rows.pop(name, None)
        log(f"{name}: {row}")
        return row

    def plain_ternary(self) -> torch.nn.Module:
        """Absmean ternary of every block linear, no LoRA, no training."""
        return load_student(
            self.teacher_file, 0, dtype=torch.float32, device=self.device,
            gradient_checkpointing=False,
        ).eval()  # fmt: skip

    def calibrated(self, variant: Calibrated) -> tuple[torch.nn.Module, dict]:
        """The calibrated file of ``quantize --calibrate`` (timed), loaded as a student."""
        rank = self.size.lora_rank if variant.lora_rank is None else variant.lora_rank
        dataset = TeacherDataset(self.data)
        samples = variant.samples if variant.samples is not None else self.size.calibration_samples
        samples = min(samples or len(dataset), len(dataset))  # (the tiny size has 40)
        options = CalibrationOptions(**dict(variant.options))
        out = self.work / "calibrated" / f"{row_file_stem(variant.name)}.safetensors"
        started = time.perf_counter()
        calibration = teacher_calibration(
            self.data, samples, inputs=variant.inputs, options=options, dataset=dataset
        )
        report = quantize_file(
            self.teacher_file,
            out,
            rank,
            device=self.device,
            overwrite=True,
            calibration=calibration,
        )
        seconds = time.perf_counter() - started
        model = load_student(
            out, rank, dtype=torch.float32, device=self.device, gradient_checkpointing=False
        )
        outputs = [(e.output_plain, e.output) for e in report.layers]
        info = {
            "seconds": round(seconds, 2),
            "calibration_samples": samples,
            "lora_rank": rank,
            "median_output_error_plain": statistics.median(p for p, _ in outputs),
            "median_output_error_calibrated": statistics.median(c for _, c in outputs),
        }
        return model.eval(), info

    def distilled(self, variant: Distilled) -> tuple[torch.nn.Module, dict]:
        """The distillation CLI's student (``init``) trained by ``train.distill``, which
        resumes from its checkpoints in the work folder; its time counts every call."""
        size, name = self.size, variant.name
        steps = max(1, round(variant.step_share * size.distill_steps))
        warmup = None if variant.warmup_share is None else round(variant.warmup_share * steps)
        config = DistillConfig(
            model=str(self.teacher_file),
            data=str(self.data),
            output=str(self.work / "students" / f"{row_file_stem(name)}.safetensors"),
            lora_rank=size.lora_rank,
            init=variant.init,
            calibration_samples=size.calibration_samples,
            steps=steps,
            batch_size=size.distill_batch,
            micro_batch=size.distill_batch,
            lr_lora=size.lora_lr,
            lr_lora_factor=variant.lr_lora_factor,
            lr_scale=size.scale_lr if variant.scale_lr is None else variant.scale_lr,
            warmup_steps=warmup,
            min_lr_ratio=variant.min_lr_ratio,
            checkpoint_every=min(steps, DISTILL_CHECKPOINT_EVERY),
            gradient_checkpointing=False,
            dtype="float32",
            device=self.device.type,
            seed=derived_seed(self.seed, 5),
            overwrite=True,  # a finished run cut before its row resumes at its last step
        )
        env = DistEnv(device=self.device)
        started, before = time.perf_counter(), self.spent.rows.get(name, 0.0)
        self.deadline.check(f"{name}: student")
        dataset = TeacherDataset(config.data)
        student = build_student(config, env, dataset)
        done = 0

        def progress(step: int, loss: float) -> None:
            nonlocal done
            done = step
            if step % 100 == 0 or step in (1, steps):
                log(f"{name}: step {step}/{steps} loss {loss:.5f}")

        def should_stop() -> bool:
            return self.deadline.passed(f"{name}: step {done + 1}/{steps}")

        result = distill(student, dataset, config, env, progress, should_stop, log)
        self.spent.rows[name] = before + time.perf_counter() - started
        if result.output is None:
            raise Stopped(f"{name}: step {result.step + 1}/{steps}")
        losses = [entry["loss"] for entry in read_progress(config.work_path)[1]]
        info = {
            "seconds": round(self.spent.rows[name], 2),
            "steps": steps,
            "schedule": {  # as the config resolved it
                "lora_lr": config.lora_lr,
                "scale_lr": config.lr_scale,
                "warmup_steps": config.resolved().warmup_steps,
                "min_lr_ratio": config.resolved().min_lr_ratio,
            },
            # The first step shows what the start alone does, the last what training adds.
            "distill_loss": {"first_step": losses[0], "last_step": losses[-1]},
        }
        return student.eval(), info

    @torch.no_grad()
    def velocity_mse(self, model: torch.nn.Module) -> float:
        """Mean squared velocity error to the teacher at held-out (z_t, t) points."""
        gen = torch.Generator().manual_seed(derived_seed(self.seed, 8))
        clean, labels = self.teacher_latents, self.eval_labels
        t = training_times(len(clean), time_shift(self.size), gen)
        z_t = flow_point(clean, torch.randn(clean.shape, generator=gen), t)
        cond = self.prompts.condition(labels)
        args = [v.to(self.device) for v in (z_t, t, cond["context"], cond["pooled"])]
        return float(F.mse_loss(model(*args), self.teacher(*args)))

    def measure(self, model: torch.nn.Module, latents: torch.Tensor | None = None) -> dict:
        """Velocity error and sample quality; ``latents``: the model's samples, if known."""
        if latents is None:
            latents = sample(model, self.eval_noise, self.eval_labels, self.prompts, self.size)
        quality = sample_quality(
            self.classifier, to_images(latents), self.eval_labels, self.reference
        )
        return {"velocity_mse": self.velocity_mse(model), **quality}

    def run(self, variant: Calibrated | Distilled) -> dict:
        """The row of ``variant``: measured once per work folder, then read back."""

        def compute() -> dict:
            if isinstance(variant, Calibrated):
                model, info = self.calibrated(variant)
            else:
                model, info = self.distilled(variant)
            self.deadline.check(f"{variant.name}: samples")
            return {**self.measure(model), **info}

        return self.row(variant.name, compute, variant)


def recovered_share(teacher: float, ternary: float, distilled: float) -> float | None:
    """(q_distilled - q_ternary) / (q_teacher - q_ternary); None when ternary lost nothing."""
    gap = teacher - ternary
    return None if gap == 0 else (distilled - ternary) / gap


def shares(rows: dict, name: str) -> dict[str, float | None]:
    """The recovered share of each sample-quality metric for row ``name``."""
    teacher, plain = rows["teacher"], rows["plain ternary"]
    return {m: recovered_share(teacher[m], plain[m], rows[name][m]) for m in METRICS}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def ablation_variants(names: list[str] | None) -> tuple[Calibrated | Distilled, ...]:
    """The ablations of these names (in the order of ABLATIONS); None: every one."""
    if names is None:
        return ABLATIONS
    known = {variant.name for variant in ABLATIONS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {sorted(known)}")
    return tuple(variant for variant in ABLATIONS if variant.name in names)


def run_proxy(
    size_name: str,
    seed: int = 0,
    ablations: bool = False,
    device: str | None = None,
    variants: list[str] | None = None,
    work: Path | None = None,
    time_limit: float | None = None,
) -> dict:
    """The whole comparison; returns the JSON-ready result. ``ablations`` adds every ablation,
    ``variants`` only those of these names.

    ``work`` keeps every stage's output for a later call of the same size, seed and device
    (None: a temporary folder). With ``time_limit`` (seconds from the start of this call) the
    run raises Stopped before the first unit of work that would start later, all done so far
    saved in ``work``: calling again continues it."""
    device = torch.device(device or default_device())
    deadline = Deadline(time_limit)
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="distill_proxy_")))
        claim_work(work, identity(size_name, seed, device))
        stack.enter_context(WorkLock(work))
        spent = Spent(work / SPENT)
        try:
            proxy = Proxy(size_name, seed, work, device, deadline, spent)
            rows = {
                "teacher": proxy.row(
                    "teacher", lambda: proxy.measure(proxy.teacher, proxy.teacher_latents)
                ),
                "plain ternary": proxy.row(
                    "plain ternary", lambda: proxy.measure(proxy.plain_ternary())
                ),
            }
            for name, variant in MAIN.items():
                rows[name] = proxy.run(variant)
            chosen = ablation_variants(None if ablations else variants or [])
            extra = {variant.name: proxy.run(variant) for variant in chosen}
        except Stopped:
            spent.save_stop(deadline.elapsed())
            raise
    for table in (rows, extra):
        for name in table:
            if name not in ("teacher", "plain ternary"):
                table[name]["recovered_share"] = shares({**rows, **table}, name)
    return {
        **identity(size_name, seed, device),
        "real_digits": {
            "train": len(proxy.digits.train_labels),
            "test": len(proxy.digits.test_labels),
            "classifier_test_accuracy": proxy.real_accuracy,
            "frechet_distance_train_vs_test": proxy.real_distance,
        },
        "rows": rows,
        "ablations": extra,
        "seconds": round(spent.seconds + deadline.elapsed(), 1),
        "calls": spent.calls + 1,  # more than one: resumed from --work
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _time(row: dict) -> str:
    if "steps" in row:
        return f"{row['steps']} steps, {row['seconds']:.0f} s"
    if "calibration_samples" in row:
        return f"PTQ {row['seconds']:.1f} s"
    return ""


def markdown_table(result: dict) -> str:
    """Every row with its recovered share of each sample-quality metric, then ablations."""
    header = [
        "| model | velocity MSE to teacher | classifier accuracy | Frechet distance "
        "| recovered: accuracy | recovered: Frechet | cost |",
        "|---|---|---|---|---|---|---|",
    ]

    def line(name: str, row: dict) -> str:
        share = row.get("recovered_share", {})
        return (
            f"| {name} | {row['velocity_mse']:.5f} | {100 * row['accuracy']:.1f} % "
            f"| {row['frechet_distance']:.3f} | {_share(share.get('accuracy'))} "
            f"| {_share(share.get('frechet_distance'))} | {_time(row)} |"
        )

    lines = header + [line(name, result["rows"][name]) for name in ROWS]
    if result.get("ablations"):
        lines += ["", "Ablations:", "", *header]
        lines += [line(name, row) for name, row in result["ablations"].items()]
    real = result["real_digits"]
    calls = result.get("calls", 1)
    lines.append("")
    lines.append(
        f"Size `{result['size']}`, seed {result['seed']}, {result['seconds']} s"
        f"{f' in {calls} calls' if calls > 1 else ''} on "
        f"{result.get('device', 'cpu')} ({result['threads']} CPU thread(s)). Real held-out "
        f"digits: classifier accuracy {100 * real['classifier_test_accuracy']:.1f} %, Frechet "
        f"distance train vs test {real['frechet_distance_train_vs_test']:.3f}."
    )
    return "\n".join(lines) + "\n"


def summarize(results: list[dict]) -> str:
    """Mean and spread (min - max) over seeds of every row's recovered shares."""
    seeds = [r["seed"] for r in results]
    names = [n for n in ROWS if n not in ("teacher", "plain ternary")]
    names += [
        n for n in results[0].get("ablations", {}) if all(n in r["ablations"] for r in results)
    ]
    lines = [
        f"Size `{results[0]['size']}`, seeds {', '.join(map(str, seeds))}: recovered share of "
        "what plain ternary loses, mean over seeds [min, max].",
        "",
        "| model | recovered: accuracy | recovered: Frechet distance | velocity MSE |",
        "|---|---|---|---|",
    ]
    for name in names:
        rows = [r["rows"].get(name) or r["ablations"][name] for r in results]
        cells = []
        for metric in METRICS:
            values = [row["recovered_share"][metric] for row in rows]
            if any(v is None for v in values):
                cells.append("n/a")
                continue
            mean = sum(values) / len(values)
            cells.append(f"{100 * mean:.1f} % [{100 * min(values):.1f}, {100 * max(values):.1f}]")
        mse = sum(row["velocity_mse"] for row in rows) / len(rows)
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {mse:.5f} |")
    for name in ("teacher", "plain ternary"):
        accuracy = ", ".join(f"{100 * r['rows'][name]['accuracy']:.1f} %" for r in results)
        distance = ", ".join(f"{r['rows'][name]['frechet_distance']:.1f}" for r in results)
        lines.append("")
        lines.append(f"{name}: accuracy {accuracy}; Frechet distance {distance} (per seed).")
    return "\n".join(lines) + "\n"


def summary_text(results: list[dict], held_out: set[int]) -> str:
    """The summary of every seed; with ``held_out`` seeds first one table of the seeds the
    recipes were chosen on, one of the held-out seeds (never looked at while choosing)."""
    results = sorted(results, key=lambda r: r["seed"])
    chosen = [r for r in results if r["seed"] not in held_out]
    kept = [r for r in results if r["seed"] in held_out]
    if not held_out or not chosen or not kept:
        return summarize(results)
    return "\n".join(
        [
            "## Seeds the recipes were chosen on", "", summarize(chosen),
            "## Held-out seeds (not used for choosing)", "", summarize(kept),
            "## All seeds", "", summarize(results),
        ]
    )  # fmt: skip


def write_atomically(path: Path, text: str) -> None:
    """Text through the pack's one atomic writer (ternary/atomic.py)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("distill_proxy_results"))
    parser.add_argument("--ablations", action="store_true", help="also run the ablations")
    parser.add_argument(
        "--variant",
        action="append",
        metavar="NAME",
        help="also run the ablation of this name (repeatable; without --ablations)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument(
        "--summarize",
        action="store_true",
        help="only combine the seeds' JSON files of --size in --out into a summary table",
    )
    parser.add_argument(
        "--held-out",
        default="",
        metavar="SEEDS",
        help="with --summarize: comma-separated seeds not used for choosing recipes, "
        "summarized apart from the others",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing results")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep every stage's output here; running the same command again reuses it "
        "(default: a temporary folder)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"with --work: stop, all done saved, before the first unit of work that would "
        f"start after SECONDS (exit code {STOPPED}); the same command continues",
    )
    args = parser.parse_args(argv)
    if args.variant and args.ablations:
        parser.error("--variant picks ablations; --ablations already runs every one")
    if args.held_out and not args.summarize:
        parser.error("--held-out names seeds of the summary: use it with --summarize")
    if not all(seed.strip().isdigit() for seed in args.held_out.split(",") if seed.strip()):
        parser.error(f"--held-out takes comma-separated seeds (numbers), got {args.held_out!r}")
    if args.time_limit is not None and args.work is None:
        parser.error("--time-limit needs --work DIR, the folder that the next call continues from")
    try:
        ablation_variants(args.variant)
    except ValueError as err:
        parser.error(str(err))
    if args.summarize:
        files = sorted(args.out.glob(f"distill_proxy_{args.size}_seed*.json"))
        if not files:
            parser.error(f"no distill_proxy_{args.size}_seed*.json in {args.out}")
        held_out = {int(seed) for seed in args.held_out.split(",") if seed.strip()}
        table = summary_text([json.loads(f.read_text()) for f in files], held_out)
        write_atomically(args.out / f"distill_proxy_{args.size}_summary.md", table)
        print(table)
        return 0
    stem = args.out / f"distill_proxy_{args.size}_seed{args.seed}"
    for suffix in (".json", ".md"):
        if stem.with_suffix(suffix).exists() and not args.overwrite:
            parser.error(f"{stem.with_suffix(suffix)} exists; pass --overwrite to replace it")
    try:
        result = run_proxy(
            args.size, args.seed, args.ablations, args.device, args.variant, args.work,
            args.time_limit,
        )  # fmt: skip
    except Stopped as stop:
        print(f"stopped at {stop.stage}; rerun the same command to continue", flush=True)
        return STOPPED
    except (WorkFolderMismatch, WorkDirBusy) as err:
        parser.error(str(err))
    table = markdown_table(result)
    write_atomically(stem.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_atomically(stem.with_suffix(".md"), table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
