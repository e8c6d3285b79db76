"""The ``models/ternary`` folder: ternary files (.safetensors) and reproduction .pt files."""

from __future__ import annotations

import os

import folder_paths

FOLDER = "ternary"
EXTENSIONS = {".safetensors", ".pt"}


def register() -> None:
    """Add ``<models>/ternary`` to ComfyUI's model folders (extra_model_paths may add more)."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
    folder_paths.folder_names_and_paths[FOLDER][1].update(EXTENSIONS)


def files(suffix: str) -> list[str]:
    """Files of the ternary folder(s) ending in ``suffix``."""
    return [f for f in folder_paths.get_filename_list(FOLDER) if f.endswith(suffix)]


def _first_folder() -> str:
    return os.path.realpath(folder_paths.get_folder_paths(FOLDER)[0])


def listed_name(path: str) -> str:
    """A file of :func:`output_path` as Load Ternary Diffusion Model lists it: relative to
    the folder, so a name given with a subfolder loads that file, not one of the same name
    at the top."""
    return os.path.relpath(path, _first_folder())


def output_path(name: str) -> str:
    """A new file in the first ternary folder: ``name`` itself, or ``name_00001`` and on.

    Never returns an existing file (or link): saving must not overwrite a user's model. The
    path is resolved (links followed) and must stay inside the folder, so a link that already
    exists there (``linked/escaped`` with ``linked`` pointing elsewhere) cannot lead a save out.
    """
    folder = _first_folder()
    stem = name.strip()  # a widget's stray spaces would end up in the file name
    stem = stem.removesuffix(".safetensors")
    if not stem or os.path.isabs(stem) or ".." in stem.replace("\\", "/").split("/"):
        raise ValueError(f"invalid file name {name!r}: give a name inside models/ternary")
    path = os.path.join(folder, f"{stem}.safetensors")
    counter = 1
    while os.path.lexists(path):
        path = os.path.join(folder, f"{stem}_{counter:05d}.safetensors")
        counter += 1
    real = os.path.realpath(path)
    if os.path.commonpath([folder, real]) != folder:
        raise ValueError(
            f"invalid file name {name!r}: it leads through a link to {os.path.dirname(real)}, "
            "outside models/ternary; give a name inside it"
        )
    return real
