"""The shipped workflows against the real ComfyUI's node schemas.

Every ``workflows/*.json`` (UI format: what users drag in) must have an API-format twin in
``workflows/api/`` describing the same graph. ComfyUI's built-in nodes and this pack (loaded
the way ComfyUI loads custom nodes) are registered in-process; the API graphs then go through
ComfyUI's own prompt validation (node types, required inputs, combo values, ranges, link
types), and the UI graphs through checks of their links and widgets. File combos are
checked against placeholder files with the standard FLUX.1-dev and FLUX.2-dev names.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging

import pytest
from comfyui_harness import REPO, import_comfyui

import_comfyui()

import execution  # noqa: E402
import folder_paths  # noqa: E402

import nodes  # noqa: E402

WORKFLOWS = REPO / "workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
USER_FILES = {  # the files a FLUX.1-dev / FLUX.2-dev user has, by ComfyUI model folder
    "diffusion_models": ["flux1-dev.safetensors"],
    "text_encoders": [
        "clip_l.safetensors",
        "t5xxl_fp16.safetensors",
        "mistral_3_small_flux2_bf16.safetensors",
    ],
    "vae": ["ae.safetensors", "flux2-vae.safetensors"],
    "ternary": [
        "flux1-dev-ternary.safetensors",
        "flux2-dev-ternary.safetensors",
        "ternary_distilled_r64.pt",
    ],
}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """ComfyUI's nodes + this pack's (loaded from custom_nodes), with placeholder model files."""
    custom = tmp_path_factory.mktemp("custom_nodes")
    (custom / "ComfyUI-TernaryFLUX").symlink_to(REPO)
    logging.disable(logging.WARNING)  # comfy_extras nodes that need a server warn in-process
    try:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        assert asyncio.run(nodes.load_custom_node(str(custom / "ComfyUI-TernaryFLUX")))
    finally:
        logging.disable(logging.NOTSET)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(folder_paths, "filename_list_cache", {})
        for folder, names in USER_FILES.items():
            path = tmp_path_factory.mktemp(folder)
            for name in names:
                (path / name).write_bytes(b"")
            exts = folder_paths.folder_names_and_paths[folder][1]
            patch.setitem(folder_paths.folder_names_and_paths, folder, ([str(path)], exts))
        yield nodes.NODE_CLASS_MAPPINGS


def type_name(t) -> str:
    """An input / output type as the UI writes it ('COMBO' for a list of options)."""
    if isinstance(t, list):
        return "COMBO"
    return str(t.value) if isinstance(t, enum.Enum) else str(t)


def inputs_of(node_class) -> list[tuple[str, str, bool, dict]]:
    """(name, type, is_widget, options) of every input, required first, in schema order."""
    found = []
    for section in ("required", "optional"):
        for name, spec in node_class.INPUT_TYPES().get(section, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            kind = type_name(spec[0])
            found.append(
                (name, kind, kind in WIDGET_TYPES and not options.get("forceInput"), options)
            )
    return found


def ui_to_api(workflow: dict, registered: dict) -> dict:
    """The API graph a UI workflow stands for, the way the frontend converts it."""
    links = {link[0]: link for link in workflow["links"]}
    graph = {}
    for node in workflow["nodes"]:
        sockets = {i["name"]: i["link"] for i in node["inputs"] if i["link"] is not None}
        values = iter(node["widgets_values"])
        inputs = {}
        for name, kind, is_widget, options in inputs_of(registered[node["type"]]):
            if name in sockets:
                _, origin, slot, *_ = links[sockets[name]]
                inputs[name] = [str(origin), slot]
            elif is_widget:
                inputs[name] = next(values)
                # the frontend's rule: a control widget follows every INT named seed /
                # noise_seed unless the input says otherwise
                seed = kind == "INT" and name in ("seed", "noise_seed")
                if options.get("control_after_generate", seed):
                    control = next(values, None)
                    assert control in CONTROL_VALUES, f"node {node['id']}: {name} lacks its control"
        assert next(values, None) is None, f"node {node['id']}: extra widget values"
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return graph


def load(path):
    return json.loads(path.read_text())


def test_every_workflow_has_an_api_twin():
    assert {p.stem for p in UI_FILES} == {
        "text_to_image_ternary",
        "quantize_and_save",
        "import_reproduction",
        "report",
        "text_to_image_flux2_ternary",
    }
    assert sorted(p.name for p in (WORKFLOWS / "api").glob("*.json")) == [p.name for p in UI_FILES]


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_api_graph_passes_comfyuis_validation(registered, path):
    graph = load(WORKFLOWS / "api" / path.name)
    valid, error, outputs, node_errors = asyncio.run(
        execution.validate_prompt("workflow-test", graph, None)
    )
    assert valid, (error, node_errors)
    assert outputs and not node_errors


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_graph_is_well_formed_and_twins_the_api_graph(registered, path):
    workflow = load(path)
    by_id = {node["id"]: node for node in workflow["nodes"]}
    assert len(by_id) == len(workflow["nodes"]) and workflow["last_node_id"] == max(by_id)
    assert workflow["last_link_id"] == max(link[0] for link in workflow["links"])
    for node in workflow["nodes"]:
        node_class = registered[node["type"]]
        outputs = [type_name(t) for t in node_class.RETURN_TYPES]
        assert [o["type"] for o in node["outputs"]] == outputs, node["type"]
        sockets = {name: kind for name, kind, widget, _ in inputs_of(node_class) if not widget}
        assert {i["name"]: i["type"] for i in node["inputs"]} == sockets, node["type"]
    for link_id, origin, slot, target, target_slot, kind in workflow["links"]:
        source_type = by_id[origin]["outputs"][slot]["type"]
        target_input = by_id[target]["inputs"][target_slot]
        assert (
            link_id in by_id[origin]["outputs"][slot]["links"] and target_input["link"] == link_id
        )
        assert kind == source_type and target_input["type"] in (source_type, "*"), (
            f"link {link_id}: {source_type} into {target_input['name']} ({target_input['type']})"
        )
    api = load(WORKFLOWS / "api" / path.name)
    stripped = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert ui_to_api(workflow, registered) == stripped


@pytest.mark.parametrize(
    ("node_type", "name", "value", "error"),
    [
        ("KSampler", "model", "VAELoader", "return_type_mismatch"),
        ("TernaryFluxLoader", "model_name", "flux1-schnell.safetensors", "value_not_in_list"),
        ("TernaryFluxLoader", "activations", "4-bit", "value_not_in_list"),
        ("KSampler", "steps", 0, "value_smaller_than_min"),
    ],
)
def test_validation_can_fail(registered, node_type, name, value, error):
    """The check above is not vacuous: one wrong link, file, option or number is refused."""
    graph = load(WORKFLOWS / "api" / "text_to_image_ternary.json")
    ids = {v["class_type"]: k for k, v in graph.items()}
    graph[ids[node_type]]["inputs"][name] = [ids[value], 0] if value in ids else value
    valid, _, _, node_errors = asyncio.run(execution.validate_prompt("bad", graph, None))
    assert not valid and error in json.dumps(node_errors[ids[node_type]])


def test_flux2_workflow_uses_comfyuis_flux2_nodes(registered):
    """FLUX.2's own text encoder loader, latent and scheduler, as ComfyUI's FLUX.2 template."""
    graph = load(WORKFLOWS / "api" / "text_to_image_flux2_ternary.json")
    kinds = {node["class_type"]: node["inputs"] for node in graph.values()}
    assert kinds["CLIPLoader"]["type"] == "flux2"
    assert kinds["TernaryFluxLoader"]["model_name"] == "flux2-dev-ternary.safetensors"
    for name in (
        "EmptyFlux2LatentImage",
        "Flux2Scheduler",
        "FluxGuidance",
        "SamplerCustomAdvanced",
    ):
        assert name in kinds and name in registered
    size = kinds["EmptyFlux2LatentImage"]
    assert (size["width"], size["height"]) == (kinds["Flux2Scheduler"]["width"], 1024)
