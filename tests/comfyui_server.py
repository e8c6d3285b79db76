"""A real ComfyUI server for the integration tests: headless, CPU, temporary base directory.

The pack and the test-only conditioning node are linked into the base directory's
custom_nodes; tests put tiny models in its model folders and talk HTTP to it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import torch
from comfyui_harness import REPO, import_comfyui
from safetensors.torch import load_file, save_file

TESTS = Path(__file__).resolve().parent


class ComfyServer:
    """One ComfyUI process; :meth:`run` posts an API graph and waits for its history."""

    def __init__(self, comfyui: Path, base: Path) -> None:
        self.base = base
        folders = ("ternary", "diffusion_models", "loras", "vae_approx")
        for folder in ("custom_nodes", *(f"models/{f}" for f in folders)):
            (base / folder).mkdir(parents=True, exist_ok=True)
        (base / "custom_nodes" / "ComfyUI-TernaryFLUX").symlink_to(REPO)
        test_nodes = base / "custom_nodes" / "ternary_flux_test_nodes.py"
        test_nodes.symlink_to(TESTS / "comfyui_test_nodes.py")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(base / "server.log", "w")
        command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1"]
        command += ["--port", str(self.port), "--base-directory", str(base)]
        command += ["--disable-api-nodes", "--database-url", "sqlite:///:memory:"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            command, cwd=comfyui, stdout=self.log, stderr=subprocess.STDOUT, env=env
        )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited:\n{self.log_text()}")
            try:
                self.get("/system_stats")
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not start in {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return (self.base / "server.log").read_text()[-6000:]

    def alive(self) -> bool:
        return self.process.poll() is None and "system" in self.get("/system_stats")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def post(self, graph: dict) -> tuple[int, dict]:
        body = json.dumps({"prompt": graph, "client_id": uuid.uuid4().hex}).encode()
        request = urllib.request.Request(
            self.url + "/prompt", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def run(self, graph: dict, timeout: float = 300) -> dict:
        """Post a graph, wait for it to finish; returns its /history entry."""
        status, reply = self.post(graph)
        if status != 200:
            raise AssertionError(f"prompt refused ({status}): {reply}")
        prompt_id = reply["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] == "success" or entry["status"]["messages"]:
                    return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish:\n{self.log_text()}")

    def error_of(self, entry: dict) -> str:
        """The exception message of a failed prompt ('' when it succeeded)."""
        for kind, data in entry["status"]["messages"]:
            if kind == "execution_error":
                return f"{data['node_type']}: {data['exception_message']}"
        return ""

    def files(self, entry: dict, node: str) -> list[Path]:
        """The image files a SaveImage / PreviewImage node of a finished prompt wrote."""
        return [
            self.base / info["type"] / info["subfolder"] / info["filename"]
            for info in entry["outputs"][node]["images"]
        ]

    def latent(self, entry: dict, node: str) -> torch.Tensor:
        """The latent a SaveLatent node of a finished prompt wrote."""
        info = entry["outputs"][node]["latents"][0]
        path = self.base / "output" / info["subfolder"] / info["filename"]
        return load_file(path)["latent_tensor"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def save_random_tae(folder: Path, name: str = "taef1", seed: int = 0) -> None:
    """A randomly initialised tiny VAE that VAELoader loads as ``name``: 'taef1' (FLUX.1's,
    16 latent channels) or 'taef2' (FLUX.2's, 128).

    Built from ComfyUI's own TAESD modules, so the keys are whatever ComfyUI expects.
    """
    import_comfyui()
    from comfy.taesd.taesd import TAESD

    gen = torch.Generator().manual_seed(seed)
    tae = TAESD(latent_channels={"taef1": 16, "taef2": 128}[name])
    for part, module in (("encoder", tae.taesd_encoder), ("decoder", tae.taesd_decoder)):
        state = {}
        for key, tensor in module.state_dict().items():
            fan_in = tensor[0].numel() if tensor.dim() > 1 else 0
            scale = fan_in**-0.5 if fan_in else 0.0
            state[key] = torch.randn(tensor.shape, generator=gen) * scale
        save_file(state, folder / f"{name}_{part}.safetensors")
