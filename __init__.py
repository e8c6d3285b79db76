"""ComfyUI-TernaryFLUX: 1.58-bit (ternary) FLUX.1 for ComfyUI.

This file is ComfyUI's entry point. It imports nothing of ComfyUI until ComfyUI calls
`comfy_entrypoint`, so the core (`ternary/`, `kernels/`) can be used without ComfyUI.
"""


async def comfy_entrypoint():
    """Return the V3 extension that lists this pack's nodes (called by ComfyUI)."""
    from .nodes.extension import TernaryFluxExtension

    return TernaryFluxExtension()
