"""Ternary file format v1: one safetensors file, keys in the model's own (BFL / ComfyUI) names.

Per quantized layer ``L`` (for example ``double_blocks.0.img_attn.qkv``)::

    L.weight        uint8, packed ternary T (layout named by the ``packing`` metadata)
    L.weight_scale  float32 [N], per-row scale s
    L.bias          16-bit [N] (when the layer has one)
    L.lora_down     [r, K] and L.lora_up [N, r], 16-bit (optional, both or neither)
    L.lora_alpha    float32 [] (with the LoRA; the branch is scaled by alpha / r)

Every other tensor of the model is stored as it was (16-bit). The header metadata holds
``format`` = ``ternary-flux``, ``format_version`` = ``1``, ``packing`` (``2bit`` or
``base3``, see packing.py), ``layers`` (JSON ``{name: [N, K]}``), ``lora_rank``,
``scale_rule`` and ``architecture`` (the model family, see models/registry.py).

This module owns the layer schema (:func:`layer_entries`, used by every writer, and
:func:`_check_layer`, used by the reader) and knows no model: which family a file holds is
decided above it, in models/. Reading is bounded by what the file really holds: every
tensor's bytes are checked against its shape and the file's length before anything is
allocated, and every malformed header gives a :class:`TernaryFormatError` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..kernels.layout import invalid_code_bytes
from .atomic import atomic_path, check_target
from .packing import BASE3_MAX_BYTE, PACKINGS, base3_to_2bit, packed_shape

FORMAT_NAME = "ternary-flux"
FORMAT_VERSION = 1
LAYER_SUFFIXES = ("weight", "weight_scale", "bias", "lora_down", "lora_up", "lora_alpha")
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MAX_DIM = 1 << 24  # no linear of any model is wider; bounds the work a header can ask for
FLOAT_NAMES = ("F16", "BF16", "F32")
LORA_DTYPE = torch.bfloat16  # LoRA factors written by this pack

_DTYPES = {
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE = {name: torch.empty((), dtype=d).element_size() for d, name in _DTYPES.items()}
# The writer also stores int64 (the teacher data's noise seeds); no reader here accepts it.
_WRITABLE = {**_DTYPES, torch.int64: "I64"}


class TernaryFormatError(ValueError):
    """A file that is not a valid ternary-flux v1 file; the message names the problem."""


@dataclass(frozen=True)
class FileLayout:
    """What a valid v1 header declares."""

    layers: dict[str, tuple[int, int]]  # quantized layer -> logical [N, K]
    packing: str
    lora_rank: int
    architecture: str | None  # the model family the writer named (None in older files)
    logical_shapes: dict[str, tuple[int, ...]]  # every tensor, ternary weights as [N, K]


@dataclass
class TernaryFile:
    """A loaded v1 file: a state dict ready for TernaryLinear (weights in the 2bit layout)."""

    state_dict: dict[str, torch.Tensor]
    layout: FileLayout
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> dict[str, tuple[int, int]]:
        return self.layout.layers

    @property
    def lora_rank(self) -> int:
        return self.layout.lora_rank

    @property
    def stored_packing(self) -> str:
        return self.layout.packing


def layer_entries(
    n: int, k: int, packing: str, lora_rank: int = 0, lora_dtype: torch.dtype = LORA_DTYPE
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The tensors a quantized [n, k] layer writes besides its bias: suffix -> (dtype, shape),
    in file order. Every writer (quantize, import, distillation export, Save node) declares
    its layers through this."""
    entries = {
        "weight": (torch.uint8, packed_shape(packing, n, k)),
        "weight_scale": (torch.float32, (n,)),
    }
    if lora_rank:
        entries["lora_down"] = (lora_dtype, (lora_rank, k))
        entries["lora_up"] = (lora_dtype, (n, lora_rank))
        entries["lora_alpha"] = (torch.float32, ())
    return entries


