"""`python -m comfyui_ternary_flux ...`: the command-line interface."""

import sys

from .ternary.cli import main

sys.exit(main())
