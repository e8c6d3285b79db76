"""Distillation nodes: Build Teacher Dataset, Distill Ternary (in-process), Distill Job
(background torchrun) and Job Status. The work itself is in ternary/teacher.py and
ternary/train.py; these nodes connect it to ComfyUI's models, text encoders and progress bar.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..distill.calibration import DEFAULT_SAMPLES, config_calibration
from ..distill.config import INITS, DistillConfig
from ..distill.progress import read_progress
from ..distill.prompts import generate_prompts, read_prompt_file
from ..distill.student import distillable, refuse_other_families, student_from_tensors
from ..distill.teacher import TeacherDataset, TeacherSettings, build_teacher_dataset
from ..distill.train import check_run, distill
from ..ternary.fileformat import MmapReader, TernaryFormatError
from ..ternary.quantize import SCALE_RULES
from . import folders
from .model_io import check_flux, dense_state_dict, load_ternary_patcher, logical_shapes

PACK_ROOT = Path(__file__).resolve().parents[1]
LossMap = io.Custom("LOSS_MAP")


def work_root() -> Path:
    return Path(folder_paths.get_output_directory()) / "ternary_distill"


def dataset_dir(name: str) -> Path:
    """An absolute path as given; a bare name lives under output/ternary_distill/data/."""
    if not name.strip():
        raise ValueError("give the teacher data set a name or a folder path")
    path = Path(name).expanduser()
    return path if path.is_absolute() else work_root() / "data" / path


def job_dir(name: str) -> Path:
    if not name.strip() or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"invalid job name {name!r}: use a plain name such as flux-r64")
    return work_root() / "jobs" / name


def calibration_prompts(prompts: str, prompt_file: str, count: int, seed: int) -> list[str]:
    """Prompts typed in the node (one per line), else a prompt file, else generated ones."""
    typed = [line.strip() for line in prompts.splitlines() if line.strip()]
    if typed:
        return typed
    if prompt_file.strip():
        return read_prompt_file(Path(prompt_file.strip()).expanduser())
    return generate_prompts(count, seed)


def comfy_encoder(clip):
    """encode(prompt) -> (T5 context [L, 4096], pooled CLIP [768]) with ComfyUI's encoders."""

    def encode(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        context, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
        return context[0].float().cpu(), pooled[0].float().cpu()

    return encode


def comfy_velocity_fn(patcher):
    """velocity_fn of a ComfyUI FLUX MODEL (its LoRAs and patches applied by ComfyUI)."""

    def velocity(z: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()
        comfy.model_management.load_models_gpu([patcher])
        base = patcher.model
        device, dtype = patcher.load_device, base.get_dtype_inference()
        out = base.diffusion_model(
            z.to(device, dtype),
            t.to(device).float(),
            context=cond["context"].to(device, dtype),
            y=cond["pooled"].to(device, dtype),
            guidance=cond["guidance"].to(device, dtype),
        )
        return out.float()

    return velocity


def refuse_other_family_file(path: str) -> None:
    """Refuse a model file of another family before a job starts on it; a file whose header
    cannot be read is left to the job, whose log says why."""
    try:
        reader = MmapReader(path)
    except (TernaryFormatError, OSError):
        return
    with reader:
        refuse_other_families(reader)


def _number_inputs() -> list:
    return [
        io.Int.Input("lora_rank", default=64, min=1, max=512, tooltip="LoRA rank per layer."),
        io.Int.Input("steps", default=1000, min=1, max=1_000_000, tooltip="Optimizer steps."),
        io.Int.Input(
            "batch_size", default=4, min=1, max=1024, tooltip="Examples per optimizer step."
        ),
        io.Int.Input(
            "micro_batch",
            default=1,
            min=1,
            max=64,
            tooltip="Examples per forward pass; the rest is gradient accumulation.",
        ),
        io.Float.Input(
            "lr_lora",
            default=1e-4,
            min=0.0,
            max=1.0,
            step=1e-5,
            round=False,
            tooltip="Learning rate of the LoRA weights (AdamW, cosine schedule). The "
            "calibrated start trains them at twice it, with a warm-up over 10 % of the steps and "
            "a floor of 0.1 under the cosine (its recipe in distill/config.py).",
        ),
        io.Float.Input(
            "lr_scale",
            default=3e-4,
            min=0.0,
            max=1.0,
            step=1e-5,
            round=False,
            tooltip="Learning rate of the per-row ternary scales.",
        ),
        io.Combo.Input(
            "scale_rule",
            options=list(SCALE_RULES),
            default="absmean",
            tooltip="Starting scales: absmean (mean |W| per row, the 1.58-bit FLUX rule) or "
            "lsq (least-squares). The ternary values are the same.",
        ),
        io.Int.Input(
            "checkpoint_every",
            default=100,
            min=1,
            max=1_000_000,
            tooltip="Steps between checkpoints; an interrupted run resumes from the last one.",
        ),
        io.Int.Input(
            "seed",
            default=0,
            min=0,
            max=2**31 - 1,
            control_after_generate=False,  # queueing again must resume the same run
            tooltip="Data order seed. Resuming needs the same seed; another seed needs another "
            "name.",
        ),
        io.Combo.Input(
            "init",
            options=list(INITS),
            default="svd",
            optional=True,
            tooltip="How the student starts. svd: the scale rule's ternary values and a "
            "truncated SVD of the residual as LoRA. calibrated: values, scales and LoRA chosen "
            "for each layer's output on examples of the teacher data set (as Quantize Model "
            "to Ternary with teacher_data): a far better start, trained with its own recipe "
            "(see lr_lora).",
        ),
        io.Int.Input(
            "calibration_samples",
            default=DEFAULT_SAMPLES,
            min=1,
            max=100_000,
            optional=True,
            tooltip="Examples of the teacher data set the calibrated start uses.",
        ),
    ]


def _config(dataset: str, model: str, output: str, work: Path, **numbers):
    return DistillConfig(
        model=model, data=str(dataset_dir(dataset)), output=output, work_dir=str(work), **numbers
    )


def _loss_map(work: Path) -> dict:
    return {"loss": [entry["loss"] for entry in read_progress(work)[1]]}


class BuildTeacherDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TernaryFluxBuildTeacherDataset",
            display_name="Build Teacher Dataset",
            category="model/ternary/distill",
            description="Runs the bf16 FLUX model (the teacher) on calibration prompts and "
            "stores its conditioning, final latents and velocities, so distillation never "
            "needs the teacher in memory. Resumable: finished shards are kept.",
            inputs=[
                io.Model.Input("model", tooltip="The bf16 FLUX.1 model to distill from."),
                io.Clip.Input("clip", tooltip="FLUX text encoders (CLIP-L + T5-XXL)."),
                io.String.Input(
                    "dataset",
                    default="flux-teacher",
                    tooltip="Name (under output/ternary_distill/data) or absolute folder.",
                ),
                io.String.Input(
                    "prompts", multiline=True, default="", tooltip="One prompt per line."
                ),
                io.String.Input(
                    "prompt_file", default="", tooltip="A .txt / .csv / .json prompt file."
                ),
                io.Int.Input(
                    "generate",
                    default=256,
                    min=1,
                    max=100_000,
                    tooltip="Without prompts or a file: this many generated prompts.",
                ),
                io.Int.Input(
                    "width",
                    default=1024,
                    min=256,
                    max=4096,
                    step=16,
                    tooltip="Image width the teacher samples at (the student learns this size).",
                ),
                io.Int.Input(
                    "height",
                    default=1024,
                    min=256,
                    max=4096,
                    step=16,
                    tooltip="Image height the teacher samples at.",
                ),
                io.Int.Input(
                    "steps",
                    default=28,
                    min=1,
                    max=200,
                    tooltip="Sampling steps of the teacher's trajectory per prompt.",
                ),
                io.Float.Input(
                    "guidance",
                    default=3.5,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    tooltip="FLUX distilled guidance the teacher samples with.",
                ),
                io.Int.Input(
                    "points_per_prompt",
                    default=4,
                    min=1,
                    max=64,
                    tooltip="Training times t stored per prompt (each a teacher velocity).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=2**31 - 1,
                    control_after_generate=False,  # queueing again must resume the same data
                    tooltip="Seed of the noise, the training times and generated prompts. "
                    "Resuming needs the same seed.",
                ),
                io.Int.Input(
                    "shard_size",
                    default=16,
                    min=1,
                    max=4096,
                    tooltip="Prompts per data file; a stopped run redoes at most one shard.",
                ),
            ],
            outputs=[
                io.String.Output(display_name="dataset"),
                io.String.Output(display_name="report"),
            ],
        )

    @classmethod
    def execute(
        cls, model, clip, dataset, prompts, prompt_file, generate, width, height, steps,
        guidance, points_per_prompt, seed, shard_size,
    ) -> io.NodeOutput:  # fmt: skip
        check_flux(model)
        distillable(logical_shapes(model))  # FLUX.1 only, others refused by name
        prompt_list = calibration_prompts(prompts, prompt_file, generate, seed)
        settings = TeacherSettings(
            width=width, height=height, steps=steps, guidance=guidance,
            points_per_prompt=points_per_prompt, seed=seed, shard_size=shard_size,
            latent_channels=model.model.latent_format.latent_channels,
        )  # fmt: skip
        directory = dataset_dir(dataset)
        bar = comfy.utils.ProgressBar(len(prompt_list))
        lines: list[str] = []
        manifest = build_teacher_dataset(
            directory,
            prompt_list,
            comfy_encoder(clip),
            comfy_velocity_fn(model),
            settings,
            device=comfy.model_management.get_torch_device(),
            log=lines.append,
            on_prompt=lambda done, total: bar.update_absolute(done, total),
        )
        report = (
            f"{directory}: {manifest['done_prompts']}/{len(prompt_list)} prompts, "
            f"{manifest['bytes'] / 2**30:.2f} GiB"
        )
        return io.NodeOutput(str(directory), report)


class CancelWatch:
    """Progress bar and Cancel for an in-process run.

    ComfyUI's progress hook raises the interrupt inside ``update_absolute`` (and clears the
    flag), which would end the trainer mid-run, without a checkpoint. The interrupt is held
    here instead: ``requested`` turns true, the trainer saves a checkpoint and returns, and
    the node raises the interrupt afterwards so ComfyUI shows the run as cancelled.
    """

    def __init__(self, total: int) -> None:
        self.bar = comfy.utils.ProgressBar(total)
        self.total = total
        self.interrupt: comfy.model_management.InterruptProcessingException | None = None

    def on_step(self, step: int, _loss: float) -> None:
        try:
            self.bar.update_absolute(step, self.total)
        except comfy.model_management.InterruptProcessingException as err:
            self.interrupt = err

    def requested(self) -> bool:
        if self.interrupt is None and comfy.model_management.processing_interrupted():
            comfy.model_management.interrupt_current_processing(False)
            self.interrupt = comfy.model_management.InterruptProcessingException()
        return self.interrupt is not None


class DistillTernary(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TernaryFluxDistill",
            display_name="Distill Ternary",
            category="model/ternary/distill",
            description="Quantizes the FLUX model to ternary + LoRA and trains scales and "
            "LoRA to match the teacher data set, in this ComfyUI process (blocks the queue; "
            "use Distill Job for long runs). Cancel stops cleanly; queueing the same name "
            "again resumes.",
            inputs=[
                io.Model.Input("model", tooltip="The bf16 FLUX.1 model the teacher data is of."),
                io.String.Input("dataset", default="flux-teacher", tooltip="Teacher data set."),
                io.String.Input(
                    "name", default="flux-distilled", tooltip="Output file in models/ternary."
                ),
                *_number_inputs(),
                io.Boolean.Input(
                    "gradient_checkpointing",
                    default=True,
                    tooltip="Recompute block activations in the backward pass: far less "
                    "memory, somewhat slower steps.",
                ),
            ],
            outputs=[
                io.Model.Output(),
                LossMap.Output(display_name="loss_map"),
                io.String.Output(display_name="file"),
            ],
        )

    @classmethod
    def execute(cls, model, dataset, name, gradient_checkpointing, **numbers) -> io.NodeOutput:
        check_flux(model)
        distillable(logical_shapes(model))  # FLUX.1 only, others refused by name
        device = comfy.model_management.get_torch_device()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        work = job_dir(name)
        config = _config(
            dataset, "(MODEL input)", folders.output_path(name), work,
            gradient_checkpointing=gradient_checkpointing, **numbers,
        )  # fmt: skip
        data = TeacherDataset(config.data)
        check_run(config, data)  # before the student is built
        # ComfyUI's models leave the GPU before the teacher's weights are read (from where
        # that puts them, not held twice) and the student is built (a calibrated start keeps
        # every calibration example's hidden states on the device).
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        with torch.inference_mode(False), torch.enable_grad():
            state = dense_state_dict(model)
            student = student_from_tensors(
                {k: tuple(v.shape) for k, v in state.items()},
                state.__getitem__,
                config.lora_rank,
                config.scale_rule,
                dtype,
                device,
                gradient_checkpointing,
                config_calibration(config, data),
            )
            del state
            cancel = CancelWatch(config.steps)
            # distill() records a failure in the job's status itself (once it holds the lock)
            result = distill(
                student, data, config, on_step=cancel.on_step, should_stop=cancel.requested
            )
        del student
        if result.output is None:
            raise cancel.interrupt or comfy.model_management.InterruptProcessingException()
        return io.NodeOutput(
            load_ternary_patcher(result.output), _loss_map(work), str(result.output)
        )


class DistillJob(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TernaryFluxDistillJob",
            display_name="Distill Job",
            category="model/ternary/distill",
            description="Starts the distillation as a background torchrun process on one or "
            "more GPUs, so the queue stays free. Follow it with Job Status.",
            inputs=[
                io.Combo.Input(
                    "model_file",
                    options=folder_paths.get_filename_list("diffusion_models"),
                    tooltip="bf16 FLUX.1 diffusion model file (models/diffusion_models).",
                ),
                io.String.Input("dataset", default="flux-teacher", tooltip="Teacher data set."),
                io.String.Input("name", default="flux-distilled", tooltip="Job and file name."),
                io.Int.Input("gpus", default=1, min=1, max=64, tooltip="Processes (one per GPU)."),
                *_number_inputs(),
            ],
            outputs=[io.String.Output(display_name="job"), io.String.Output(display_name="report")],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model_file, dataset, name, gpus, **numbers) -> io.NodeOutput:
        work = job_dir(name)
        model = folder_paths.get_full_path_or_raise("diffusion_models", model_file)
        refuse_other_family_file(model)  # here, not in the background
        config = _config(dataset, model, folders.output_path(name), work, **numbers)
        check_run(config, TeacherDataset(config.data), gpus)  # here, not in the background
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.json").write_text(json.dumps(config.as_dict(), indent=1))
        command = launch_command(gpus, work / "config.json")
        python_path = [str(_package_link(work)), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in python_path if p)}
        with open(work / "job.log", "ab") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        report = f"started pid {process.pid}: {' '.join(command)}\nlog: {work / 'job.log'}"
        return io.NodeOutput(name, report)


