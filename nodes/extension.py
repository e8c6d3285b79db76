"""The pack's V3 extension: registers the models/ternary folder and lists the nodes."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from . import folders
from .load_node import LoadTernaryDiffusionModel
from .quantize_node import QuantizeModelToTernary
from .report_node import TernaryReport
from .reproduction_node import LoadReproductionCheckpoint
from .save_node import SaveTernaryModel

folders.register()


def _distill_nodes() -> list[type[io.ComfyNode]]:
    """The distillation nodes (nodes/distill.py), when that part of the pack is present."""
    try:
        from .distill import NODES
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}.distill":
            raise
        return []
    return list(NODES)


class TernaryFluxExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            LoadTernaryDiffusionModel,
            QuantizeModelToTernary,
            SaveTernaryModel,
            LoadReproductionCheckpoint,
            TernaryReport,
            *_distill_nodes(),
        ]
