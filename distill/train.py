"""Distillation: train the ternary student's scales and LoRA to match stored teacher velocities.

loss = MSE(student v(z_t, t), teacher v) over examples of a teacher data set. Everything
random is a function of (seed, step) (the data order) or stored in the data set (t, eps),
so a resumed run continues exactly where a killed one stopped: a checkpoint only needs the
step, the trainable tensors and the optimizer state. Under torchrun each process takes its
slice of every global batch and DDP averages the gradients, so the loss curve does not
depend on the number of processes.

Faults: a run holds its work folder's lock (ternary/lock.py), so a second process is
refused instead of training beside it. Two checkpoints are kept (the latest and the one
before); one whose zip CRCs fail is set aside (``.damaged``) and the run resumes from the
other, to the same result. A non-finite loss or trained tensor stops the run with a message
before anything non-finite is saved. Settings that cannot work (a batch larger than the
data set, an output that cannot be written) are refused before any training.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..models.flux1 import FAMILY as FLUX
from ..ternary.atomic import atomic_path, check_target
from ..ternary.calibrate import CALIBRATED
from ..ternary.fileformat import save_ternary_file
from ..ternary.integrity import DamagedFileError, check_zip
from ..ternary.lock import WorkLock
from ..ternary.module import export_tensors
from .config import RECIPE_KEYS, DistillConfig
from .distributed import DistEnv
from .progress import ProgressLog
from .schedule import derived_seed
from .student import prepare_for_training
from .teacher import TeacherDataset

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"  # the checkpoint before, kept until the next one is written
DAMAGED = ".damaged"  # suffix of a checkpoint set aside


class TrainingDiverged(ValueError):
    """The loss or a trained tensor became NaN or infinite; the message says what to do."""


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
    """Linear warm-up, then cosine decay to min_lr_ratio at the last step (``config``
    resolved: ``DistillConfig.resolved``)."""
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


def check_run(
    config: DistillConfig, dataset: TeacherDataset, world_size: int = 1, check_lock: bool = True
) -> None:
    """Refuse, before any training, what cannot work: a batch that does not split over the
    processes, a batch larger than the data set, an output that exists (without overwrite)
    or cannot be written, a work folder another process is using (``check_lock``: on the
    main process only, the one that takes the lock) or whose checkpoint has other settings."""
    per_rank, remainder = divmod(config.batch_size, world_size)
    if remainder or per_rank % config.micro_batch:
        raise ValueError(
            f"batch_size {config.batch_size} must split into {world_size} process(es) x "
            f"whole micro-batches of {config.micro_batch}"
        )
    if config.batch_size > len(dataset):
        raise ValueError(
            f"batch_size {config.batch_size} is larger than the teacher data set "
            f"({len(dataset)} examples: prompts x points_per_prompt); lower it or build more "
            "teacher data"
        )
    if config.init == "calibrated" and config.calibration_samples > len(dataset):
        raise ValueError(
            f"calibration_samples {config.calibration_samples} is larger than the teacher data "
            f"set ({len(dataset)} examples); lower it or build more teacher data"
        )
    output = Path(config.output)
    check_target(output, overwrite=True)  # a name too long, a folder, a folder not writable
    if output.exists() and not config.overwrite:
        raise FileExistsError(f"{output} exists; choose another output or set overwrite = true")
    if check_lock:
        WorkLock(config.work_path).check_free()
    resume = _resume_point(config.work_path)
    if resume is not None:  # refused before the student is built: a calibrated start takes
        try:  # minutes on FLUX.1-dev (mmap: only the fingerprint is read)
            saved = _read_checkpoint(resume, mmap=True)["fingerprint"]
        except DamagedFileError:
            return  # the trainer sets a damaged checkpoint aside and says so
        _refuse_other_settings(resume, saved, _run_fingerprint(config.resolved(saved), dataset))


def _run_fingerprint(config: DistillConfig, dataset: TeacherDataset) -> dict:
    """What a checkpoint must have been made with to be resumed: the result's settings and
    the data set (of a config resolved with the checkpoint's recipe)."""
    return {**config.result_settings(), "data": dataset.fingerprint}


def _resume_point(work: Path) -> Path | None:
    return next((work / n for n in (CHECKPOINT, PREVIOUS) if (work / n).exists()), None)


def _refuse_other_settings(path: Path, saved: dict, fingerprint: dict) -> None:
    if saved != fingerprint:
        changed = [k for k in fingerprint if saved.get(k) != fingerprint[k]] or sorted(saved)
        raise ValueError(
            f"{path} belongs to a run with other settings ({', '.join(changed)} differ); "
            "use another work_dir or the same config"
        )


def check_data_fits(student: nn.Module, dataset: TeacherDataset, model: str) -> None:
    """Refuse a teacher data set made for a model of other input widths (its first example
    against the student's FLUX config), which would otherwise fail inside the first forward
    pass with a bare shape error."""
    config = student.config
    example = dataset.example(0)
    z, context, pooled = example["z_t"], example["context"], example["pooled"]
    channels = config.in_channels // 4
    if (
        z.dim() != 3 or z.shape[0] != channels
        or context.dim() != 2 or context.shape[1] != config.context_in_dim
        or tuple(pooled.shape) != (config.vec_in_dim,)
    ):  # fmt: skip
        raise ValueError(
            f"{dataset.directory} was made for another model: latents {list(z.shape)}, text "
            f"{list(context.shape)}, pooled {list(pooled.shape)}; {model} takes "
            f"[{channels}, h, w], [tokens, {config.context_in_dim}], [{config.vec_in_dim}]. "
            "Build the teacher data with this model"
        )


def _all_finite(tensors) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def _save_checkpoint(work: Path, step: int, groups: dict, optimizer, fingerprint: dict) -> None:
    """Write ``checkpoint.pt`` of this step; the one before becomes ``checkpoint.prev.pt``."""
    trainable = {k: p.detach().cpu() for g in groups.values() for k, p in g.items()}
    if not _all_finite(trainable.values()):
        bad = next(k for k, t in trainable.items() if not bool(torch.isfinite(t).all()))
        raise TrainingDiverged(
            f"step {step}: {bad} became NaN or infinite; no checkpoint of it was written. "
            "Lower lr_lora / lr_scale and start again in a new work_dir"
        )
    state = {
        "step": step,
        "trainable": trainable,
        "optimizer": optimizer.state_dict(),
        "fingerprint": fingerprint,
    }
    current = work / CHECKPOINT
    if current.exists():
        os.replace(current, work / PREVIOUS)
    with atomic_path(current) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def set_aside_damaged(work: Path, log: Callable[[str], None]) -> None:
    """Move checkpoints whose zip CRCs fail out of the way (``<name>.damaged``), so the run
    resumes from the good one left; refuse when every checkpoint was damaged."""
    damaged = []
    for name in (CHECKPOINT, PREVIOUS):
        path = work / name
        if not path.exists():
            continue
        try:
            check_zip(path)
        except DamagedFileError as err:
            path.replace(path.with_name(path.name + DAMAGED))
            damaged.append(f"{err} (moved to {path.name + DAMAGED})")
    if not damaged:
        return
    good = [name for name in (CHECKPOINT, PREVIOUS) if (work / name).exists()]
    if not good:
        raise DamagedFileError(
            "; ".join(damaged) + ". No good checkpoint is left: run again to start from step 0 "
            "(or restore a copy of the checkpoint)"
        )
    log("; ".join(damaged) + f"; resuming from {work / good[0]}")


def _read_checkpoint(path: Path, mmap: bool = False) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        if not isinstance(state["fingerprint"], dict) or not isinstance(state["trainable"], dict):
            raise TypeError("its fingerprint or trainable tensors are not tables")
    except Exception as err:  # not a checkpoint of this trainer (its CRCs were fine)
        raise DamagedFileError(
            f"{path} is not a readable checkpoint ({str(err).splitlines()[0][:120]}); delete it "
            "to start from the checkpoint before it, or from step 0"
        ) from None
    return state


def _load_checkpoint(path: Path, state: dict, groups: dict, optimizer, fingerprint: dict) -> int:
    trainable = state["trainable"]
    _refuse_other_settings(path, state["fingerprint"], fingerprint)
    missing = sorted({n for g in groups.values() for n in g} - set(trainable))
    if missing:
        raise DamagedFileError(f"{path} lacks {missing[0]}; delete it to start again")
    with torch.no_grad():
        for g in groups.values():
            for name, param in g.items():
                param.copy_(trainable[name])
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

    Resumes from ``<work_dir>/checkpoint.pt`` (or the checkpoint before it) when present.
    ``on_step(step, loss)`` is called after every optimizer step; when ``should_stop()``
    turns true the run saves a checkpoint and returns with ``output=None``. The main process
    holds the work folder's lock for the whole run; a failure or an interruption is recorded
    in ``status.json`` before it propagates.
    """
    env = env or DistEnv()
    check_run(config, dataset, env.world_size, check_lock=False)  # the lock is taken below
    check_data_fits(student, dataset, config.model)
    work = config.work_path
    with WorkLock(work) if env.is_main else contextlib.nullcontext() as lock:
        if lock is not None and lock.stale_pid is not None:
            log(f"{work} was locked by process {lock.stale_pid}, which is gone: taking it over")
        if env.is_main:
            set_aside_damaged(work, log)
        env.barrier()
        progress = ProgressLog(work, config.steps, enabled=env.is_main)
        try:
            return _train(student, dataset, config, env, on_step, should_stop, log, progress)
        except BaseException as err:
            state = "failed" if isinstance(err, Exception) else "interrupted"
            text = " ".join(str(err).split())[:500] or type(err).__name__
            progress.record(state, event=state, error=text)
            raise


def _train(student, dataset, config, env, on_step, should_stop, log, progress) -> DistillResult:
    per_rank = config.batch_size // env.world_size
    output = Path(config.output)
    work = config.work_path
    resume = _resume_point(work)
    state = _read_checkpoint(resume) if resume else None
    # What the config leaves open comes from the checkpoint: a run keeps its own recipe.
    recipe, config = config.resolved(), config.resolved(state["fingerprint"] if state else None)
    kept = [
        f"{k} {getattr(config, k)}" for k in RECIPE_KEYS if getattr(config, k) != getattr(recipe, k)
    ]
    if kept:
        log(
            f"{resume} began with {', '.join(kept)} (not the {config.init} start's recipe): "
            "resuming with them"
        )
    student.to(env.device)
    groups = prepare_for_training(student)
    optimizer = torch.optim.AdamW(
        [
            {"params": list(groups["lora"].values()), "lr": config.lora_lr},
            {"params": list(groups["scale"].values()), "lr": config.lr_scale},
        ],
        weight_decay=config.weight_decay,
    )
    base_lrs = [config.lora_lr, config.lr_scale]
    fingerprint = _run_fingerprint(config, dataset)
    step = _load_checkpoint(resume, state, groups, optimizer, fingerprint) if resume else 0
    del state  # (its tensors are copied in)
    progress.truncate_after(step)
    if step:
        log(f"resuming from {resume} at step {step}")
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
        mean_loss = float(env.sum(loss_sum)) / config.batch_size
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(
                f"step {step + 1}: the loss is {mean_loss}: training diverged (lr_lora "
                f"{config.lr_lora} x lr_lora_factor {config.lr_lora_factor}, lr_scale "
                f"{config.lr_scale}); stopped before the update, "
                f"{output} was not written. Lower the learning rates and start again in a "
                "new work_dir"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
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
                _save_checkpoint(work, step, groups, optimizer, fingerprint)
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
            scale_rule=CALIBRATED if config.init == "calibrated" else config.scale_rule,
            architecture=FLUX.name,
            metadata={
                "distilled_steps": str(step),
                "teacher_data": dataset.fingerprint,
                "init": config.init,
            },
            overwrite=config.overwrite,
        )
        progress.record("finished", event="finished", step=step, output=str(output))
        log(f"wrote {output}")
    env.barrier()
    return DistillResult(step, losses, output)
