"""Calibrated quantization of FLUX.1: the bf16 model's own activations choose each block
linear's ternary codes, scales and LoRA (ternary/calibrate.py), block by block.

The pure-torch FLUX.1 (models/flux1_torch.py) runs on calibration examples (latent z_t, time
t, text conditioning: what a teacher data set stores; no images). Blocks are processed in
the model's order, one at a time: the block is built dense from the source weights, the
inputs of its linears are captured by hooks into Hessians ``X^T X`` (float64, one per
linear, freed once the linear is quantized), each linear goes through the one per-layer
quantizer (``quantize_layer(..., hessian=H)``), and the block's outputs become the next
block's inputs. ``inputs="quantized"`` (GPTQ's order) feeds each block what the already
quantized blocks before it give, and inside a block quantizes its linears in the order of
the computation (modulation and qkv, then proj, then the MLP's two layers), capturing each
group's inputs with the groups before it already quantized; ``inputs="dense"`` captures
every linear from the dense model in one pass per block.

Memory: the hidden states of all examples (examples x tokens x hidden in the compute dtype;
256 FLUX.1-dev examples at 1024x1024 and 256 text tokens are 6.8 GB in bf16), one dense
block, and the Hessians of one group of linears (at most 2 x 12288^2 or 15360^2 float64:
2.4 GB).

Resume: with a store (ternary/resume.py), every finished block's calibrated tensors and errors
are kept there as one piece. A calibrator given a store that holds the first blocks of an
interrupted run with the same settings loads their layers instead of calibrating them, and
runs the examples through them (their quantized layers for ``quantized`` inputs, dense for
``dense``) to rebuild the hidden states at the first unfinished block: exactly the inputs an
uninterrupted run gives it, so the result is the same, bit for bit.

Knows nothing of teacher data sets: the caller hands the examples (distill/calibration.py
reads them from one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ternary.calibrate import CalibrationError, CalibrationOptions, HessianAccumulator
from ..ternary.fileformat import LORA_DTYPE, layer_entries
from ..ternary.integrity import DamagedFileError, tensor_digest
from ..ternary.packing import unpack
from ..ternary.quantize import LayerError, quantize_layer
from ..ternary.resume import ResumeError, ResumeStore
from .flux1 import FluxConfig, detect_config
from .flux1_torch import (
    DoubleStreamBlock,
    FluxTransformer,
    SingleStreamBlock,
    dense_linears,
    rope_for,
)

INPUTS = ("quantized", "dense")
METHOD = "gptq-ternary+weighted-lora"
# The linears of a block in the order the computation reaches them ("quantized" inputs).
DOUBLE_GROUPS = (
    ("img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv"),
    ("img_attn.proj", "txt_attn.proj"),
    ("img_mlp.0", "txt_mlp.0"),
    ("img_mlp.2", "txt_mlp.2"),
)
SINGLE_GROUPS = (("modulation.lin", "linear1"), ("linear2",))

# An example: z_t [C, h, w], t [], context [L, D], pooled [P], guidance [] (float tensors).
Example = Mapping[str, torch.Tensor]
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Calibration:
    """What to calibrate on and how.

    ``examples``: a sequence of :data:`Example` (read once, in order). ``source``: what the
    file header records about them (for instance the teacher data set and its fingerprint).
    ``dtype``: of the activations, ``auto`` = bfloat16 on CUDA, float32 on the CPU.
    ``progress(done, total, layer)`` is called after each quantized layer.
    """

    examples: Sequence[Example]
    inputs: str = "quantized"
    options: CalibrationOptions = field(default_factory=CalibrationOptions)
    batch_size: int = 4
    dtype: str = "auto"
    source: Mapping[str, object] = field(default_factory=dict)
    progress: Progress | None = None

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise CalibrationError(f"inputs must be one of {INPUTS}, got {self.inputs!r}")
        if self.batch_size < 1:
            raise CalibrationError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32", "float64"):
            raise CalibrationError(f"unknown activation dtype {self.dtype!r}")
        if len(self.examples) < 1:
            raise CalibrationError("calibration needs at least one example")

    def metadata(self) -> str:
        """The ``calibration`` header entry (JSON)."""
        return json.dumps(
            {
                "method": METHOD,
                "samples": len(self.examples),
                "inputs": self.inputs,
                **self.options.as_dict(),
                **self.source,
            },
            sort_keys=True,
        )


class _Captured(Exception):
    """Raised by the last hook of a pass: the rest of the block need not run."""


def _compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class FluxCalibrator:
    """Calibrated ternary layers of one FLUX.1 model, made block by block on demand.

    ``shapes`` / ``get`` give the dense source under BFL names (``get`` may be asked for any
    key, in any order, more than once). :meth:`layer` returns a block linear's tensors and
    error, processing every block up to the one that holds it; results of blocks processed
    ahead of their turn wait on the CPU until they are asked for. The examples are checked
    against the model and embedded in the constructor: a data set of another model is
    refused before anything is quantized or written. With a ``store`` each finished block
    is kept in it, and the blocks it already holds (same settings) are loaded, not redone.
    """

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        get: Callable[[str], torch.Tensor],
        calibration: Calibration,
        *,
        lora_rank: int = 0,
        scale_rule: str = "absmean",
        packing: str = "2bit",
        lora_dtype: torch.dtype = LORA_DTYPE,
        device: torch.device | str = "cpu",
        store: ResumeStore | None = None,
    ) -> None:
        self.config: FluxConfig = detect_config(shapes)
        self.shapes, self._source = shapes, get
        self.calibration = calibration
        self.lora_rank, self.scale_rule, self.packing = lora_rank, scale_rule, packing
        self.lora_dtype = lora_dtype
        self.device = torch.device(device)
        self.dtype = _compute_dtype(calibration.dtype, self.device)
        self.sequential = calibration.inputs == "quantized"
        self._order = [("double", i) for i in range(self.config.depth)] + [
            ("single", i) for i in range(self.config.depth_single_blocks)
        ]
        groups = len(sum(DOUBLE_GROUPS, ())) * self.config.depth
        self.total_layers = groups + len(sum(SINGLE_GROUPS, ())) * self.config.depth_single_blocks
        self._next = 0
        self._results: dict[str, tuple[dict[str, torch.Tensor], LayerError]] = {}
        self.errors: list[LayerError] = []
        self.seconds = 0.0
        self.store, self.resumed = store, 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        self._embed()
        self.seconds += time.perf_counter() - started
        if store is not None:  # other settings (or examples) are refused before any block
            self.resumed = store.begin(self.settings(), [self._prefix(i) for i in self._order])
            if self.resumed:
                store.log(
                    f"resuming: {self.resumed} of {len(self._order)} blocks done (kept in "
                    f"{store.path})"
                )

    def settings(self) -> dict[str, object]:
        """Everything the calibrated layers depend on besides the source weights (what a
        resumed run must match): the examples by the digest of their tensors, since a caller
        may name no data set (``Calibration.source`` empty)."""
        return {
            **json.loads(self.calibration.metadata()),
            "examples_sha256": self.examples_digest,
            "batch_size": self.calibration.batch_size,
            "activations": str(self.dtype).removeprefix("torch."),
            "device": self.device.type,
            # another card may round differently
            **(
                {"device_name": torch.cuda.get_device_name(self.device)}
                if self.device.type == "cuda"
                else {}
            ),
            "lora_rank": self.lora_rank,
            "lora_dtype": str(self.lora_dtype).removeprefix("torch."),
            "scale_rule": self.scale_rule,
            "packing": self.packing,
        }

    @staticmethod
    def _prefix(block: tuple[str, int]) -> str:
        return f"{block[0]}_blocks.{block[1]}"

    # ----------------------------------------------------------------- source and examples

    def _get(self, key: str) -> torch.Tensor:
        """A source tensor by BFL key (RMSNorm ``*.scale`` also under ComfyUI's ``*.weight``)."""
        if key not in self.shapes and key.endswith(".scale"):
            key = key[: -len("scale")] + "weight"
        return self._source(key)

    def _load(self, module: nn.Module, prefix: str) -> str:
        """Load the source weights under ``prefix`` into ``module``; with a store, returns their
        digest (what a kept block was calibrated from: a swapped source file is found block by
        block); without one, nothing is hashed (a copy to the host and 24 GB of sha256 for
        FLUX.1-dev) and the digest is empty."""
        state = {name: self._get(prefix + name) for name in module.state_dict()}
        module.load_state_dict(state, strict=True)
        return tensor_digest(state) if self.store is not None else ""

    def _check_example(self, index: int, example: Example) -> tuple[int, int, int]:
        """(text tokens, latent height, latent width) of a valid example, or a named refusal."""
        config = self.config
        where = f"calibration example {index}"
        missing = [k for k in ("z_t", "t", "context", "pooled") if k not in example]
        if missing:
            raise CalibrationError(f"{where} has no {', '.join(missing)}")
        z, context, pooled = example["z_t"], example["context"], example["pooled"]
        channels = config.in_channels // 4
        if z.dim() != 3 or z.shape[0] != channels or z.shape[1] % 2 or z.shape[2] % 2:
            raise CalibrationError(
                f"{where}: latent of shape {list(z.shape)}; this model takes [{channels}, h, w] "
                "with h and w even (was the data set made for another model?)"
            )
        if context.dim() != 2 or context.shape[1] != config.context_in_dim:
            raise CalibrationError(
                f"{where}: text conditioning of shape {list(context.shape)}; this model takes "
                f"[tokens, {config.context_in_dim}] (was the data set made for another model?)"
            )
        if tuple(pooled.shape) != (config.vec_in_dim,):
            raise CalibrationError(
                f"{where}: pooled vector of shape {list(pooled.shape)}; this model takes "
                f"[{config.vec_in_dim}]"
            )
        if example["t"].numel() != 1:
            raise CalibrationError(f"{where}: t must be one number, got {list(example['t'].shape)}")
        return context.shape[0], z.shape[1], z.shape[2]

    def _embed(self) -> None:
        """Check every example, group them into batches of one shape, and embed them (and,
        with a store, digest them: ``examples_digest``)."""
        examples = self.calibration.examples
        config = dataclasses.replace(self.config, depth=0, depth_single_blocks=0)
        with torch.device("meta"):
            shell = FluxTransformer(config, dtype=self.dtype)
        shell.to_empty(device=self.device)
        self._load(shell, "")
        self.img: list[torch.Tensor] = []
        self.txt: list[torch.Tensor] = []
        vectors = []
        self.layout: list[tuple[int, int, int]] = []
        by_shape: dict[tuple[int, int, int], list[int]] = {}
        digest = hashlib.sha256()
        with torch.no_grad():
            for index in range(len(examples)):
                example = examples[index]
                layout = self._check_example(index, example)
                if self.store is not None:  # only a resume compares the examples
                    digest.update(tensor_digest(example).encode())
                by_shape.setdefault(layout, []).append(index)
                guidance = example.get("guidance")
                img, txt, vec, _ = shell.embed(
                    example["z_t"][None].to(self.device),
                    example["t"].reshape(1).to(self.device),
                    example["context"][None].to(self.device),
                    example["pooled"][None].to(self.device),
                    None if guidance is None else guidance.reshape(1).to(self.device),
                )
                self.img.append(img[0])
                self.txt.append(txt[0])
                vectors.append(vec[0])
                self.layout.append(layout)
        del shell
        self.examples_digest = digest.hexdigest()
        self.vec = torch.stack(vectors)
        size = self.calibration.batch_size
        self.batches = [
            members[i : i + size]
            for members in by_shape.values()
            for i in range(0, len(members), size)
        ]
        self.joint: list[torch.Tensor] = []

    # ----------------------------------------------------------------- blocks

    def _block(self, kind: str, index: int) -> tuple[nn.Module, str]:
        """The dense block and the digest of its source weights."""
        prefix = f"{kind}_blocks.{index}"
        cls = DoubleStreamBlock if kind == "double" else SingleStreamBlock
        make = dense_linears(self.dtype)
        with torch.device("meta"):
            block = cls(prefix, self.config, make, self.dtype, None)
        block.to_empty(device=self.device)
        digest = self._load(block, prefix + ".")
        return block.eval(), digest

    def _run(self, block: nn.Module, kind: str, batch: list[int]):
        txt_len, height, width = self.layout[batch[0]]
        rope = rope_for(len(batch), txt_len, height, width, self.dtype, self.device)
        vec = self.vec[batch]
        if kind == "double":
            img = torch.stack([self.img[i] for i in batch])
            txt = torch.stack([self.txt[i] for i in batch])
            return block(img, txt, vec, rope)
        return block(torch.stack([self.joint[i] for i in batch]), vec, rope)

    def _capture(
        self, block: nn.Module, kind: str, names: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Hessians of these linears' inputs over every example (the block run up to the last
        of them)."""
        linears = {name: block.get_submodule(name) for name in names}
        accumulators = {
            name: HessianAccumulator(linear.in_features, self.device)
            for name, linear in linears.items()
        }
        seen: set[str] = set()

        def hook_of(name: str):
            def hook(_module, args) -> None:
                accumulators[name].add(args[0])
                seen.add(name)
                if len(seen) == len(names):
                    raise _Captured

            return hook

        handles = [linear.register_forward_pre_hook(hook_of(n)) for n, linear in linears.items()]
        try:
            with torch.no_grad():
                for batch in self.batches:
                    seen.clear()
                    try:
                        self._run(block, kind, batch)
                    except _Captured:
                        pass
        finally:
            for handle in handles:
                handle.remove()
        return {name: acc.hessian for name, acc in accumulators.items()}

    def _quantize(self, block: nn.Module, prefix: str, name: str, hessian: torch.Tensor) -> None:
        module = f"{prefix}.{name}"
        weight = self._get(f"{module}.weight").to(self.device)
        try:
            parts, error = quantize_layer(
                weight, self.lora_rank, self.scale_rule, self.packing, self.lora_dtype,
                hessian=hessian, options=self.calibration.options,
            )  # fmt: skip
        except ValueError as err:
            raise ValueError(f"{module}: {err}") from None
        error.name = module
        if self.sequential:  # what the next group (and block) see: the quantized layer
            self._use_quantized(block.get_submodule(name), parts)
        self._results[module] = ({k: v.cpu() for k, v in parts.items()}, error)
        self.errors.append(error)
        if self.calibration.progress is not None:
            self.calibration.progress(len(self.errors), self.total_layers, module)

    def _use_quantized(self, linear: nn.Module, parts: Mapping[str, torch.Tensor]) -> None:
        """Make a dense block linear compute what its ternary layer (``parts``) computes."""
        parts = {key: value.to(self.device) for key, value in parts.items()}
        k = linear.in_features
        approx = unpack(parts["weight"], self.packing, k).float() * parts["weight_scale"][:, None]
        if self.lora_rank:
            approx += parts["lora_up"].float() @ parts["lora_down"].float()
        linear.weight.data.copy_(approx)

    def _keep(self, prefix: str, names: Sequence[str], source: str) -> None:
        """The block's finished layers into the store, as one piece, with the digest of the
        source weights they were calibrated from."""
        tensors, errors = {}, []
        for name in names:
            parts, error = self._results[f"{prefix}.{name}"]
            tensors.update({f"{prefix}.{name}.{suffix}": t for suffix, t in parts.items()})
            errors.append(dataclasses.asdict(error))
        metadata = {"block": prefix, "errors": json.dumps(errors), "source_sha256": source}
        self.store.put(prefix, tensors, metadata)

    def _restore(
        self, block: nn.Module | None, prefix: str, names: Sequence[str], source: str
    ) -> None:
        """The block's layers and errors from the store (each checked against the layer
        schema, and refused when calibrated from other source weights than ``source``, their
        digest); with quantized inputs ``block`` (when given) then computes with them."""
        tensors, metadata = self.store.get(prefix)
        if metadata.get("source_sha256") != source:
            raise ResumeError(
                f"{self.store.path}: {prefix} was calibrated from other source weights than "
                f"this file's (a swapped source file?); {self.store.start_over}"
            )
        try:
            errors = json.loads(metadata["errors"])
            expected = set()
            for name, saved in zip(names, errors, strict=True):
                module = f"{prefix}.{name}"
                n, k = self.shapes[f"{module}.weight"]
                schema = layer_entries(n, k, self.packing, self.lora_rank, self.lora_dtype)
                parts = {suffix: tensors[f"{module}.{suffix}"] for suffix in schema}
                for suffix, (dtype, shape) in schema.items():
                    if parts[suffix].dtype != dtype or tuple(parts[suffix].shape) != shape:
                        raise ValueError(f"{module}.{suffix} is not {dtype} {list(shape)}")
                error = LayerError(**{**saved, "shape": tuple(saved["shape"])})
                if error.name != module:
                    raise ValueError(f"the errors of {error.name} where {module}'s belong")
                expected.update(f"{module}.{suffix}" for suffix in schema)
                self._results[module] = (parts, error)
                self.errors.append(error)
                if block is not None and self.sequential:
                    self._use_quantized(block.get_submodule(name), parts)
            if set(tensors) != expected:
                raise ValueError(f"{sorted(set(tensors) - expected)[0]} is not a layer of it")
        except (KeyError, TypeError, ValueError) as err:
            raise DamagedFileError(
                f"{self.store.path}: the piece of {prefix} does not hold its layers "
                f"({str(err)[:120]}); {self.store.start_over}"
            ) from None

    def _join_streams(self) -> None:
        """The double blocks are done: one stream of text then image tokens per example.
        Joined one example at a time, dropping its two streams as it goes, so the device never
        holds both copies of the hidden states: on FLUX.1-dev (256 examples, 1024x1024) the
        whole-list join held 6.4 GiB twice, and was the calibration's peak (15.73 GiB
        allocated, NVIDIA H200; the device's use jumped by 8.3 GB at that point)."""
        img, txt, self.img, self.txt = self.img, self.txt, [], []
        self.joint = [torch.cat((txt.pop(0), img.pop(0))) for _ in range(len(img))]

    def _process(self, kind: str, index: int) -> None:
        prefix = f"{kind}_blocks.{index}"
        if kind == "single" and not self.joint:
            self._join_streams()
        groups = DOUBLE_GROUPS if kind == "double" else SINGLE_GROUPS
        last = self._next == len(self._order) - 1
        block, source = self._block(kind, index)
        if self._next < self.resumed:  # finished by an interrupted run: loaded
            if self.resumed == len(self._order):  # no block after it needs its outputs
                self._restore(None, prefix, sum(groups, ()), source)
                self.img, self.txt, self.joint = [], [], []
                return
            self._restore(block, prefix, sum(groups, ()), source)
        else:
            if not self.sequential:
                groups = (sum(groups, ()),)
            for names in groups:
                hessians = self._capture(block, kind, names)
                for name in names:
                    self._quantize(block, prefix, name, hessians.pop(name))
            if self.store is not None:
                self._keep(prefix, sum(groups, ()), source)
        if not last:  # the next block's inputs
            with torch.no_grad():
                for batch in self.batches:
                    out = self._run(block, kind, batch)
                    for j, i in enumerate(batch):
                        if kind == "double":
                            self.img[i], self.txt[i] = out[0][j], out[1][j]
                        else:
                            self.joint[i] = out[j]
        else:
            self.img, self.txt, self.joint = [], [], []
            self.vec = self.vec[:0]

    def layer(self, module: str) -> tuple[dict[str, torch.Tensor], LayerError]:
        """The calibrated tensors (layer schema of ternary/fileformat.py) and error of one
        block linear; each is handed out once."""
        started = time.perf_counter()
        while module not in self._results:
            if self._next >= len(self._order):
                raise KeyError(f"{module} is not a block linear of this model, or was handed out")
            self._process(*self._order[self._next])
            self._next += 1
        self.seconds += time.perf_counter() - started
        return self._results.pop(module)

    def peak_memory(self) -> tuple[int, int] | None:
        """(allocated, reserved) peak device memory since the calibrator started (CUDA only)."""
        if self.device.type != "cuda":
            return None
        return (
            torch.cuda.max_memory_allocated(self.device),
            torch.cuda.max_memory_reserved(self.device),
        )
