"""Find a real ComfyUI for the node tests; skip loudly when there is none.

Where ComfyUI is looked for, in order: ``$TERNARY_FLUX_COMFYUI``; ``<repo>/.comfyui/ComfyUI``
(README, Development, says how); the natural layout, this repository inside
``ComfyUI/custom_nodes/``. Without one, the tests that need it are skipped with the reason
and a warning that pytest prints in its summary; with ``TERNARY_FLUX_REQUIRE_COMFYUI=1`` (CI,
where ComfyUI is set up) they fail instead.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV_VAR = "TERNARY_FLUX_COMFYUI"
REQUIRE_VAR = "TERNARY_FLUX_REQUIRE_COMFYUI"
SKIP_REASON = (
    f"ComfyUI not found: set {ENV_VAR}=/path/to/ComfyUI, or export it to "
    f"{REPO / '.comfyui' / 'ComfyUI'} (see README, Development); the ComfyUI node tests did NOT run"
)


class ComfyUIMissingWarning(pytest.PytestWarning):
    """Shown in pytest's warnings summary when the ComfyUI tests are skipped."""


def locate_comfyui() -> Path | None:
    """The ComfyUI directory (the one holding main.py), or None."""
    candidates = []
    if os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    candidates.append(REPO / ".comfyui" / "ComfyUI")
    if REPO.parent.name == "custom_nodes":
        candidates.append(REPO.parent.parent)
    return next((c.resolve() for c in candidates if (c / "main.py").is_file()), None)


def require_comfyui() -> Path:
    """The ComfyUI directory; skips the calling test (loudly) when there is none."""
    root = locate_comfyui()
    if root is None and os.environ.get(REQUIRE_VAR) == "1":
        pytest.fail(f"{REQUIRE_VAR}=1 but {SKIP_REASON}", pytrace=False)
    if root is None:
        warnings.warn(SKIP_REASON, ComfyUIMissingWarning, stacklevel=2)
        pytest.skip(SKIP_REASON, allow_module_level=True)
    return root


def import_comfyui() -> Path:
    """Make ComfyUI importable in this process, running on the CPU (for unit tests)."""
    root = require_comfyui()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy.cli_args import args

    args.cpu = True
    return root
