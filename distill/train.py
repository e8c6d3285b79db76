"""Distillation: train the ternary student's scales and LoRA to match stored teacher velocities.

loss = MSE(student v(z_t, t), teacher v) over examples of a teacher data set. Everything
random is a function of (seed, step) (the data order) or stored in the data set (t, eps),
so a resumed run continues exactly where a killed one stopped: a checkpoint only needs the
step, the trainable tensors and the optimizer state. Under torchrun each process takes its
slice of every global batch and DDP averages the gradients, so the loss curve does not
depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..models.flux1 import FAMILY as FLUX
from ..ternary.atomic import atomic_path
from ..ternary.fileformat import save_ternary_file
from ..ternary.module import export_tensors
from .config import DistillConfig
from .distributed import DistEnv
from .progress import ProgressLog
from .schedule import derived_seed
from .student import prepare_for_training
from .teacher import TeacherDataset

CHECKPOINT = "checkpoint.pt"


@dataclass
class DistillResult:
    step: int
    losses: list[float]  # per optimizer step of this run (global mean)
    output: Path | None  # None when stopped before the last step


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def learning_rate_factor(step: int, config: DistillConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    span = max(config.steps - config.warmup_steps - 1, 1)
    progress = (step - config.warmup_steps) / span
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


class DataOrder:
    """Example indices of each global batch: epochs of seeded permutations, one after another."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _at(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=gen)
        return int(self._perm[offset])

    def batch(self, step: int, batch_size: int) -> list[int]:
        return [self._at(step * batch_size + i) for i in range(batch_size)]


def collate(dataset: TeacherDataset, indices: list[int], device: torch.device) -> dict:
    examples = [dataset.example(i) for i in indices]
    shapes = {tuple(e["context"].shape) for e in examples}
    if len(shapes) > 1:
        raise ValueError(f"a micro-batch mixes text lengths {sorted(shapes)}; use micro_batch 1")
    return {k: torch.stack([e[k] for e in examples]).to(device) for k in examples[0]}


def _save_checkpoint(path: Path, step: int, groups: dict, optimizer, fingerprint: dict) -> None:
    trainable = {k: p.detach().cpu() for g in groups.values() for k, p in g.items()}
    state = {
        "step": step,
        "trainable": trainable,
        "optimizer": optimizer.state_dict(),
        "fingerprint": fingerprint,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, groups: dict, optimizer, fingerprint: dict) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["fingerprint"] != fingerprint:
        changed = [
            k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k]
        ] or sorted(state["fingerprint"])
        raise ValueError(
            f"{path} belongs to a run with other settings ({', '.join(changed)} differ); "
            "use another work_dir or the same config"
        )
    with torch.no_grad():
        for g in groups.values():
            for name, param in g.items():
                param.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def distill(
    student: nn.Module,
    dataset: TeacherDataset,
    config: DistillConfig,
    env: DistEnv | None = None,
    on_step: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] = print,
) -> DistillResult:
    """Train ``student`` (a FluxTransformer with TernaryLinear + LoRA) in place.

    Resumes from ``<work_dir>/checkpoint.pt`` when present. ``on_step(step, loss)`` is
    called after every optimizer step; when ``should_stop()`` turns true the run saves a
    checkpoint and returns with ``output=None``.
    """
    env = env or DistEnv()
    per_rank, remainder = divmod(config.batch_size, env.world_size)
    if remainder or per_rank % config.micro_batch:
        raise ValueError(
            f"batch_size {config.batch_size} must split into {env.world_size} process(es) x "
            f"whole micro-batches of {config.micro_batch}"
        )
    output = Path(config.output)
    if output.exists() and not config.overwrite:
        raise FileExistsError(f"{output} exists; choose another output or set overwrite = true")
    work = config.work_path
    if env.is_main:
        work.mkdir(parents=True, exist_ok=True)
    env.barrier()

    student.to(env.device)
    groups = prepare_for_training(student)
    optimizer = torch.optim.AdamW(
        [
            {"params": list(groups["lora"].values()), "lr": config.lr_lora},
            {"params": list(groups["scale"].values()), "lr": config.lr_scale},
        ],
        weight_decay=config.weight_decay,
    )
    base_lrs = [config.lr_lora, config.lr_scale]
    fingerprint = {**config.result_settings(), "data": dataset.fingerprint}
    checkpoint = work / CHECKPOINT
    step = (
        _load_checkpoint(checkpoint, groups, optimizer, fingerprint) if checkpoint.exists() else 0
    )
    progress = ProgressLog(work, config.steps, enabled=env.is_main)
    progress.truncate_after(step)
    if step:
        log(f"resuming from {checkpoint} at step {step}")
    progress.record("running", event="start", step=step, world_size=env.world_size)

    model = student
    if env.distributed:
        model = DistributedDataParallel(
            student,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            broadcast_buffers=False,
        )
    order = DataOrder(len(dataset), config.seed)
    losses: list[float] = []
    while step < config.steps:
        started = time.perf_counter()
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * learning_rate_factor(step, config)
        mine = order.batch(step, config.batch_size)[env.rank * per_rank : (env.rank + 1) * per_rank]
        micro = [mine[i : i + config.micro_batch] for i in range(0, per_rank, config.micro_batch)]
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        for i, indices in enumerate(micro):
            batch = collate(dataset, indices, env.device)
            sync = i == len(micro) - 1 or not env.distributed
            with contextlib.nullcontext() if sync else model.no_sync():
                v = model(batch["z_t"], batch["t"], batch["context"], batch["pooled"],
                          batch["guidance"])  # fmt: skip
                loss = F.mse_loss(v.float(), batch["v"])
                (loss * (len(indices) / per_rank)).backward()
            loss_sum += loss.detach().double() * len(indices)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        mean_loss = float(env.sum(loss_sum)) / config.batch_size
        losses.append(mean_loss)
        seconds = time.perf_counter() - started
        progress.record(
            "running",
            step=step,
            loss=mean_loss,
            lr_lora=optimizer.param_groups[0]["lr"],
            lr_scale=optimizer.param_groups[1]["lr"],
            seconds=round(seconds, 4),
        )
        if on_step is not None:
            on_step(step, mean_loss)
        stop = should_stop is not None and should_stop()
        if step % config.checkpoint_every == 0 or step == config.steps or stop:
            if env.is_main:
                _save_checkpoint(checkpoint, step, groups, optimizer, fingerprint)
            env.barrier()
        if stop and step < config.steps:
            progress.record("stopped", event="stopped", step=step)
            log(f"stopped at step {step}; the checkpoint in {work} resumes it")
            return DistillResult(step, losses, None)

    if env.is_main:
        tensors, layers, _ = export_tensors(student, dense=lambda dtype: torch.bfloat16)
        save_ternary_file(
            output,
            tensors,
            layers,
            packing="2bit",
            lora_rank=config.lora_rank,
            scale_rule=config.scale_rule,
            architecture=FLUX.name,
            metadata={"distilled_steps": str(step), "teacher_data": dataset.fingerprint},
            overwrite=config.overwrite,
        )
        progress.record("finished", event="finished", step=step, output=str(output))
        log(f"wrote {output}")
    env.barrier()
    return DistillResult(step, losses, output)
