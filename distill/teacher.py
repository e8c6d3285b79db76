"""Teacher data set: what the bf16 model says, stored once, so training never needs it loaded.

Per prompt i (sample id = its index in the prompt list) a shard holds::

    {i}.context     [L, 4096]   T5 conditioning
    {i}.pooled      [768]       pooled CLIP vector
    {i}.z0          [16, h, w]  the teacher's final latent (Euler, FLUX's shifted schedule)
    {i}.t           [K]         training times, float32
    {i}.noise_seed  [K]         int64 seeds of eps (``seeded_normal(seed, z0.shape)``)
    {i}.v           [K, 16, h, w] teacher velocity at z_t = (1 - t) z0 + t eps

Shard j holds prompts [j * shard_size, (j + 1) * shard_size). A shard file appears only once
complete (temp file + rename), so a restarted build skips finished shards and redoes at most
one shard per process. ``manifest.json`` records the settings, the prompts and the shards.
Every shard stores the sha256 of its tensors in its metadata (ternary/integrity.py): a
damaged shard is refused by training, naming it, and rebuilt by a resumed build.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open

from ..ternary.atomic import write_json_atomic
from ..ternary.integrity import DamagedFileError, read_checked, write_checked
from .config import wrong_type
from .schedule import (
    derived_seed,
    resolution_shift,
    sampling_sigmas,
    seeded_normal,
    seeded_uniform,
    shift_time,
)

FORMAT_NAME = "ternary-flux-teacher"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# What to do about an unreadable manifest: a build refuses to extend one it cannot read.
REWRITE = (
    "delete it and build the data set again into this folder with the same settings and "
    "prompts (finished shards are kept)"
)

# encode(prompt) -> (context [L, D], pooled [P])
Encoder = Callable[[str], tuple[torch.Tensor, torch.Tensor]]
# velocity_fn(z_t [B, 16, h, w], t [B], cond {"context", "pooled", "guidance"}) -> v
VelocityFn = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


class TeacherDataError(ValueError):
    """A teacher data set that cannot be used or extended as asked; the message says why."""


@dataclass(frozen=True)
class TeacherSettings:
    """How the teacher data was made. Fixed for a data set: a resumed build must match."""

    width: int = 1024
    height: int = 1024
    steps: int = 28
    guidance: float = 3.5
    shift: float | None = None  # None: FLUX's shift for width x height
    points_per_prompt: int = 4
    seed: int = 0
    shard_size: int = 16
    storage_dtype: str = "bfloat16"
    latent_channels: int = 16  # of the model family's latent space (FLUX.1: 16)

    def __post_init__(self) -> None:
        if (wrong := wrong_type(self)) is not None:  # from a config file or a manifest
            field, value = wrong
            raise TeacherDataError(f"{field.name} must be {field.type}, got {value!r}")
        mu = resolution_shift(self.width, self.height)  # also checks the resolution
        mu = mu if self.shift is None else self.shift
        object.__setattr__(self, "shift", float(mu))
        for name in ("steps", "points_per_prompt", "shard_size", "latent_channels"):
            if getattr(self, name) < 1:
                raise TeacherDataError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.storage_dtype not in ("bfloat16", "float16", "float32"):
            raise TeacherDataError(
                f"storage_dtype must be bfloat16, float16 or float32, got {self.storage_dtype!r}"
            )

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.height // 8, self.width // 8)

    @classmethod
    def from_dict(cls, values: dict) -> TeacherSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TeacherDataError(f"unknown teacher setting(s): {', '.join(unknown)}")
        return cls(**values)


def model_velocity_fn(model: torch.nn.Module) -> VelocityFn:
    """velocity_fn of the pure-torch FluxTransformer (tests, CLI)."""

    def velocity(z_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return model(z_t, t, cond["context"], cond["pooled"], cond["guidance"])

    return velocity


def hashed_prompt_encoder(context_len: int = 256, context_dim: int = 4096, pooled_dim: int = 768):
    """A stand-in text encoder for tests and random-weight runs: seeded noise per prompt."""

    def encode(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:7], "little")
        return seeded_normal(seed, (context_len, context_dim)), seeded_normal(
            seed + 1, (pooled_dim,)
        )

    return encode


@torch.no_grad()
def euler_sample(velocity_fn: VelocityFn, noise: torch.Tensor, cond: dict, sigmas) -> torch.Tensor:
    """z0 from noise at sigma 1: z <- z + (sigma_next - sigma) * v, in float32."""
    z = noise.float()
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        t = torch.full((z.shape[0],), sigma, device=z.device)
        z = z + (sigma_next - sigma) * velocity_fn(z, t, cond).float()
    return z


@torch.no_grad()
def teacher_sample(
    index: int, context: torch.Tensor, pooled: torch.Tensor, velocity_fn: VelocityFn,
    settings: TeacherSettings, device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Everything the data set stores for prompt ``index`` (CPU tensors, storage dtype)."""
    store = getattr(torch, settings.storage_dtype)
    cond = {
        "context": context[None].to(device),
        "pooled": pooled[None].to(device),
        "guidance": torch.full((1,), settings.guidance, device=device),
    }
    shape = settings.latent_shape
    noise = seeded_normal(derived_seed(settings.seed, index, 0), shape)[None].to(device)
    z0 = euler_sample(velocity_fn, noise, cond, sampling_sigmas(settings.steps, settings.shift))
    z0 = z0.to(store).float()  # the velocities below belong to the stored (rounded) z0
    k = settings.points_per_prompt
    u = 1.0 - seeded_uniform(derived_seed(settings.seed, index, 1), k)  # (0, 1]
    t = shift_time(u, settings.shift).float()
    noise_seeds = torch.tensor([derived_seed(settings.seed, index, 2, j) for j in range(k)])
    eps = torch.stack([seeded_normal(int(s), shape) for s in noise_seeds]).to(device)
    t_dev = t.to(device)
    z_t = (1 - t_dev[:, None, None, None]) * z0 + t_dev[:, None, None, None] * eps
    batch_cond = {name: value.expand(k, *value.shape[1:]) for name, value in cond.items()}
    v = velocity_fn(z_t, t_dev, batch_cond).float()
    return {
        "context": context.to(store).cpu(),
        "pooled": pooled.to(store).cpu(),
        "z0": z0[0].to(store).cpu(),
        "t": t,
        "noise_seed": noise_seeds,
        "v": v.to(store).cpu(),
    }


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def _describe(settings: TeacherSettings, prompts: Sequence[str]) -> dict:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "settings": asdict(settings),
        "latent_shape": list(settings.latent_shape),
        "prompts": list(prompts),
    }


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise TeacherDataError(f"{directory}: no {MANIFEST}; not a teacher data set")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise TeacherDataError(f"{path}: damaged ({str(err)[:80]}); {REWRITE}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise TeacherDataError(f"{path}: not a teacher data set manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TeacherDataError(
            f"{path}: teacher data set version {manifest.get('format_version')}, this pack reads "
            f"version {FORMAT_VERSION}"
        )
    if not isinstance(manifest.get("prompts"), list):
        raise TeacherDataError(f"{path}: no prompt list; {REWRITE}")
    return manifest


def _check_same_build(directory: Path, described: dict) -> None:
    """A resumed build must use the settings and prompts it started with."""
    old = read_manifest(directory)
    old["settings"] = asdict(TeacherSettings.from_dict(old["settings"]))  # older: defaults
    for key in ("settings", "prompts"):
        if old[key] != described[key]:
            if key == "prompts":
                raise TeacherDataError(
                    f"{directory} was started with other prompts ({len(old['prompts'])} prompts); "
                    "use a new folder or the same prompt list"
                )
            diff = {
                k: (v, described[key][k]) for k, v in old[key].items() if described[key][k] != v
            }
            raise TeacherDataError(
                f"{directory} was started with other settings: "
                + ", ".join(f"{k} {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            )


def _shard_ids(path: Path) -> list[int] | None:
    """Sample ids of a finished shard file (from its header), or None when it is not
    readable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["samples"])
    except Exception:  # a damaged file is rebuilt, not trusted
        return None


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a shard, checked against the digest in its header (shards of older
    builds, without one, are read as they are)."""
    try:
        return read_checked(path, "shard", required=False)[0]
    except DamagedFileError as err:
        raise TeacherDataError(
            f"{err}; delete it and build the teacher data set again into the same folder: that "
            "shard is redone, the finished ones are kept"
        ) from None


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], ids: list[int]) -> None:
    write_checked(path, tensors, {"samples": json.dumps(ids)})


def _shard_is_done(path: Path, ids: list[int]) -> bool:
    if not path.is_file() or _shard_ids(path) != ids:
        return False
    try:
        read_shard(path)
    except TeacherDataError:
        return False
    return True


def refresh_manifest(directory: str | os.PathLike) -> dict:
    """Rewrite the manifest's shard list from the shard files present; returns it."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    prompts, size = manifest["prompts"], manifest["settings"]["shard_size"]
    shards, done = [], 0
    for j in range(-(-len(prompts) // size)):
        path = directory / shard_name(j)
        ids = _shard_ids(path) if path.is_file() else None
        if ids is not None:
            shards.append({"file": path.name, "samples": ids, "bytes": path.stat().st_size})
            done += len(ids)
    manifest.update(
        shards=shards,
        done_prompts=done,
        complete=done == len(prompts),
        bytes=sum(s["bytes"] for s in shards),
    )
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def build_teacher_dataset(
    directory: str | os.PathLike,
    prompts: Sequence[str],
    encode: Encoder,
    velocity_fn: VelocityFn,
    settings: TeacherSettings,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    log: Callable[[str], None] = print,
    on_prompt: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Build (or finish) a teacher data set; returns the manifest (after all ranks are done).

    With several processes, rank r builds shards r, r + world_size, ...; ``barrier`` must
    synchronise them (torch.distributed.barrier). ``on_prompt(done, total)`` reports progress.
    ``should_stop()`` is asked before each shard still to build: when it turns true the build
    stops there, the finished shards kept, and the manifest it returns is incomplete (a time
    limit: building into the same folder again goes on from there).
    """
    if not prompts:
        raise TeacherDataError("no prompts given")
    directory = Path(directory)
    described = _describe(settings, prompts)
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / MANIFEST).exists():
            _check_same_build(directory, described)
        else:
            write_json_atomic(directory / MANIFEST, {**described, "shards": [], "complete": False})
    barrier()
    _check_same_build(directory, described)
    size = settings.shard_size
    mine = list(range(rank, -(-len(prompts) // size), world_size))
    total = sum(len(prompts[j * size : (j + 1) * size]) for j in mine)
    done = 0
    for j in mine:
        ids = list(range(j * size, min((j + 1) * size, len(prompts))))
        path = directory / shard_name(j)
        if _shard_is_done(path, ids):
            done += len(ids)
            continue
        if should_stop is not None and should_stop():
            log(f"teacher data: stopped before {path.name}; building again goes on from there")
            break
        if path.is_file():
            log(f"teacher data: {path} is damaged or of another build; building it again")
        # Encode the shard's prompts first: big text encoders and the model then swap in
        # and out of GPU memory once per shard, not once per prompt.
        conditions = {i: encode(prompts[i]) for i in ids}
        tensors = {}
        for i in ids:
            sample = teacher_sample(i, *conditions.pop(i), velocity_fn, settings, device)
            for name, value in sample.items():
                tensors[f"{i}.{name}"] = value.contiguous()
            done += 1
            if on_prompt is not None:
                on_prompt(done, total)
        _write_shard(path, tensors, ids)
        if rank == 0:
            manifest = refresh_manifest(directory)
            log(
                f"teacher data: {manifest['done_prompts']}/{len(prompts)} prompts, "
                f"{manifest['bytes'] / 2**20:.1f} MiB on disk"
            )
    barrier()
    manifest = refresh_manifest(directory) if rank == 0 else read_manifest(directory)
    if rank == 0:
        log(
            f"teacher data set {directory}: {manifest['done_prompts']}/{len(prompts)} prompts, "
            f"{len(manifest['shards'])} shards, {manifest['bytes'] / 2**20:.1f} MiB"
        )
    return manifest


class TeacherDataset:
    """Training examples of a complete teacher data set: one per (prompt, training point)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if not manifest.get("complete"):
            raise TeacherDataError(
                f"{self.directory}: teacher data set is incomplete "
                f"({manifest.get('done_prompts', 0)}/{len(manifest['prompts'])} prompts); "
                "finish building it first"
            )
        self.manifest = manifest
        manifest_path = self.directory / MANIFEST
        shards = manifest.get("shards")
        ok = isinstance(shards, list) and all(
            isinstance(s, dict) and isinstance(s.get("file"), str)
            and isinstance(s.get("samples"), list) and all(type(i) is int for i in s["samples"])
            for s in shards
        )  # fmt: skip
        if not ok or not shards or not isinstance(manifest.get("settings"), dict):
            raise TeacherDataError(
                f"{manifest_path}: no usable shard list; build the data set again into this "
                "folder (finished shards are kept) to rewrite it"
            )
        for shard in shards:
            if not (self.directory / shard["file"]).is_file():
                raise TeacherDataError(
                    f"{self.directory / shard['file']} is listed in {manifest_path} but missing; "
                    "build the data set again into this folder to redo it"
                )
        try:
            self.settings = TeacherSettings.from_dict(manifest["settings"])
        except (TypeError, ValueError) as err:
            raise TeacherDataError(f"{manifest_path}: bad settings ({err})") from None
        self.points = self.settings.points_per_prompt
        self._where = {i: s["file"] for s in shards for i in s["samples"]}
        self.sample_ids = sorted(self._where)
        self._files: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.sample_ids) * self.points

    @property
    def fingerprint(self) -> str:
        """Identifies the data (settings, prompts, shards) so a resumed run can check it."""
        key = json.dumps([self.manifest["settings"], self.manifest["prompts"]], sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def _get(self, sample: int, name: str) -> torch.Tensor:
        file = self._where[sample]
        if file not in self._files:  # checked whole once, then read tensor by tensor
            path = self.directory / file
            read_shard(path)
            self._files[file] = safe_open(str(path), framework="pt")
        try:
            return self._files[file].get_tensor(f"{sample}.{name}")
        except Exception:  # safetensors' error for a missing key
            raise TeacherDataError(
                f"{self.directory / file} has no {sample}.{name}, which {MANIFEST} places there; "
                "build the data set again into this folder"
            ) from None

    def example(self, index: int) -> dict[str, torch.Tensor]:
        """z_t, t, teacher v and the conditioning of example ``index`` (float32, CPU)."""
        sample = self.sample_ids[index // self.points]
        point = index % self.points
        z0 = self._get(sample, "z0").float()
        times = self._get(sample, "t")
        if len(times) != self.points:  # a manifest edited by hand, or another set's shards
            raise TeacherDataError(
                f"{self.directory / self._where[sample]}: sample {sample} holds {len(times)} "
                f"training points, {self.directory / MANIFEST} says {self.points} per prompt; "
                "delete the manifest and build the data set again with the settings it was "
                "made with (finished shards are kept)"
            )
        t = times[point].float()
        eps = seeded_normal(int(self._get(sample, "noise_seed")[point]), tuple(z0.shape))
        return {
            "z_t": (1 - t) * z0 + t * eps,
            "t": t,
            "v": self._get(sample, "v")[point].float(),
            "context": self._get(sample, "context").float(),
            "pooled": self._get(sample, "pooled").float(),
            "guidance": torch.tensor(self.settings.guidance, dtype=torch.float32),
        }
