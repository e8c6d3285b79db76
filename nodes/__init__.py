"""ComfyUI glue: the pack's V3 nodes and how ternary layers live in ComfyUI's models."""
