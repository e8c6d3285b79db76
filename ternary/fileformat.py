"""Ternary FLUX file format v1: one safetensors file, keys in BFL / ComfyUI names.

Per quantized layer ``L`` (for example ``double_blocks.0.img_attn.qkv``)::

    L.weight        uint8, packed ternary T (layout named by the ``packing`` metadata)
    L.weight_scale  float32 [N], per-row scale s
    L.bias          16-bit [N] (when the layer has one)
    L.lora_down     [r, K] and L.lora_up [N, r], 16-bit (optional, both or neither)
    L.lora_alpha    float32 [] (with the LoRA; the branch is scaled by alpha / r)

Every other tensor of the model is stored as it was (16-bit). The header metadata holds
``format`` = ``ternary-flux``, ``format_version`` = ``1``, ``packing`` (``2bit`` or
``base3``, see packing.py), ``layers`` (JSON ``{name: [N, K]}``), ``lora_rank`` and
``scale_rule``. Files are written through :class:`StreamingWriter`: the header is laid out
from the tensors' shapes first, tensors are written one at a time, and the file appears
under its name only once complete, so a crash never leaves a partial file.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .flux import FluxConfig, NotFluxError, detect_config
from .packing import PACKINGS, base3_to_2bit, packed_shape

FORMAT_NAME = "ternary-flux"
FORMAT_VERSION = 1
LAYER_SUFFIXES = ("weight", "weight_scale", "bias", "lora_down", "lora_up", "lora_alpha")

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


class TernaryFormatError(ValueError):
    """A file that is not a valid ternary-flux v1 file; the message names the problem."""


@dataclass
class TernaryCheckpoint:
    """A loaded v1 file: state dict ready for TernaryLinear (weights in the 2bit layout)."""

    state_dict: dict[str, torch.Tensor]
    layers: dict[str, tuple[int, int]]
    config: FluxConfig
    lora_rank: int
    stored_packing: str
    metadata: dict[str, str] = field(default_factory=dict)


def build_metadata(
    layers: Mapping[str, tuple[int, int]],
    packing: str,
    lora_rank: int,
    scale_rule: str = "absmean",
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
    return metadata


class StreamingWriter:
    """Write a safetensors file tensor by tensor, atomically.

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
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists; choose another name or allow overwriting")
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        offset = 0
        for key, (dtype, shape) in entries.items():
            if dtype not in _DTYPES:
                raise TypeError(f"{key}: dtype {dtype} cannot be stored")
            size = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[key] = {
                "dtype": _DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        self._overwrite = overwrite
        self._entries = dict(entries)
        self._order: Iterator[str] = iter(self._entries)
        raw = json.dumps(header, separators=(",", ":")).encode()
        self._header = raw + b" " * (-len(raw) % 8)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        self._file = None

    def __enter__(self) -> StreamingWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp, "wb")
        try:
            self._file.write(struct.pack("<Q", len(self._header)) + self._header)
        except BaseException:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
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
            if exc_type is None:
                if self.path.exists() and not self._overwrite:
                    raise FileExistsError(f"{self.path} appeared while writing; not replaced")
                os.replace(self._tmp, self.path)
        finally:
            if self._tmp.exists():
                self._tmp.unlink()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def save_ternary_file(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    layers: Mapping[str, tuple[int, int]],
    packing: str = "2bit",
    lora_rank: int = 0,
    scale_rule: str = "absmean",
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> None:
    """Write a whole in-memory state dict as a v1 file (atomically).

    ``tensors`` must hold the quantized layers' weights already packed as ``packing``.
    """
    meta = build_metadata(layers, packing, lora_rank, scale_rule, metadata)
    entries = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    validate(meta, {k: (_DTYPES[d], s) for k, (d, s) in entries.items()})
    with StreamingWriter(path, entries, meta, overwrite=overwrite) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)


def read_header(
    path: str | os.PathLike,
) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """(metadata, {key: (dtype name, shape)}) of a safetensors file, checking its length."""
    metadata, infos, _ = _parse_header(Path(path))
    return metadata, infos