def build_metadata(
    layers: Mapping[str, tuple[int, int]],
    packing: str,
    lora_rank: int,
    scale_rule: str = "absmean",
    architecture: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The header metadata of a v1 file."""
    if packing not in PACKINGS:
        raise ValueError(f"unknown packing {packing!r}; expected one of {PACKINGS}")
    metadata = dict(extra or {})
    metadata.update(
        format=FORMAT_NAME,
        format_version=str(FORMAT_VERSION),
        packing=packing,
        layers=json.dumps({name: list(shape) for name, shape in layers.items()}),
        lora_rank=str(lora_rank),
        scale_rule=scale_rule,
    )
    if architecture is not None:
        metadata["architecture"] = architecture
    return metadata


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _header_bytes(
    entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]
) -> tuple[bytes, int]:
    """(the JSON header a writer writes for these tensors, padded to 8 bytes; the size of the
    tensor data after it)."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, (dtype, shape) in entries.items():
        if dtype not in _WRITABLE:
            raise TypeError(f"{key}: dtype {dtype} cannot be stored")
        size = _numel(shape) * dtype.itemsize
        header[key] = {
            "dtype": _WRITABLE[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8), offset


def file_size(
    entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]
) -> int:
    """The size in bytes of the file :class:`StreamingWriter` writes for these tensors."""
    header, data = _header_bytes(entries, metadata)
    return 8 + len(header) + data


class StreamingWriter:
    """Write a safetensors file tensor by tensor, atomically (ternary/atomic.py).

    ``entries`` declares every tensor (key -> (dtype, shape)) in file order; :meth:`write`
    must then be called once per key in that order. Use as a context manager: on success
    the temporary file is renamed over ``path``; on any error it is deleted.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str],
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        check_target(self.path, overwrite)
        self._overwrite = overwrite
        self._entries = dict(entries)
        self._order: Iterator[str] = iter(self._entries)
        self._header, _ = _header_bytes(entries, metadata)
        self._atomic = None
        self._file = None

    def __enter__(self) -> StreamingWriter:
        self._atomic = atomic_path(self.path, overwrite=self._overwrite)
        tmp = self._atomic.__enter__()
        try:
            self._file = open(tmp, "wb")
            self._file.write(struct.pack("<Q", len(self._header)) + self._header)
        except BaseException as err:
            if self._file is not None:
                self._file.close()
            self._atomic.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        expected = next(self._order, None)
        if key != expected:
            raise RuntimeError(f"tensor {key!r} written out of order (expected {expected!r})")
        dtype, shape = self._entries[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"{key}: got {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {tuple(shape)}"
            )
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        self._file.write(flat.view(torch.uint8).numpy())

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                missing = next(self._order, None)
                if missing is not None:
                    raise RuntimeError(f"file closed before tensor {missing!r} was written")
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
        except BaseException as err:
            with contextlib.suppress(OSError):
                self._file.close()
            self._atomic.__exit__(type(err), err, err.__traceback__)
            raise
        self._atomic.__exit__(exc_type, exc, tb)


def save_ternary_file(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    layers: Mapping[str, tuple[int, int]],
    packing: str = "2bit",
    lora_rank: int = 0,
    scale_rule: str = "absmean",
    architecture: str | None = None,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> None:
    """Write a whole in-memory state dict as a v1 file (atomically), validated first.

    ``tensors`` must hold the quantized layers' weights already packed as ``packing``.
    """
    meta = build_metadata(layers, packing, lora_rank, scale_rule, architecture, metadata)
    entries = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    validate(meta, {k: (_DTYPES[d], s) for k, (d, s) in entries.items()}, Path(path).name)
    for key, tensor in tensors.items():
        check_finite(key, tensor, Path(path).name)
    with StreamingWriter(path, entries, meta, overwrite=overwrite) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)


def _shape(value, key: str, name: str) -> tuple[int, ...]:
    """A tensor shape from a header: a list of positive integers (a scalar is [])."""
    if not isinstance(value, list) or len(value) > 8:
        raise TernaryFormatError(f"{name}: {key} has a malformed shape {str(value)[:40]}")
    for d in value:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 < d <= 1 << 40:
            raise TernaryFormatError(f"{name}: {key} has a malformed shape {str(value)[:40]}")
    return tuple(value)


def _parse_header(path: Path) -> tuple[dict, dict, dict[str, tuple[int, int]]]:
    """(metadata, {key: (dtype name, shape)}, {key: absolute (begin, end)}) of a safetensors
    file, checking every entry against the file's length."""
    if path.is_dir():  # ("no such file" for a folder that is there misled)
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a safetensors file", str(path))
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    name = path.name
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TernaryFormatError(f"{name}: truncated or not a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > MAX_HEADER_BYTES:
            raise TernaryFormatError(
                f"{name}: not a safetensors file, or truncated (header of {length} bytes, "
                f"file of {size})"
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)[:80]
            raise TernaryFormatError(f"{name}: corrupt safetensors header ({reason})") from None
    if not isinstance(header, dict):
        raise TernaryFormatError(f"{name}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TernaryFormatError(f"{name}: __metadata__ must be an object of strings")
    infos, offsets = {}, {}
    base = 8 + length
    for key, info in header.items():
        try:
            dtype = info["dtype"]
            begin, stop = info["data_offsets"]
            shape = info["shape"]
        except (TypeError, KeyError, ValueError):
            raise TernaryFormatError(f"{name}: corrupt header entry for {key!r}") from None
        if not isinstance(dtype, str) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in (begin, stop)
        ):
            raise TernaryFormatError(f"{name}: corrupt header entry for {key!r}")
        shape = _shape(shape, key, name)
        if not 0 <= begin <= stop or base + stop > size:
            raise TernaryFormatError(
                f"{name}: truncated file: {key} lies at bytes {begin}-{stop} past the header, "
                f"the file has {size - base}"
            )
        itemsize = _ITEMSIZE.get(dtype)
        if itemsize is None:
            raise TernaryFormatError(f"{name}: {key} has dtype {dtype}, which is not supported")
        if stop - begin != _numel(shape) * itemsize:
            raise TernaryFormatError(f"{name}: {key} has {stop - begin} bytes for its shape")
        infos[key] = (dtype, shape)
        offsets[key] = (base + begin, base + stop)
    spans = sorted(offsets.items(), key=lambda item: item[1])
    for (key_a, (_, end_a)), (key_b, (begin_b, _)) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise TernaryFormatError(f"{name}: tensors {key_a} and {key_b} overlap in the file")
    return metadata, infos, offsets


def read_header(
    path: str | os.PathLike,
) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """(metadata, {key: (dtype name, shape)}) of a safetensors file, checking its length."""
    metadata, infos, _ = _parse_header(Path(path))
    return metadata, infos


class MmapReader:
    """Read tensors of a safetensors file through mmap, one at a time, keeping RSS small.

    Each tensor is copied out of the mapping and its pages are released right away
    (``MADV_DONTNEED``), so streaming a 24 GB model holds about one tensor in memory.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.metadata, self.infos, self._offsets = _parse_header(self.path)
        self._file = open(self.path, "rb")
        try:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            self._file.close()
            raise

    def get(self, key: str) -> torch.Tensor:
        dtype_name, shape = self.infos[key]
        begin, end = self._offsets[key]
        data = bytearray(memoryview(self._map)[begin:end])
        page = mmap.PAGESIZE
        start = begin - begin % page
        if hasattr(mmap, "MADV_DONTNEED") and end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
        return torch.frombuffer(data, dtype=dtype_from_name(dtype_name)).reshape(shape)

    def close(self) -> None:
        self._map.close()
        self._file.close()

    def __enter__(self) -> MmapReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_hint(marker: str | None) -> str:
    """Why a file without our marker was refused, and what to do (for any marker)."""
    advice = (
        "quantize it first (Quantize Model to Ternary, or python -m comfyui_ternary_flux quantize)"
    )
    if marker is None or marker in ("pt", "np", "tf", "flax", "mlx"):
        return (
            f"no ternary-flux marker (format {marker!r}): an ordinary safetensors model? " + advice
        )
    return (
        f"format marker is {marker!r}, not {FORMAT_NAME!r}: made by another tool; if it is "
        f"an ordinary model, {advice}"
    )


def _layer_list(metadata: Mapping[str, str], name: str) -> dict[str, tuple[int, int]]:
    try:
        raw = json.loads(metadata["layers"])
    except (KeyError, ValueError, RecursionError):
        raise TernaryFormatError(f"{name}: corrupt layer list in the metadata") from None
    if not isinstance(raw, dict) or not raw:
        raise TernaryFormatError(f"{name}: the metadata's layer list must be a non-empty object")
    layers = {}
    for layer, shape in raw.items():
        ok = isinstance(shape, list) and len(shape) == 2
        ok = ok and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        if not ok or not all(0 < d <= MAX_DIM for d in shape):
            raise TernaryFormatError(
                f"{name}: layer {layer!r} has shape {str(shape)[:40]}, expected [N, K] with "
                f"integers 1..{MAX_DIM}"
            )
        layers[layer] = (shape[0], shape[1])
    return layers


def validate(
    metadata: Mapping[str, str],
    infos: Mapping[str, tuple[str, tuple[int, ...]]],
    name: str = "file",
) -> FileLayout:
    """Check a v1 header against its tensors; return what it declares."""
    fmt = metadata.get("format")
    if fmt != FORMAT_NAME:
        raise TernaryFormatError(f"{name}: not a ternary-flux file: {format_hint(fmt)}")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise TernaryFormatError(
            f"{name}: unknown ternary-flux version {metadata.get('format_version')!r}; "
            f"this version of the pack reads version {FORMAT_VERSION}"
        )
    packing = metadata.get("packing")
    if packing not in PACKINGS:
        raise TernaryFormatError(f"{name}: unknown packing {packing!r}")
    layers = _layer_list(metadata, name)
    rank_text = metadata.get("lora_rank", "0")
    if not rank_text.isdigit():
        raise TernaryFormatError(f"{name}: lora_rank {rank_text!r} is not a whole number")
    logical = {k: shape for k, (_, shape) in infos.items()}
    for layer, (n, k) in layers.items():
        _check_layer(name, layer, n, k, packing, infos)
        logical[f"{layer}.weight"] = (n, k)
    quantized = {f"{layer}.{suffix}" for layer in layers for suffix in LAYER_SUFFIXES}
    for key, (dtype, _) in infos.items():
        if key not in quantized and dtype not in FLOAT_NAMES:
            raise TernaryFormatError(
                f"{name}: tensor {key} has dtype {dtype}, expected a 16- or 32-bit float"
            )
    return FileLayout(layers, packing, int(rank_text), metadata.get("architecture"), logical)


def _check_layer(name, layer, n, k, packing, infos) -> None:
    """A layer's tensors against the schema of :func:`layer_entries` (reading accepts 16- or
    32-bit floats for bias and LoRA)."""

    def need(suffix, dtypes, shape):
        key = f"{layer}.{suffix}"
        if key not in infos:
            raise TernaryFormatError(f"{name}: layer {layer} has no tensor {key}")
        dtype, got = infos[key]
        if dtype not in dtypes or tuple(got) != tuple(shape):
            raise TernaryFormatError(
                f"{name}: {key} is {dtype} {list(got)}, expected {'/'.join(dtypes)} {list(shape)}"
            )

    has_down, has_up = f"{layer}.lora_down" in infos, f"{layer}.lora_up" in infos
    if has_down != has_up:
        raise TernaryFormatError(f"{name}: layer {layer} has only half of its LoRA")
    if has_down and len(infos[f"{layer}.lora_down"][1]) != 2:
        raise TernaryFormatError(f"{name}: {layer}.lora_down is not a matrix")
    rank = infos[f"{layer}.lora_down"][1][0] if has_down else 0
    for suffix, (dtype, shape) in layer_entries(n, k, packing, rank).items():
        allowed = FLOAT_NAMES if suffix in ("lora_down", "lora_up") else (_DTYPES[dtype],)
        need(suffix, allowed, shape)
    if f"{layer}.bias" in infos:
        need("bias", FLOAT_NAMES, (n,))


def check_finite(key: str, tensor: torch.Tensor, name: str) -> None:
    """Refuse NaN / infinite values: they would make every output of the model NaN."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise TernaryFormatError(f"{name}: {key} holds NaN or infinite values")


def _check_codes(key: str, tensor: torch.Tensor, packing: str, name: str) -> None:
    """Refuse packed bytes that no ternary matrix produces (corrupt data)."""
    if packing == "2bit":
        bad = invalid_code_bytes(tensor)
        if bad:
            raise TernaryFormatError(f"{name}: {key} has {bad} bytes with the invalid 2-bit code 3")
    elif bool((tensor > BASE3_MAX_BYTE).any()):
        raise TernaryFormatError(f"{name}: {key} has base3 bytes above {BASE3_MAX_BYTE}")


def read_ternary_file(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    on_tensor: Callable[[int, int], None] | None = None,
    check_layout: Callable[[FileLayout], object] | None = None,
    convert_device: torch.device | str | None = None,
) -> TernaryFile:
    """Read and validate a v1 file; weights come back in the 2bit compute layout.

    Every tensor's contents are checked as it is read (finite floats, valid packed codes),
    so a file this returns is one the model can run. Which model family it holds is for the
    caller (models/files.py) to check, with ``check_layout`` before any tensor is read.
    base3 weights are converted to 2bit on ``convert_device`` (default: ``device``).
    """
    path = Path(path)
    with MmapReader(path) as reader:
        layout = validate(reader.metadata, reader.infos, path.name)
        if check_layout is not None:
            check_layout(layout)
        weights = {f"{layer}.weight": k for layer, (_, k) in layout.layers.items()}
        state = {}
        for i, key in enumerate(reader.infos):
            tensor = reader.get(key)
            check_finite(key, tensor, path.name)
            if key in weights:
                _check_codes(key, tensor, layout.packing, path.name)
            if key in weights and layout.packing == "base3":
                tensor = base3_to_2bit(tensor.to(convert_device or device), weights[key])
            state[key] = tensor.to(device)
            if on_tensor is not None:
                on_tensor(i + 1, len(reader.infos))
    return TernaryFile(state, layout, dict(reader.metadata))


def dtype_from_name(name: str) -> torch.dtype:
    """torch dtype of a safetensors dtype name (for headers read with :func:`read_header`)."""
    if name not in _DTYPE_NAMES:
        raise TernaryFormatError(f"tensors of dtype {name} are not supported")
    return _DTYPE_NAMES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype."""
    return _DTYPES[dtype]
