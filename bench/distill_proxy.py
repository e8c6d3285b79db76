"""Quality proxy for distillation: does training LoRA + scales against teacher velocities win
back what plain ternary quantization loses? FLUX.1-dev cannot be had here, so the question is
asked of a tiny FLUX-architecture model trained on scikit-learn's 8x8 digits.

The digits are upsampled and folded into FLUX's 16-channel latent without a VAE (pixel
unshuffle by 4: a 32x32 image is a [16, 8, 8] latent, 16 image tokens); the digit is the
prompt, through a fixed random table that plays the frozen text encoder (context tokens and a
pooled vector). A full-precision teacher learns rectified flow as FLUX does. The pack's own
pipeline then does the rest: the teacher data set builder stores teacher samples and
velocities (no real digits), ``load_student`` quantizes, ``train.distill`` trains LoRA and
scales. The teacher, plain ternary (absmean, no training) and the distilled student sample
the same held-out noise; a classifier trained on real digits judges the samples: accuracy on
the digit asked for, and a Frechet distance in its feature space.

    python bench/distill_proxy.py --size small --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from comfyui_ternary_flux.bench.proxy_metrics import (
    frechet_distance,
    sample_quality,
    train_classifier,
)
from comfyui_ternary_flux.distill.config import DistillConfig
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
from comfyui_ternary_flux.models.flux1 import FluxConfig
from comfyui_ternary_flux.models.flux1_torch import PATCH, FluxTransformer

FOLD = 4  # pixel unshuffle: 16 latent channels, as FLUX's VAE
TEXT_TOKENS = 2
CONTEXT_DIM = 64
POOLED_DIM = 32
HEAD_DIM = 128  # FLUX.1's RoPE split fixes the head size
ROWS = ("teacher", "plain ternary", "distilled ternary + LoRA")


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


def train_teacher(
    size: ProxySize, latents: torch.Tensor, labels: torch.Tensor, prompts: DigitPrompts, seed: int
) -> FluxTransformer:
    """Full-precision rectified-flow training on real digits, AdamW with a cosine schedule."""
    torch.manual_seed(derived_seed(seed, 1))
    model = FluxTransformer(flux_config(size))
    gen = torch.Generator().manual_seed(derived_seed(seed, 2))
    mu = time_shift(size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.teacher_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, size.teacher_steps)
    for step in range(size.teacher_steps):
        index = torch.randint(len(latents), (size.teacher_batch,), generator=gen)
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=gen)
        t = training_times(size.teacher_batch, mu, gen)
        cond = prompts.condition(labels[index])
        v = model(flow_point(clean, noise, t), t, cond["context"], cond["pooled"])
        loss = F.mse_loss(v, noise - clean)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == size.teacher_steps - 1:
            log(f"teacher step {step + 1}/{size.teacher_steps} loss {loss.item():.4f}")
    return model.eval()


def sample(
    model: torch.nn.Module,
    noise: torch.Tensor,
    labels: torch.Tensor,
    prompts: DigitPrompts,
    size: ProxySize,
    batch_size: int = 250,
) -> torch.Tensor:
    """Latents from the pack's Euler sampler on the teacher data set's schedule."""
    sigmas = sampling_sigmas(size.sampling_steps, time_shift(size))
    velocity = model_velocity_fn(model)
    return torch.cat(
        [
            euler_sample(
                velocity,
                noise[i : i + batch_size],
                prompts.condition(labels[i : i + batch_size]),
                sigmas,
            )
            for i in range(0, len(noise), batch_size)
        ]
    )


def seeded_noise(count: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))


def balanced_labels(per_digit: int) -> torch.Tensor:
    return torch.arange(10).repeat_interleave(per_digit)


def distill_student(
    teacher: torch.nn.Module,
    teacher_file: Path,
    work: Path,
    size: ProxySize,
    prompts: DigitPrompts,
    seed: int,
) -> tuple[torch.nn.Module, list[float]]:
    """The pack's pipeline on the proxy: teacher data set (the teacher's own samples and its
    velocities at stored (z_t, t) points), ``load_student`` (absmean ternary + residual-SVD
    LoRA), ``train.distill`` (LoRA and scales against the stored velocities). Returns the
    student and its loss per step."""
    texts = [prompts.text(int(d)) for d in balanced_labels(size.distill_prompts_per_digit)]
    build_teacher_dataset(
        work / "teacher_data",
        texts,
        prompts,
        model_velocity_fn(teacher),
        teacher_settings(size, seed),
        log=log,
    )
    config = DistillConfig(
        model=str(teacher_file),
        data=str(work / "teacher_data"),
        output=str(work / "student.safetensors"),
        lora_rank=size.lora_rank,
        steps=size.distill_steps,
        batch_size=size.distill_batch,
        micro_batch=size.distill_batch,
        lr_lora=size.lora_lr,
        lr_scale=size.scale_lr,
        checkpoint_every=size.distill_steps,
        gradient_checkpointing=False,
        dtype="float32",
        device="cpu",
        seed=derived_seed(seed, 5),
    )
    student = load_student(
        teacher_file, size.lora_rank, dtype=torch.float32, gradient_checkpointing=False
    )

    def progress(step: int, loss: float) -> None:
        if step % 100 == 0 or step in (1, size.distill_steps):
            log(f"distill step {step}/{size.distill_steps} loss {loss:.5f}")

    result = distill(student, TeacherDataset(config.data), config, on_step=progress, log=log)
    return student.eval(), result.losses


def plain_ternary(teacher_file: Path) -> torch.nn.Module:
    """Absmean ternary of every block linear, no LoRA, no training."""
    return load_student(teacher_file, 0, dtype=torch.float32, gradient_checkpointing=False).eval()


@torch.no_grad()
def velocity_mse(
    model: torch.nn.Module,
    teacher: torch.nn.Module,
    clean: torch.Tensor,
    labels: torch.Tensor,
    prompts: DigitPrompts,
    size: ProxySize,
    seed: int,
) -> float:
    """Mean squared velocity error to the teacher at held-out (z_t, t) points."""
    gen = torch.Generator().manual_seed(seed)
    t = training_times(len(clean), time_shift(size), gen)
    z_t = flow_point(clean, torch.randn(clean.shape, generator=gen), t)
    cond = prompts.condition(labels)
    args = (z_t, t, cond["context"], cond["pooled"])
    return float(F.mse_loss(model(*args), teacher(*args)))


def recovered_share(teacher: float, ternary: float, distilled: float) -> float | None:
    """(q_distilled - q_ternary) / (q_teacher - q_ternary); None when ternary lost nothing."""
    gap = teacher - ternary
    return None if gap == 0 else (distilled - ternary) / gap


def run_proxy(size_name: str, seed: int = 0) -> dict:
    """The whole comparison; returns the JSON-ready result."""
    size = SIZES[size_name]
    started = time.perf_counter()
    digits = load_digits(FOLD * size.latent_side, seed)
    prompts = DigitPrompts(derived_seed(seed, 3))
    classifier = train_classifier(
        digits.train_images, digits.train_labels, size.classifier_epochs, derived_seed(seed, 4)
    )
    with torch.no_grad():
        reference = classifier.features(digits.test_images)
        real_accuracy = float(
            (classifier(digits.test_images).argmax(1) == digits.test_labels).double().mean()
        )
        real_distance = frechet_distance(classifier.features(digits.train_images), reference)
    log(f"classifier accuracy on held-out real digits: {real_accuracy:.4f}")
    teacher = train_teacher(
        size, to_latent(digits.train_images), digits.train_labels, prompts, seed
    )
    with tempfile.TemporaryDirectory(prefix="distill_proxy_") as work:
        teacher_file = Path(work) / "teacher.safetensors"
        save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(teacher_file))
        student, losses = distill_student(teacher, teacher_file, Path(work), size, prompts, seed)
        models = {
            "teacher": teacher,
            "plain ternary": plain_ternary(teacher_file),
            "distilled ternary + LoRA": student,
        }

    eval_labels = balanced_labels(size.eval_samples_per_digit)
    latent_shape = (LATENT_CHANNELS, size.latent_side, size.latent_side)
    eval_noise = seeded_noise(len(eval_labels), latent_shape, derived_seed(seed, 7))
    teacher_latents = None
    rows = {}
    for name, model in models.items():
        latents = sample(model, eval_noise, eval_labels, prompts, size)
        teacher_latents = latents if teacher_latents is None else teacher_latents
        quality = sample_quality(classifier, to_images(latents), eval_labels, reference)
        mse = velocity_mse(
            model, teacher, teacher_latents, eval_labels, prompts, size, derived_seed(seed, 8)
        )
        rows[name] = {"velocity_mse": mse, **quality}
        log(f"{name}: {rows[name]}")
    recovered = {
        metric: recovered_share(*(rows[name][metric] for name in ROWS))
        for metric in ("accuracy", "frechet_distance")
    }
    return {
        "benchmark": "distill_proxy",
        "size": size_name,
        "seed": seed,
        "settings": asdict(size),
        "flux_config": flux_config(size).as_dict(),
        "real_digits": {
            "train": len(digits.train_labels),
            "test": len(digits.test_labels),
            "classifier_test_accuracy": real_accuracy,
            "frechet_distance_train_vs_test": real_distance,
        },
        "rows": rows,
        "recovered_share": recovered,
        # The first step shows what the residual-SVD LoRA alone does, the last what training adds.
        "distill_loss": {"first_step": losses[0], "last_step": losses[-1]},
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def markdown_table(result: dict) -> str:
    """The three rows side by side, and the recovered share of each sample-quality metric."""

    def share(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f} %"

    lines = [
        "| model | velocity MSE to teacher | classifier accuracy | Frechet distance |",
        "|---|---|---|---|",
    ]
    for name in ROWS:
        row = result["rows"][name]
        lines.append(
            f"| {name} | {row['velocity_mse']:.5f} | {100 * row['accuracy']:.1f} % "
            f"| {row['frechet_distance']:.3f} |"
        )
    recovered = result["recovered_share"]
    lines.append(
        f"| recovered share | | {share(recovered['accuracy'])} "
        f"| {share(recovered['frechet_distance'])} |"
    )
    real = result["real_digits"]
    lines.append("")
    lines.append(
        f"Size `{result['size']}`, seed {result['seed']}, {result['seconds']} s on "
        f"{result['threads']} CPU thread(s). Real held-out digits: classifier accuracy "
        f"{100 * real['classifier_test_accuracy']:.1f} %, Frechet distance train vs test "
        f"{real['frechet_distance_train_vs_test']:.3f}."
    )
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("distill_proxy_results"))
    parser.add_argument("--overwrite", action="store_true", help="replace existing results")
    args = parser.parse_args(argv)
    stem = args.out / f"distill_proxy_{args.size}_seed{args.seed}"
    for suffix in (".json", ".md"):
        if stem.with_suffix(suffix).exists() and not args.overwrite:
            parser.error(f"{stem.with_suffix(suffix)} exists; pass --overwrite to replace it")
    result = run_proxy(args.size, args.seed)
    table = markdown_table(result)
    write_atomically(stem.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_atomically(stem.with_suffix(".md"), table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
