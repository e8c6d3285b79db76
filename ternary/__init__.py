"""The core: quantization, packing, the file format, the conversion loop, the module and the
measurements. Knows no model family and nothing of ComfyUI."""
