"""Integrity of the files the pack reads back: a flipped byte is found and named, never
trained on or imported.

* torch.save files (distillation checkpoints, the reproduction's .pt) are zip archives
  whose members carry CRC-32 checksums, which ``torch.load`` does not check:
  :func:`check_zip` does, before anything is loaded.
* safetensors files have no checksums of their own: a writer that needs one stores
  :func:`tensor_digest` of its tensors in the file's metadata (teacher data shards), and the
  reader compares it with the tensors it read.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

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
