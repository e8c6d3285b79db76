"""ComfyUI inside a benchmark script, set up as main.py sets it up (no server).

Shared by the benchmarks that run the user's path (bench/comfy_sampling.py,
bench/families.py). Call :func:`setup` first, before torch touches the GPU:

* finds ComfyUI (``--comfyui``, ``$COMFYUI_PATH``, ``.comfyui/ComfyUI``, ``.carry/ComfyUI``)
  and puts it on ``sys.path``;
* registers a stub for PyAV when it is missing (``comfy_api.latest`` imports it at import
  time; no benchmark runs a video node), so the GPU machine needs no 35 MB wheel;
* Dynamic VRAM (``dynamic=True``) as main.py enables it: comfy-aimdo initialised before
  ``comfy.model_management`` is imported, then its devices, ``CoreModelPatcher`` and
  ``aimdo_enabled`` (in the other order aimdo's host buffers fail);
* a smaller card (``cap_gb``): another process holds all but ``cap_gb`` of the GPU's memory,
  so every reader of free memory (ComfyUI's legacy estimates, comfy-aimdo's budget) sees
  what such a card would have, and ComfyUI's total is reported as ``cap_gb``.
  ``torch.cuda.set_per_process_memory_fraction`` does not do this: ComfyUI reads
  ``mem_get_info`` and aimdo allocates outside PyTorch's allocator.

Nothing here is part of the pack.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3

_BALLAST = r"""
import sys, torch
target_free = int(sys.argv[1])
torch.empty(1, device="cuda")
free, _ = torch.cuda.mem_get_info()
held = torch.empty(max(free - target_free, 0), dtype=torch.uint8, device="cuda")
print("ready", flush=True)
sys.stdin.read()
"""


def find_comfyui(explicit: str | None) -> Path:
    candidates = [explicit, os.environ.get("COMFYUI_PATH"), ROOT / ".comfyui" / "ComfyUI"]
    candidates.append(ROOT / ".carry" / "ComfyUI")
    for candidate in candidates:
        if candidate and (Path(candidate) / "comfy" / "sd.py").is_file():
            return Path(candidate).resolve()
    raise SystemExit("ComfyUI not found: pass --comfyui DIR or set COMFYUI_PATH")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for a package and its submodules; any attribute is a placeholder class."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name or fullname.startswith(self.name + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def placeholder(attr: str):
            if attr.startswith("__"):  # inspect and pickle probe dunders: be a plain module
                raise AttributeError(attr)
            return type(attr, (), {})

        module.__getattr__ = placeholder
        return module

    def exec_module(self, module) -> None:
        pass


def pin_ballast(cap_gb: float):
    """A child process holding all of GPU 0's free memory but ``cap_gb`` minus this process's
    own CUDA context (a real card of that size carries one too). Returns the process."""
    import torch

    torch.empty(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    context = total - free
    target = int(cap_gb * GIB) - context
    child = subprocess.Popen(
        [sys.executable, "-c", _BALLAST, str(target)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    if child.stdout.readline().strip() != "ready":
        raise RuntimeError("the memory ballast process did not start")
    return child


def setup(comfyui: str | None, device: str, dynamic: bool = False, cap_gb: float | None = None):
    """Make ComfyUI importable and configured; returns (comfy.model_management, ballast)."""
    path = find_comfyui(comfyui)
    sys.path.insert(0, str(path))
    if importlib.util.find_spec("av") is None or os.environ.get("COMFY_ENV_STUB_AV"):
        sys.meta_path.insert(0, _StubFinder("av"))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = device == "cpu"
    args.disable_dynamic_vram = not dynamic
    if dynamic:
        import comfy_aimdo.control

        comfy_aimdo.control.init(simple_vram_headroom=None)
    ballast = pin_ballast(cap_gb) if cap_gb else None
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    if cap_gb:
        cap = int(cap_gb * GIB)
        real_total = mm.get_total_memory

        def get_total_memory(dev=None, torch_total_too=False):
            if getattr(dev or mm.get_torch_device(), "type", None) != "cuda":
                return real_total(dev, torch_total_too)
            if torch_total_too:
                import torch

                return cap, torch.cuda.memory_stats()["reserved_bytes.all.current"]
            return cap

        mm.get_total_memory = get_total_memory
        mm.total_vram = cap / 2**20
    if dynamic:
        import comfy_aimdo.control

        devices = ((d.index, int(args.vram_headroom * GIB)) for d in mm.get_all_torch_devices())
        if not comfy_aimdo.control.init_devices(devices):
            raise SystemExit("comfy-aimdo did not initialise: no Dynamic VRAM here")
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    return mm, ballast


def comfyui_version(comfyui: str | None) -> str:
    scope: dict = {}
    version = find_comfyui(comfyui) / "comfyui_version.py"
    if version.is_file():
        exec(version.read_text(), scope)
    return scope.get("__version__", "unknown")


def load_pack():
    """Import the pack from this checkout (it needs no installation on the GPU machine)."""
    if "comfyui_ternary_flux" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "comfyui_ternary_flux", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        sys.modules["comfyui_ternary_flux"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["comfyui_ternary_flux"])


class TimedSampler:
    """Prompts sampled as KSampler samples them (``comfy.sample.sample``, euler / simple,
    cfg 1, inference mode), timed: the GPU is synchronised at every step's callback, so
    each step interval is that step's own time. ``used`` records the device memory in use at
    each step, counted against ``cap_bytes`` when a ballast stands in for a smaller card
    (the ballast's memory is not this process's)."""

    def __init__(self, model, noise, positive, latent, seed: int, cuda: bool, cap_bytes=None):
        self.model, self.noise, self.positive, self.latent = model, noise, positive, latent
        self.seed, self.cuda, self.cap_bytes = seed, cuda, cap_bytes
        self.used: list[int] = []
        self._stamps: list[float] = []

    def _callback(self, step, x0, x, total) -> None:
        import time

        import torch

        if self.cuda:
            torch.cuda.synchronize()
            free, total_memory = torch.cuda.mem_get_info()
            self.used.append((self.cap_bytes or total_memory) - free)
        self._stamps.append(time.perf_counter())

    def prompt(self, steps: int):
        """(final latent, wall seconds, [seconds of each step])."""
        import time

        import comfy.sample
        import torch

        self._stamps.clear()
        if self.cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        with torch.inference_mode():
            out = comfy.sample.sample(
                self.model, self.noise, steps, 1.0, "euler", "simple", self.positive,
                self.positive, self.latent, callback=self._callback, disable_pbar=True,
                seed=self.seed,
            )  # fmt: skip
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - begin
        stamps = self._stamps
        return out, seconds, [b - a for a, b in zip([begin, *stamps], stamps, strict=False)]
