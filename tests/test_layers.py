"""The house's shape: every import inside the package points down its layers, none forms a
cycle, and only nodes/ knows ComfyUI.

Layers, bottom up: kernels (tensors) < ternary (quantization, format, module) < models
(families) < distill < cli, nodes (both on top, apart from each other) < the package's
entry points (__init__.py, __main__.py). Imports are read from the source (ast), including
imports inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_ternary_flux"
RANK = {"kernels": 0, "ternary": 1, "models": 2, "distill": 3, "cli": 4, "nodes": 4, "": 5}
COMFYUI_MODULES = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server")


def package_modules() -> dict[str, Path]:
    """{dotted module name inside the package: file}."""
    modules = {}
    for path in sorted(REPO.glob("*.py")) + sorted(REPO.glob("*/*.py")):
        if path.parent.name in ("tests", "bench", ".comfyui") or path.name == "setup.py":
            continue
        rel = path.relative_to(REPO).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(modules of the package it imports, top-level names of outside modules it imports)."""
    inside, outside = set(), set()
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    inside.add(alias.name[len(PACKAGE) + 1 :])
                else:
                    outside.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1] if node.level > 1 else here
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                # from X import y: y may be a module of X
                inside.update(f"{target}.{a.name}".strip(".") for a in node.names)
            elif node.module and node.module.startswith(PACKAGE):
                target = node.module[len(PACKAGE) + 1 :]
                inside.update(f"{target}.{a.name}" for a in node.names)
            elif node.module:
                outside.add(node.module.split(".")[0])
    modules = package_modules()
    resolved = set()
    for target in inside:  # the longest prefix that is a module ("" is the package itself)
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target != name:
            resolved.add(target)
    return resolved, outside


def layer_of(module: str) -> str:
    """The layer of a module: its first package, or '' for the package's entry points."""
    first = module.split(".")[0]
    return first if first in RANK else ""


def graph() -> dict[str, set[str]]:
    return {name: imports_of(name, path)[0] for name, path in package_modules().items()}


def test_every_import_points_down():
    wrong = []
    for name, targets in graph().items():
        src = layer_of(name)
        for target in targets:
            dst = layer_of(target)
            if RANK[dst] > RANK[src] or (RANK[dst] == RANK[src] and dst != src):
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports that point up or sideways: " + ", ".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_only_nodes_know_comfyui():
    knows = sorted(
        name
        for name, path in package_modules().items()
        if layer_of(name) not in ("nodes", "") and imports_of(name, path)[1] & set(COMFYUI_MODULES)
    )
    assert not knows, f"core modules importing ComfyUI: {knows}"


def test_the_checker_sees_a_planted_upward_import(tmp_path, monkeypatch):
    """The walker itself: an import of nodes/ from kernels/ is found (the test can fail)."""
    planted = tmp_path / "kernels" / "planted.py"
    planted.parent.mkdir()
    planted.write_text("from ..nodes import model_io\nimport comfy.sd\n")
    inside, outside = imports_of("kernels.planted", planted)
    assert inside == {"nodes.model_io"} and "comfy" in outside
    assert RANK[layer_of("nodes.model_io")] > RANK[layer_of("kernels.planted")]
