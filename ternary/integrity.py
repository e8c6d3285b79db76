"""Integrity of the files the pack reads back: a flipped byte is found and named, never
trained on or imported.

* torch.save files (distillation checkpoints, the reproduction's .pt) are zip archives
  whose members carry CRC-32 checksums, which ``torch.load`` does not check:
  :func:`check_zip` does, before anything is loaded.
* safetensors files have no checksums of their own: a writer that needs one stores
  :func:`tensor_digest` of its tensors in the file's metadata (:func:`write_checked`: teacher
  data shards, the calibration kept for a resume), and the reader compares it with the
  tensors it read (:func:`read_checked`).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from .fileformat import StreamingWriter

DIGEST_KEY = "sha256"  # the metadata key of a tensor digest


class DamagedFileError(ValueError):
    """A file whose stored checksum does not match its contents; the message names it."""


def check_zip(path: str | os.PathLike, advice: str = "") -> None:
    """Raise DamagedFileError unless every member of the zip archive ``path`` matches its
    CRC-32 (and the archive itself can be read)."""
    path = Path(path)
    tail = f"; {advice}" if advice else ""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as err:
        raise DamagedFileError(f"{path}: damaged archive ({err}){tail}") from None
    if bad is not None:
        raise DamagedFileError(
            f"{path}: damaged: member {bad} does not match its CRC-32 checksum{tail}"
        )


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def write_checked(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """A safetensors file of ``tensors`` with their digest in its header, through the one
    streaming writer: atomic, a full disk named, the same bytes for the same tensors
    (safetensors' own writer orders the metadata at random). Replaces ``path``."""
    header = {**metadata, DIGEST_KEY: tensor_digest(tensors)}
    entries = {key: (t.dtype, tuple(t.shape)) for key, t in tensors.items()}
    with StreamingWriter(path, entries, header, overwrite=True) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)


def read_checked(
    path: str | os.PathLike, what: str = "file", required: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a :func:`write_checked` file, or DamagedFileError when it cannot
    be read or its tensors do not match its digest (``required=False``: files without a
    digest, from older writers, are read as they are)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors' own error type, or OSError
        raise DamagedFileError(f"{path}: not a readable {what} ({str(err)[:80]})") from None
    expected = metadata.get(DIGEST_KEY)
    if expected is None and required:
        raise DamagedFileError(
            f"{path}: no sha256 of its tensors in its header; not a checked {what}"
        )
    if expected is not None and tensor_digest(tensors) != expected:
        raise DamagedFileError(
            f"{path}: damaged: its tensors do not match the sha256 in its header"
        )
    return tensors, metadata