def _parse_header(path: Path) -> tuple[dict, dict, dict[str, tuple[int, int]]]:
    """read_header's work, plus each tensor's absolute (begin, end) byte offsets."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TernaryFormatError(
                f"{path.name}: truncated or not a safetensors file ({size} bytes)"
            )
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise TernaryFormatError(
                f"{path.name}: not a safetensors file, or truncated (header of {length} bytes, "
                f"file of {size})"
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TernaryFormatError(f"{path.name}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise TernaryFormatError(f"{path.name}: corrupt safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    infos, offsets = {}, {}
    end = 0
    for key, info in header.items():
        try:
            infos[key] = (info["dtype"], tuple(info["shape"]))
            begin, stop = info["data_offsets"]
            offsets[key] = (8 + length + begin, 8 + length + stop)
            end = max(end, stop)
        except (TypeError, KeyError, IndexError, ValueError):
            raise TernaryFormatError(f"{path.name}: corrupt header entry for {key!r}") from None
        itemsize = _ITEMSIZE.get(info["dtype"])
        if itemsize is not None and stop - begin != _numel(infos[key][1]) * itemsize:
            raise TernaryFormatError(f"{path.name}: {key} has {stop - begin} bytes for its shape")
    if 8 + length + end > size:
        raise TernaryFormatError(
            f"{path.name}: truncated file: the header describes {8 + length + end} bytes, "
            f"the file has {size}"
        )
    return metadata, infos, offsets


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
        if not data:
            return torch.empty(shape, dtype=dtype_from_name(dtype_name))
        return torch.frombuffer(data, dtype=dtype_from_name(dtype_name)).reshape(shape)

    def close(self) -> None:
        self._map.close()
        self._file.close()

    def __enter__(self) -> MmapReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def validate(
    metadata: Mapping[str, str],
    infos: Mapping[str, tuple[str, tuple[int, ...]]],
    name: str = "file",
) -> tuple[dict[str, tuple[int, int]], str, int, FluxConfig]:
    """Check a v1 header against its tensors; return (layers, packing, lora_rank, config)."""
    fmt = metadata.get("format")
    if fmt != FORMAT_NAME:
        hint = " (a regular model? quantize it first)" if fmt is None else ""
        raise TernaryFormatError(f"{name}: not a ternary-flux file: format marker is {fmt!r}{hint}")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise TernaryFormatError(
            f"{name}: unknown ternary-flux version {metadata.get('format_version')!r}; "
            f"this version of the pack reads version {FORMAT_VERSION}"
        )
    packing = metadata.get("packing")
    if packing not in PACKINGS:
        raise TernaryFormatError(f"{name}: unknown packing {packing!r}")
    try:
        layers = {k: (int(v[0]), int(v[1])) for k, v in json.loads(metadata["layers"]).items()}
        lora_rank = int(metadata.get("lora_rank", "0"))
    except (KeyError, ValueError, TypeError, IndexError):
        raise TernaryFormatError(f"{name}: corrupt layer list in the metadata") from None
    logical = {k: shape for k, (_, shape) in infos.items()}
    for layer, (n, k) in layers.items():
        _check_layer(name, layer, n, k, packing, infos)
        logical[f"{layer}.weight"] = (n, k)
    quantized = {f"{layer}.{suffix}" for layer in layers for suffix in LAYER_SUFFIXES}
    for key, (dtype, _) in infos.items():
        if key not in quantized and dtype not in ("F16", "BF16", "F32"):
            raise TernaryFormatError(
                f"{name}: tensor {key} has dtype {dtype}, expected a 16- or 32-bit float"
            )
    try:
        config = detect_config(logical)
    except NotFluxError as err:
        raise TernaryFormatError(f"{name}: {err}") from None
    return layers, packing, lora_rank, config


def _check_layer(name, layer, n, k, packing, infos) -> None:
    def need(suffix, dtypes, shape):
        key = f"{layer}.{suffix}"
        if key not in infos:
            raise TernaryFormatError(f"{name}: layer {layer} has no tensor {key}")
        dtype, got = infos[key]
        if dtype not in dtypes or tuple(got) != tuple(shape):
            raise TernaryFormatError(
                f"{name}: {key} is {dtype} {list(got)}, expected {'/'.join(dtypes)} {list(shape)}"
            )

    need("weight", ("U8",), packed_shape(packing, n, k))
    need("weight_scale", ("F32",), (n,))
    if f"{layer}.bias" in infos:
        need("bias", ("F16", "BF16", "F32"), (n,))
    has_down, has_up = f"{layer}.lora_down" in infos, f"{layer}.lora_up" in infos
    if has_down != has_up:
        raise TernaryFormatError(f"{name}: layer {layer} has only half of its LoRA")
    if has_down:
        r = infos[f"{layer}.lora_down"][1][0]
        need("lora_down", ("F16", "BF16", "F32"), (r, k))
        need("lora_up", ("F16", "BF16", "F32"), (n, r))
        need("lora_alpha", ("F32",), ())


def load_ternary_file(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> TernaryCheckpoint:
    """Read and validate a v1 file; weights come back in the 2bit compute layout."""
    path = Path(path)
    metadata, infos = read_header(path)
    layers, packing, lora_rank, config = validate(metadata, infos, path.name)
    state = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    except Exception as err:  # safetensors raises its own error types
        raise TernaryFormatError(f"{path.name}: cannot read tensors ({err})") from None
    if packing == "base3":
        for layer, (_, k) in layers.items():
            state[f"{layer}.weight"] = base3_to_2bit(state[f"{layer}.weight"], k)
    return TernaryCheckpoint(state, layers, config, lora_rank, packing, dict(metadata))


def dtype_from_name(name: str) -> torch.dtype:
    """torch dtype of a safetensors dtype name (for headers read with :func:`read_header`)."""
    if name not in _DTYPE_NAMES:
        raise TernaryFormatError(f"tensors of dtype {name} are not supported")
    return _DTYPE_NAMES[name]
