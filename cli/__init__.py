"""The command line: ``python -m comfyui_ternary_flux <command>``."""
