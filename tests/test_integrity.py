"""Checksums of the files the pack reads back: zip CRCs of torch.save files, tensor digests
of safetensors files."""

import zipfile

import pytest
import torch
from safetensors.torch import save_file

from comfyui_ternary_flux.ternary.integrity import (
    DamagedFileError,
    check_zip,
    read_checked,
    tensor_digest,
    write_checked,
)


def flip_member_byte(path, member_part="/data/"):
    """Flip one byte inside the stored data of the first zip member whose name contains
    ``member_part``; returns the member's name."""
    with zipfile.ZipFile(path) as archive:
        member = next(i for i in archive.infolist() if member_part in i.filename)
    data = bytearray(path.read_bytes())
    start = member.header_offset + 30 + len(member.filename) + len(member.extra)
    data[start + member.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return member.filename


@pytest.mark.parametrize("member", ["/data/", "data.pkl"])
def test_a_flipped_byte_in_a_torch_file_is_found_and_named(tmp_path, member):
    path = tmp_path / "state.pt"
    torch.save({"a": torch.randn(64), "b": torch.arange(10)}, path)
    check_zip(path)
    name = flip_member_byte(path, member)
    with pytest.raises(DamagedFileError, match=rf"state.pt: damaged: member {name} does not"):
        check_zip(path, "restore it")
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DamagedFileError, match=r"state.pt: damaged archive"):
        check_zip(path)


def test_tensor_digest_sees_every_byte_name_dtype_and_shape():
    tensors = {"x": torch.arange(12, dtype=torch.float32), "y": torch.ones(3, dtype=torch.bfloat16)}
    digest = tensor_digest(tensors)
    assert tensor_digest({k: v.clone() for k, v in reversed(tensors.items())}) == digest
    flipped = tensors["x"].clone()
    flipped.view(torch.uint8)[5] ^= 1
    changes = [
        {**tensors, "x": flipped},
        {**tensors, "x": tensors["x"].reshape(3, 4)},
        {**tensors, "y": tensors["y"].half()},
        {"x2": tensors["x"], "y": tensors["y"]},
    ]
    assert all(tensor_digest(change) != digest for change in changes)


def test_checked_files_come_back_whole_or_are_refused(tmp_path):
    path = tmp_path / "piece.safetensors"
    tensors = {"b": torch.arange(6, dtype=torch.uint8), "a": torch.ones(2, 3)}
    write_checked(path, tensors, {"note": "kept"})
    first = path.read_bytes()
    write_checked(path, tensors, {"note": "kept"})  # replaced, to the same bytes
    assert path.read_bytes() == first and not list(tmp_path.glob(".*partial"))
    read, metadata = read_checked(path)
    assert metadata["note"] == "kept" and all(torch.equal(read[k], t) for k, t in tensors.items())
    data = bytearray(first)
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match="piece.safetensors: damaged: its tensors do not"):
        read_checked(path)
    path.write_bytes(first[:-4])  # cut short
    with pytest.raises(DamagedFileError, match=r"piece.safetensors: not a readable block \("):
        read_checked(path, "block")
    save_file(tensors, str(path))  # no digest: refused unless the reader accepts older files
    with pytest.raises(DamagedFileError, match="no sha256 of its tensors in its header; not a "):
        read_checked(path)
    assert torch.equal(read_checked(path, required=False)[0]["b"], tensors["b"])
