"""Command line: ``python -m comfyui_ternary_flux <command> ...``.

Every refusal and every failure of the file system is one line ``error: ...`` on stderr that
names the file; Ctrl-C and SIGTERM end a command cleanly (a file being written is removed,
finally-blocks run; a calibrated quantization keeps its finished blocks beside the output and
resumes from them when run again). Exit codes (stable): 0 done; 2 refused input (bad file, bad
setting, an output that exists); 3 out of memory; 4 the file system failed or refused (disk
full, read-only folder, no permission, name too long, a folder where a file should be); 130
interrupted (Ctrl-C); 143 terminated (SIGTERM). Anything else is a bug and shows a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import threading
from pathlib import Path

import torch

from ..models.flux1_calibrate import INPUTS
from ..ternary.packing import PACKINGS
from ..ternary.quantize import SCALE_RULES
from .distill import add_distill_commands

TINY_SEED = 1234
EXIT_REFUSED, EXIT_MEMORY, EXIT_FILE_SYSTEM = 2, 3, 4
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM


class Terminated(BaseException):
    """Raised by the SIGTERM handler, so that finally-blocks and atomic writes clean up."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def _terminate_by_exception():
    """While a command runs, SIGTERM raises :class:`Terminated` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def os_error_text(err: OSError) -> str:
    """One line for a file system error: the file, then what went wrong."""
    if err.errno is None or err.filename is None:
        return str(err)
    what = err.strerror or str(err)
    if err.filename2 is not None:
        return f"{err.filename} -> {err.filename2}: {what}"
    return f"{err.filename}: {what}"


class ProgressPrinter:
    """A one-line progress bar on stderr (a line per 10 % when stderr is not a terminal)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.shown = -1

    def __call__(self, done: int, total: int, item: str = "") -> None:
        percent = 100 * done // max(total, 1)
        if self.tty:
            bar = "#" * (percent // 4)
            sys.stderr.write(
                f"\r{self.label} [{bar:<25}] {percent:3d}% {done}/{total} {item[:40]:<40}"
            )
            if done == total:
                sys.stderr.write("\n")
        elif percent // 10 != self.shown // 10 or done == total:
            sys.stderr.write(f"{self.label} {percent:3d}% ({done}/{total})\n")
        self.shown = percent
        sys.stderr.flush()


def _device(name: str) -> str:
    """``--device``, refused by name before anything is read (a typo such as ``gpu`` was a
    traceback from the first tensor moved there)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: not a device to quantize on; use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: PyTorch sees {torch.cuda.device_count()} CUDA GPU(s), "
                "numbered from cuda:0"
            )
    return name


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..models.family import random_source
    from ..models.files import quantize_tensors
    from ..models.registry import random_spec

    device = _device(args.device)
    if args.src is not None and args.random is not None:
        raise ValueError("give a SRC file or --random, not both")
    calibration = None
    if args.calibrate is not None:
        calibration = _calibration(args)
    elif args.calibration_samples is not None or args.calibration_inputs is not None:
        raise ValueError("--calibration-samples and --calibration-inputs need --calibrate DATA")
    elif args.restart:
        raise ValueError("--restart needs --calibrate DATA (only calibration resumes)")
    options = dict(
        lora_rank=args.lora_rank,
        scale_rule=args.scale_rule or "absmean",
        packing=args.packing,
        device=device,
        overwrite=args.force,
        progress=None if calibration else ProgressPrinter("quantizing"),  # (calibrating: per layer)
        calibration=calibration,
    )
    if args.src is None:
        spec = args.random or f"flux:tiny:{TINY_SEED}"
        family, preset, config, seed = random_spec(spec)
        if args.random is None:
            print(f"no SRC given: quantizing the embedded tiny FLUX model (seed {TINY_SEED})")
            out = Path(args.output or "tiny-flux-ternary.safetensors")
        else:
            print(f"random weights (seed {seed}) of {family.describe(config)}, made layer by layer")
            out = Path(args.output or f"{family.name}-{preset}-random-ternary.safetensors")
        shapes, get = random_source(family.shapes(config), seed, device=device)
        report = quantize_tensors(shapes, get, out, **options, source=f"random {spec}")
    else:
        src = Path(args.src)
        out = Path(args.output or src.with_name(f"{src.stem}-ternary.safetensors"))
        report = _quantize_resumable(src, out, options, args.restart)
    print(report.format())
    print(f"wrote {out}")
    return 0


def _quantize_resumable(src: Path, out: Path, options: dict, restart: bool):
    """quantize_file; a calibrated run that stops keeps its finished blocks, and says where."""
    from ..models.files import calibration_store, quantize_file
    from ..ternary.resume import is_store

    if options["calibration"] is None:
        report = quantize_file(src, out, **options)
        if is_store(store := calibration_store(out)):  # an interrupted calibrated run's
            print(
                f"note: {store} holds the finished blocks of an interrupted calibrated run to "
                f"{out.name}; quantize with the same --calibrate to resume it, or delete it",
                file=sys.stderr,
            )
        return report
    try:
        return quantize_file(
            src, out, **options, restart=restart, log=print,
            start_over="start over with --restart (or delete that folder)",
        )  # fmt: skip
    except REFUSED:  # nothing of this run was kept: no note (a refusal says what to do)
        raise
    except BaseException:  # interrupted or failed while running: the note, if blocks are kept
        store = calibration_store(out)
        if is_store(store) and not out.exists():
            print(
                f"the finished blocks are kept in {store}: run the same command again to "
                "resume (--restart starts over)",
                file=sys.stderr,
            )
        raise


def _calibration(args: argparse.Namespace):
    """The calibration of ``--calibrate DATA`` (checked before anything is read or written)."""
    from ..distill.calibration import teacher_calibration
    from ..models.family import ModelFamilyError
    from ..models.files import calibration_refusal, family_of_file
    from ..models.flux1 import FAMILY as FLUX1

    if args.src is None:
        raise ValueError(
            "--calibrate needs a SRC file (calibration reads the model's blocks in the model's "
            "order, which --random and the embedded tiny model cannot give)"
        )
    if args.scale_rule is not None:
        raise ValueError(
            "--scale-rule has no effect with --calibrate: calibration searches and refits "
            "every row's scale for its output"
        )
    source_family = family_of_file(args.src)  # refused first: it needs no data set
    if source_family is not FLUX1:
        raise ModelFamilyError(calibration_refusal(source_family.title))
    return teacher_calibration(
        args.calibrate,
        args.calibration_samples,  # None: 256, or the whole of a smaller data set
        inputs=args.calibration_inputs or "quantized",
        progress=ProgressPrinter("calibrating"),
    )


def cmd_import_reproduction(args: argparse.Namespace) -> int:
    from ..models.reproduction import import_reproduction

    result = import_reproduction(
        args.base,
        args.checkpoint,
        args.output,
        packing=args.packing,
        overwrite=args.force,
        progress=ProgressPrinter("importing"),
    )
    print(
        f"{len(result.layers)} ternary layers, LoRA rank {result.lora_rank} "
        "(fused qkv / linear1: block-diagonal, rank 3r / 4r); "
        "layers outside the blocks written dense (float32 s*T + up@down)"
    )
    print(f"wrote {args.output} ({Path(args.output).stat().st_size:,} bytes)")
    return 0


def model_parameters(model) -> tuple[int, int]:
    """(parameters of the model, of them in ternary layers) of a loaded ternary file; the
    layers' scales and LoRA factors are the format's, not the model's."""
    extra = {"weight_scale", "lora_down", "lora_up", "lora_alpha"}
    total = ternary = 0
    for key, shape in model.layout.logical_shapes.items():
        module, _, suffix = key.rpartition(".")
        if module in model.layers and suffix in extra:
            continue
        numel = math.prod(shape)
        total += numel
        ternary += numel if module in model.layers and suffix == "weight" else 0
    return total, ternary


def cmd_info(args: argparse.Namespace) -> int:
    """Validate a ternary file as the loader does (header, contents and family)."""
    from ..models.files import load_ternary_model

    model = load_ternary_model(args.file)
    meta = model.metadata
    print(f"format     ternary-flux v{meta['format_version']}, packing {model.stored_packing}")
    print(f"model      {model.family.describe(model.config)} [{model.family.name}]")
    print(
        f"layers     {len(model.layers)} ternary, LoRA rank {model.lora_rank}, scale rule "
        f"{meta.get('scale_rule', '?')}"
    )
    total, ternary = model_parameters(model)
    print(f"ternary    {ternary:,} of {total:,} parameters ({100 * ternary / total:.2f} %)")
    print(f"size       {Path(args.file).stat().st_size:,} bytes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m comfyui_ternary_flux",
        description="1.58-bit (ternary) FLUX.1, FLUX.2 and Chroma: quantize, inspect, import, "
        "distill (FLUX.1).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser(
        "quantize", help="quantize a FLUX.1 / FLUX.2 / Chroma safetensors file to ternary"
    )
    q.add_argument(
        "src",
        nargs="?",
        help="diffusion model (.safetensors) of FLUX.1, FLUX.2 or Chroma; omitted: the "
        "embedded tiny FLUX.1 model",
    )
    q.add_argument(
        "--random",
        metavar="FAMILY:PRESET[:SEED]",
        help="quantize seeded random weights instead of a file, made layer by layer (no dense "
        "file is written): flux:dev, flux:schnell, flux2:dev, flux2:klein-4b, flux2:klein-9b, "
        "chroma:full, or a tiny preset (flux:tiny, flux2:tiny, chroma:tiny)",
    )
    q.add_argument("-o", "--output", help="output file (default: SRC-ternary.safetensors)")
    q.add_argument(
        "--lora-rank", type=int, default=0, help="add a LoRA branch fitted to the residual"
    )
    q.add_argument(
        "--scale-rule", choices=SCALE_RULES, default=None, help="per-row scale rule (absmean)"
    )
    q.add_argument(
        "--calibrate",
        metavar="DATA",
        help="FLUX.1: choose codes, scales and LoRA for each layer's output on a teacher data "
        "set's latents and conditioning (a folder made by Build Teacher Dataset or the "
        "teacher command)",
    )
    q.add_argument(
        "--calibration-samples",
        type=int,
        metavar="N",
        help="examples of the data set to calibrate on (default: 256, or all of a smaller one)",
    )
    q.add_argument(
        "--calibration-inputs",
        choices=INPUTS,
        help="quantized (default): each block sees what the quantized blocks before it give; "
        "dense: the bf16 model's own activations",
    )
    q.add_argument(
        "--packing",
        choices=PACKINGS,
        default="base3",
        help="storage layout: base3 (1.6 bits, smallest) or 2bit (no conversion at load)",
    )
    q.add_argument("--device", default="cpu", help="where to quantize: cpu or cuda")
    q.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    q.add_argument(
        "--restart",
        action="store_true",
        help="with --calibrate: discard the blocks an interrupted run kept beside the output "
        "(OUTPUT.calibration-partial) and start over; without it the same command resumes",
    )
    q.set_defaults(func=cmd_quantize)

    r = sub.add_parser(
        "import-reproduction",
        help="convert a 1.58bit-flux reproduction checkpoint (.pt) over its bf16 FLUX.1-dev base",
    )
    r.add_argument("base", help="the bf16 FLUX.1-dev diffusion model (.safetensors, BFL names)")
    r.add_argument("checkpoint", help="ternary_distilled_r*_*.pt of the reproduction")
    r.add_argument("-o", "--output", required=True, help="output ternary file (.safetensors)")
    r.add_argument("--packing", choices=PACKINGS, default="base3", help="storage layout")
    r.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    r.set_defaults(func=cmd_import_reproduction)

    add_distill_commands(sub)

    i = sub.add_parser("info", help="validate a ternary file and print what it holds")
    i.add_argument("file")
    i.set_defaults(func=cmd_info)
    return parser


# What main() answers with EXIT_REFUSED: the input was refused, nothing was done.
REFUSED = (FileExistsError, FileNotFoundError, ValueError, TypeError)


def _error(text: str) -> None:
    print("error: " + " ".join(str(text).split()), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _terminate_by_exception():
            return args.func(args)
    except KeyboardInterrupt:
        _error("interrupted (Ctrl-C); no partial output was left")
        return EXIT_INTERRUPTED
    except Terminated:
        _error("terminated (SIGTERM); no partial output was left")
        return EXIT_TERMINATED
    except (FileExistsError, FileNotFoundError) as err:
        _error(os_error_text(err))
        return EXIT_REFUSED
    except (MemoryError, torch.cuda.OutOfMemoryError):
        _error("out of memory; try --device cpu or close other programs")
        return EXIT_MEMORY
    except OSError as err:
        _error(os_error_text(err))
        return EXIT_FILE_SYSTEM
    except (ValueError, TypeError) as err:
        _error(str(err))
        return EXIT_REFUSED
