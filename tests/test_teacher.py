"""Teacher data set: what is stored, resuming, sharding rules, and FLUX's schedule."""

import json
import math

import pytest
import torch
from distill_helpers import PROMPTS, SETTINGS, build_data, teacher_state, tiny_encoder

from comfyui_ternary_flux.distill.schedule import (
    resolution_shift,
    sampling_sigmas,
    shift_time,
)
from comfyui_ternary_flux.distill.teacher import (
    TeacherDataError,
    TeacherDataset,
    TeacherSettings,
    build_teacher_dataset,
    euler_sample,
    read_manifest,
    shard_name,
)
from comfyui_ternary_flux.models.flux1_torch import flux_from_state_dict


def test_shift_follows_flux_resolution_rule():
    assert resolution_shift(1024, 1024) == pytest.approx(1.15)
    assert resolution_shift(256, 256) == pytest.approx(0.5)
    assert resolution_shift(512, 512) == pytest.approx(0.5 + 0.65 * 768 / 3840)
    with pytest.raises(ValueError, match="multiples of 16"):
        resolution_shift(1000, 1024)


def test_sampling_sigmas_match_the_shift_formula():
    sigmas = sampling_sigmas(4, 1.15)
    assert sigmas[0] == 1 and sigmas[-1] == 0
    u = 0.25
    assert sigmas[3] == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1 / u - 1), rel=1e-12)
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    assert shift_time(torch.tensor([0.5]), 0.0).item() == pytest.approx(0.5)


def test_euler_reaches_z0_for_a_straight_path():
    """On a straight path z_t = (1 - t) z0 + t eps the velocity is eps - z0, and Euler from
    t = 1 lands exactly on z0: the sign and time conventions of the sampler."""
    z0, eps = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    out = euler_sample(lambda z, t, c: eps - z0, eps, {}, sampling_sigmas(5, 1.15))
    torch.testing.assert_close(out, z0)


def test_data_set_stores_teacher_velocities_at_reconstructed_points(tmp_path):
    manifest = build_data(tmp_path / "data")
    assert manifest["complete"] and manifest["done_prompts"] == len(PROMPTS)
    assert len(manifest["shards"]) == 3 and manifest["bytes"] == sum(
        (tmp_path / "data" / s["file"]).stat().st_size for s in manifest["shards"]
    )
    data = TeacherDataset(tmp_path / "data")
    assert len(data) == len(PROMPTS) * SETTINGS.points_per_prompt
    teacher = flux_from_state_dict(teacher_state(), dtype=torch.float32).eval()
    for index in (0, 5, 11):
        ex = data.example(index)
        assert ex["z_t"].shape == (16, 8, 8) and 0 < ex["t"] <= 1
        with torch.no_grad():
            v = teacher(ex["z_t"][None], ex["t"][None], ex["context"][None],
                        ex["pooled"][None], ex["guidance"][None])  # fmt: skip
        torch.testing.assert_close(v[0], ex["v"], rtol=1e-4, atol=1e-4)
    context, _ = tiny_encoder()(PROMPTS[2])
    torch.testing.assert_close(data.example(2 * 2)["context"], context)


def test_resume_skips_finished_shards(tmp_path):
    build_data(tmp_path / "data")
    (tmp_path / "data" / shard_name(1)).unlink()
    before = (tmp_path / "data" / shard_name(0)).stat().st_mtime_ns
    encoded = []
    teacher = flux_from_state_dict(teacher_state(), dtype=torch.float32).eval()
    encoder = tiny_encoder()

    def encode(prompt):
        encoded.append(prompt)
        return encoder(prompt)

    manifest = build_teacher_dataset(
        tmp_path / "data", PROMPTS, encode,
        lambda z, t, c: teacher(z, t, c["context"], c["pooled"], c["guidance"]),
        SETTINGS, log=lambda _: None,
    )  # fmt: skip
    assert encoded == PROMPTS[2:4]
    assert manifest["complete"]
    assert (tmp_path / "data" / shard_name(0)).stat().st_mtime_ns == before


def test_other_settings_or_prompts_are_refused(tmp_path):
    build_data(tmp_path / "data", prompts=PROMPTS[:2])
    changed = TeacherSettings(**{**SETTINGS.__dict__, "steps": 4})
    with pytest.raises(TeacherDataError, match="steps 3 there, 4 now"):
        build_data(tmp_path / "data", settings=changed, prompts=PROMPTS[:2])
    with pytest.raises(TeacherDataError, match="other prompts"):
        build_data(tmp_path / "data", prompts=PROMPTS[:3])


def test_incomplete_data_set_is_refused_for_training(tmp_path):
    build_data(tmp_path / "data")
    (tmp_path / "data" / shard_name(2)).unlink()
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    manifest["complete"] = False
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TeacherDataError, match="incomplete"):
        TeacherDataset(tmp_path / "data")
    with pytest.raises(TeacherDataError, match="not a teacher data set"):
        read_manifest(tmp_path)


