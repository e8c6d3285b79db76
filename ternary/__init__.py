"""The core: quantization, packing, modules, file formats, distillation, reporting.

Nothing in this package imports ComfyUI.
"""
