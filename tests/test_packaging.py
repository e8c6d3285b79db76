"""What a user installs: the base install is small (no Triton on CPU-only machines) and the
README says where to install what."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
REPO = Path(__file__).resolve().parents[1]


def test_triton_is_only_in_the_test_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("triton")]
    test = project["optional-dependencies"]["test"]
    assert any(d.startswith("triton") for d in test)
    assert any(d.startswith("hypothesis") for d in test)


def test_readme_installs_into_comfyui_first_and_never_pins_torch_there():
    readme = (REPO / "README.md").read_text()
    comfy = readme.index("## Install in ComfyUI")
    development = readme.index("## Set-up for development")
    assert comfy < development < readme.index("<!-- test-command -->")
    install = readme[comfy:development]
    commands = re.findall(r"```sh\n(.*?)```", install, re.S)
    assert commands and "pip install" in commands[0] and "torch==" not in commands[0]
    assert "template browser" in " ".join(install.split())
    setup = " ".join(readme[development : readme.index("## Nodes")].split())
    assert "local CPU wheel" in setup and "CUDA build" in setup
    assert "writes `tiny-flux-ternary.safetensors` into the current folder" in setup
