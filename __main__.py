"""`python -m comfyui_ternary_flux ...`: the command-line interface."""

import sys

from .cli.main import main

sys.exit(main())
