"""The pack's V3 extension: registers the models/ternary folder and lists the nodes."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from . import folders
from .distill import NODES as DISTILL_NODES
from .load_node import LoadTernaryDiffusionModel
from .quantize_node import QuantizeModelToTernary
from .report_node import TernaryReport
from .reproduction_node import LoadReproductionCheckpoint
from .save_node import SaveTernaryModel

folders.register()


class TernaryFluxExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            LoadTernaryDiffusionModel,
            QuantizeModelToTernary,
            SaveTernaryModel,
            LoadReproductionCheckpoint,
            TernaryReport,
            *DISTILL_NODES,
        ]
