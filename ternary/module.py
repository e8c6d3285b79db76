"""TernaryLinear: a leaf module holding a packed ternary weight, per-row scales, an optional
bias and an optional LoRA branch, all as its own direct parameters and buffers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..kernels.layout import PAD_BYTE, packed_width, unpack_2bit
from ..kernels.op import ternary_linear
from ..kernels.weight import LoraBranch, TernaryWeight
from .convert import dense_dtype
from .fileformat import layer_entries
from .packing import pack
from .quantize import quantize_layer


class TernaryLinear(nn.Module):
    """y = (x T^T) * s + bias + (alpha / r) * (x down^T) up^T.

    Tensors (also the state-dict names of the file format):
      weight       uint8 [N, ceil(K/128)*32]  2bit-packed T (buffer, never trained)
      weight_scale float32 [N]                per-row scale s (trainable)
      bias         [N]                        optional
      lora_down    [r, K], lora_up [N, r]     optional LoRA (kohya / PEFT orientation)
      lora_alpha   float32 []                 LoRA alpha; the branch is scaled by alpha / r
    ``act_bits`` = 8 runs the 8-bit-activation path.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        lora_rank: int = 0,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.act_bits = 16
        self.scale_rule: str | None = None  # the rule that made the scales, when known
        self.calibration: str | None = None  # the file header's calibration entry, if any
        shape = (out_features, packed_width(in_features))
        self.register_buffer(
            "weight", torch.full(shape, PAD_BYTE, dtype=torch.uint8, device=device)
        )
        self.weight_scale = nn.Parameter(torch.ones(out_features, device=device))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        )
        self.lora_down: nn.Parameter | None = None
        self.lora_up: nn.Parameter | None = None
        self._lora_scale = 0.0
        if lora_rank:
            self.add_lora(lora_rank, dtype=dtype, device=device)

    @property
    def lora_rank(self) -> int:
        return 0 if self.lora_down is None else self.lora_down.shape[0]

    def add_lora(
        self,
        rank: int,
        alpha: float | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
    ) -> None:
        """Attach a zero LoRA branch of this rank (alpha defaults to the rank: scale 1)."""
        self.lora_down = nn.Parameter(
            torch.zeros(rank, self.in_features, dtype=dtype, device=device)
        )
        self.lora_up = nn.Parameter(
            torch.zeros(self.out_features, rank, dtype=dtype, device=device)
        )
        self.register_buffer("lora_alpha", torch.tensor(float(alpha or rank), device=device))
        self._refresh_lora_scale()

    def _refresh_lora_scale(self) -> None:
        # Kept as a Python float: reading the alpha buffer on every call would synchronize
        # the GPU once per layer (hundreds of stalls per sampling step).
        self._lora_scale = float(self.lora_alpha) / self.lora_rank if self.lora_rank else 0.0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_lora_scale()

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        lora_rank: int = 0,
        scale_rule: str = "absmean",
        dtype: torch.dtype | None = None,
    ) -> TernaryLinear:
        """Quantize a dense [N, K] weight (the one per-layer quantizer that files use too); a
        LoRA branch, if asked for, fits the residual."""
        if dtype is None:
            sixteen = (torch.float16, torch.bfloat16, torch.float32)
            dtype = weight.dtype if weight.dtype in sixteen else torch.bfloat16
        n, k = weight.shape
        parts, _ = quantize_layer(weight, lora_rank, scale_rule, "2bit", lora_dtype=dtype)
        return cls.from_parts(parts, n, k, bias, dtype, scale_rule)

    @classmethod
    def from_parts(
        cls,
        parts: dict[str, torch.Tensor],
        out_features: int,
        in_features: int,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        scale_rule: str | None,
    ) -> TernaryLinear:
        """A layer holding what :func:`quantize_layer` made (2bit packing), on its device."""
        down = parts.get("lora_down")
        rank = 0 if down is None else down.shape[0]
        device = parts["weight"].device
        module = cls(in_features, out_features, bias is not None, rank, dtype, device)
        if bias is not None:
            parts = {**parts, "bias": bias}
        module.load_state_dict(parts)
        module.scale_rule = scale_rule
        return module

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s * T (+ the LoRA product) as a dense matrix: for references and exports only."""
        w = (
            unpack_2bit(self.weight, self.in_features, torch.float32)
            * self.weight_scale.float()[:, None]
        )
        if self.lora_down is not None:
            w = w + self.lora_scale * (self.lora_up.float() @ self.lora_down.float())
        return w.to(dtype)

    @property
    def lora_scale(self) -> float:
        """alpha / r, the LoRA branch's multiplier (0 without a LoRA)."""
        return self._lora_scale

    def ternary_weight(self) -> TernaryWeight:
        return TernaryWeight(self.weight, self.weight_scale, self.in_features)

    def lora_branch(self) -> LoraBranch | None:
        if self.lora_down is None:
            return None
        return LoraBranch(self.lora_down, self.lora_up, self._lora_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ternary_linear(
            x, self.ternary_weight(), self.bias, self.lora_branch(), self.act_bits
        )

    def file_tensors(self, packing: str = "2bit") -> dict[str, torch.Tensor]:
        """This layer's tensors in the file format's layer schema (ternary/fileformat.py),
        bias apart (it is stored as it is); CPU tensors."""
        entries = layer_entries(self.out_features, self.in_features, packing, self.lora_rank)
        weight = self.weight.detach().cpu()
        if packing != "2bit":
            weight = pack(unpack_2bit(weight, self.in_features), packing)
        values = {"weight": weight, "weight_scale": self.weight_scale, "lora_alpha": None}
        if self.lora_rank:
            values.update(lora_down=self.lora_down, lora_up=self.lora_up)
            values["lora_alpha"] = self.lora_alpha
        return {
            suffix: values[suffix].detach().to("cpu", dtype).reshape(shape).contiguous()
            for suffix, (dtype, shape) in entries.items()
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, lora_rank={self.lora_rank}, act_bits={self.act_bits}"
        )


def export_tensors(
    model: nn.Module,
    packing: str = "2bit",
    dense: Callable[[torch.dtype], torch.dtype] = dense_dtype,
    key: Callable[[str], str] = lambda name: name,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]], int]:
    """(tensors, layers, LoRA rank) of a model holding TernaryLinear layers, for a v1 file:
    the layers through :meth:`TernaryLinear.file_tensors`, every other tensor in ``dense``
    of its dtype, keys renamed by ``key``."""
    ternary = {n: m for n, m in model.named_modules() if isinstance(m, TernaryLinear)}
    tensors = {}
    for name, value in model.state_dict().items():
        module, _, suffix = name.rpartition(".")
        if module in ternary and suffix == "weight":
            for part, tensor in ternary[module].file_tensors(packing).items():
                tensors[key(f"{module}.{part}")] = tensor
        elif module not in ternary or suffix == "bias":
            tensors[key(name)] = value.detach().to("cpu", dense(value.dtype)).contiguous()
    layers = {key(n): (m.out_features, m.in_features) for n, m in ternary.items()}
    return tensors, layers, max((m.lora_rank for m in ternary.values()), default=0)