def test_bad_settings_are_refused():
    with pytest.raises(TeacherDataError, match="unknown teacher setting"):
        TeacherSettings.from_dict({"stpes": 3})
    with pytest.raises(TeacherDataError, match="points_per_prompt"):
        TeacherSettings(points_per_prompt=0)
    # from a config file: the wrong type is named (a string width was a formatting error)
    with pytest.raises(TeacherDataError, match="width must be int, got '64'"):
        TeacherSettings.from_dict({"width": "64"})
    with pytest.raises(TeacherDataError, match="guidance must be float, got True"):
        TeacherSettings.from_dict({"guidance": True})
    with pytest.raises(TeacherDataError, match="storage_dtype must be str, got 16"):
        TeacherSettings.from_dict({"storage_dtype": 16})
    assert TeacherSettings.from_dict({"guidance": 4, "shift": None}).guidance == 4


def _flip_data_byte(path, offset_from_end=100):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x04
    path.write_bytes(bytes(data))


def test_a_damaged_shard_is_refused_by_training_and_rebuilt_by_a_resumed_build(tmp_path):
    data = tmp_path / "data"
    build_data(data)
    good = (data / shard_name(1)).read_bytes()
    _flip_data_byte(data / shard_name(1))
    dataset = TeacherDataset(data)
    dataset.example(0)  # shard 0 is fine
    with pytest.raises(TeacherDataError, match=rf"{shard_name(1)}: damaged: its tensors do not "
                       "match the sha256 in its header; delete it and build"):  # fmt: skip
        dataset.example(4)  # prompt 2, in shard 1
    messages = []
    build_data(data, log=messages.append)
    assert any(f"{shard_name(1)} is damaged or of another build; building it again" in m
               for m in messages)  # fmt: skip
    assert (data / shard_name(1)).read_bytes() == good
    (data / shard_name(2)).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      x")
    with pytest.raises(TeacherDataError, match=rf"{shard_name(2)}: not a readable shard"):
        TeacherDataset(data).example(10)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("shards"), "manifest.json: no usable shard list; build the data set"),
        (lambda m: m.update(shards=[]), "no usable shard list"),
        (lambda m: m.update(shards=[{"file": 3}]), "no usable shard list"),
        (lambda m: m.update(settings="x"), "no usable shard list"),
        (lambda m: m["shards"][0].update(samples=["a"]), "no usable shard list"),
        (lambda m: m.pop("prompts"), "manifest.json: no prompt list; delete it and build"),
        (lambda m: m.pop("prompts") and m.update(complete=False), "no prompt list"),
        (lambda m: m["shards"][0].update(file="shard-09999.safetensors"),
         "shard-09999.safetensors is listed in .*manifest.json but missing"),
        (lambda m: m["settings"].update(width="wide"), "manifest.json: bad settings"),
        ("{not json", "manifest.json: damaged"),
    ],
)  # fmt: skip
def test_broken_manifests_are_named(tmp_path, edit, message):
    data = tmp_path / "data"
    build_data(data, prompts=PROMPTS[:2])
    path = data / "manifest.json"
    if isinstance(edit, str):
        path.write_text(edit)
    else:
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))
    with pytest.raises(TeacherDataError, match=message):
        TeacherDataset(data)


def test_a_manifest_whose_points_disagree_with_its_shards_is_named(tmp_path):
    """points_per_prompt edited by hand: the example read names the shard and both counts
    (an IndexError, or wrong examples, before)."""
    data = tmp_path / "data"
    build_data(data, prompts=PROMPTS[:2])
    path = data / "manifest.json"
    manifest = json.loads(path.read_text())
    stored = manifest["settings"]["points_per_prompt"]
    manifest["settings"]["points_per_prompt"] = stored + 3
    path.write_text(json.dumps(manifest))
    dataset = TeacherDataset(data)
    with pytest.raises(TeacherDataError, match=rf"sample 0 holds {stored} training points, "):
        dataset.example(0)


def test_a_damaged_manifest_is_rewritten_as_its_message_says(tmp_path):
    """Deleted and built again with the same settings and prompts: complete, shards kept (a
    build into the folder with the damaged manifest is refused as training is)."""
    data = tmp_path / "data"
    build_data(data, prompts=PROMPTS[:4])
    shards = {p.name: p.stat().st_mtime_ns for p in data.glob("shard-*")}
    (data / "manifest.json").write_text("{not json")
    with pytest.raises(TeacherDataError, match="delete it and build the data set again") as err:
        TeacherDataset(data)
    with pytest.raises(TeacherDataError, match="manifest.json: damaged"):
        build_data(data, prompts=PROMPTS[:4])
    assert "with the same settings and prompts (finished shards are kept)" in str(err.value)
    (data / "manifest.json").unlink()
    assert build_data(data, prompts=PROMPTS[:4])["complete"]
    assert {p.name: p.stat().st_mtime_ns for p in data.glob("shard-*")} == shards
    assert len(TeacherDataset(data)) == 4 * SETTINGS.points_per_prompt


def test_the_distill_command_names_a_damaged_shard_in_one_line(tmp_path, capsys):
    from distill_helpers import tiny_config, write_teacher_file

    from comfyui_ternary_flux.cli.main import main

    build_data(tmp_path / "data")
    write_teacher_file(tmp_path / "teacher.safetensors")
    config = tiny_config(tmp_path, steps=2).as_dict()
    (tmp_path / "distill.json").write_text(json.dumps(config))
    _flip_data_byte(tmp_path / "data" / shard_name(0))
    assert main(["distill", str(tmp_path / "distill.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {tmp_path / 'data' / shard_name(0)}: damaged" in err
    assert not (tmp_path / "out.safetensors").exists()
