"""`python -m comfyui_ternary_flux ...`: the command-line interface."""

import sys

try:
    from .cli.main import main
except KeyboardInterrupt:  # Ctrl-C while torch loads (seconds): one line, as in a command
    print("error: interrupted (Ctrl-C) while starting; nothing was done", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