def launch_command(gpus: int, config: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={gpus}", "-m", "comfyui_ternary_flux",
            "distill", str(config)]  # fmt: skip


def _package_link(work: Path) -> Path:
    """A folder where this pack imports as ``comfyui_ternary_flux`` (whatever its folder
    name under custom_nodes), for the job's python -m."""
    folder = work / "python"
    link = folder / "comfyui_ternary_flux"
    folder.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(PACK_ROOT, target_is_directory=True)
    return folder


def status_text(name: str, status: dict, steps: list[dict]) -> str:
    if not status:
        return f"job {name}: not started (no status in {job_dir(name)})"
    state = status["state"]  # read_progress reads a dead process's "running" as "died"
    if state == "died":
        state = "died (see job.log)"
    step, total = status.get("step", 0), status.get("total_steps", 0)
    lines = [f"job {name}: {state}, step {step}/{total}"]
    if steps:
        recent = steps[-20:]
        mean = sum(s["loss"] for s in recent) / len(recent)
        per_step = sum(s["seconds"] for s in recent) / len(recent)
        lines.append(f"loss {steps[-1]['loss']:.5f} (mean of last {len(recent)}: {mean:.5f})")
        if state == "running":
            lines.append(
                f"{per_step:.2f} s/step, about {(total - step) * per_step / 60:.0f} min left"
            )
    if status.get("output"):
        lines.append(f"output: {status['output']}")
    return "\n".join(lines)


class JobStatus(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TernaryFluxJobStatus",
            display_name="Job Status",
            category="model/ternary/distill",
            description="Progress and loss of a distillation job (re-reads it on every run).",
            inputs=[io.String.Input("job", default="flux-distilled", tooltip="Job name.")],
            outputs=[
                io.String.Output(display_name="status"),
                LossMap.Output(display_name="loss_map"),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, job) -> float:
        return time.time()  # progress changes while the inputs do not

    @classmethod
    def execute(cls, job) -> io.NodeOutput:
        status, steps = read_progress(job_dir(job))
        text = status_text(job, status, steps)
        return io.NodeOutput(text, {"loss": [s["loss"] for s in steps]}, ui=ui.PreviewText(text))


NODES = [BuildTeacherDataset, DistillTernary, DistillJob, JobStatus]
