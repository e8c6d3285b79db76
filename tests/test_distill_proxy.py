"""The distillation proxy: its metrics against closed forms, its data, and a tiny full run."""

import dataclasses
import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the proxy's digits come from scikit-learn")

from comfyui_ternary_flux.bench import distill_proxy  # noqa: E402
from comfyui_ternary_flux.bench.proxy_metrics import (  # noqa: E402
    frechet_distance,
    gaussian_frechet_distance,
)


def random_covariance(gen: torch.Generator, dim: int) -> torch.Tensor:
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    return a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)


def test_gaussian_frechet_distance_matches_closed_form_for_commuting_covariances():
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    var_a = torch.rand(8, generator=gen, dtype=torch.float64) + 0.5
    var_b = torch.rand(8, generator=gen, dtype=torch.float64) + 0.5
    mean_a, mean_b = torch.randn(2, 8, generator=gen, dtype=torch.float64)
    closed_form = (mean_a - mean_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum()
    got = gaussian_frechet_distance(
        mean_a, q @ torch.diag(var_a) @ q.T, mean_b, q @ torch.diag(var_b) @ q.T
    )
    assert got == pytest.approx(float(closed_form), rel=1e-10)


def test_gaussian_frechet_distance_matches_eigenvalues_of_the_product():
    # tr (C_a C_b)^1/2 = sum of square roots of the (real, non-negative) eigenvalues of C_a C_b.
    gen = torch.Generator().manual_seed(2)
    cov_a, cov_b = random_covariance(gen, 12), random_covariance(gen, 12)
    mean_a, mean_b = torch.randn(2, 12, generator=gen, dtype=torch.float64)
    eigenvalues = np.linalg.eigvals(cov_a.numpy() @ cov_b.numpy()).real.clip(min=0)
    expected = (
        float((mean_a - mean_b).square().sum())
        + float(cov_a.trace() + cov_b.trace())
        - 2 * np.sqrt(eigenvalues).sum()
    )
    assert gaussian_frechet_distance(mean_a, cov_a, mean_b, cov_b) == pytest.approx(expected)


def test_frechet_distance_of_shifted_and_scaled_samples_is_exact():
    # For b = c * a + shift the sample moments are exactly mean_a * c + shift and c^2 C_a,
    # so the distance is |(c - 1) mean_a + shift|^2 + (c - 1)^2 tr C_a, whatever the sample.
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2000, 6, generator=gen, dtype=torch.float64) @ torch.randn(
        6, 6, generator=gen, dtype=torch.float64
    )
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0], dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()))
    expected = (a.mean(0) + shift).square().sum() + a.T.cov().trace()
    assert frechet_distance(a, 2 * a + shift) == pytest.approx(float(expected))


def test_frechet_distance_of_gaussian_samples_approaches_the_population_value():
    gen = torch.Generator().manual_seed(4)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0])
    a = torch.randn(40_000, 4, generator=gen, dtype=torch.float64)
    b = 3 * torch.randn(40_000, 4, generator=gen, dtype=torch.float64) + shift
    # N(0, I) vs N(shift, 9 I): |shift|^2 + 4 * (1 - 3)^2 = 21.25; sampling error ~0.1.
    assert frechet_distance(a, b) == pytest.approx(21.25, abs=0.4)


def test_frechet_distance_rejects_mismatched_sets():
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(torch.randn(1, 3), torch.randn(10, 3))


def test_recovered_share():
    # Accuracy: higher is better; Frechet distance: lower is better. Same formula for both.
    assert distill_proxy.recovered_share(0.9, 0.5, 0.86) == pytest.approx(0.9)
    assert distill_proxy.recovered_share(1.0, 11.0, 2.0) == pytest.approx(0.9)
    assert distill_proxy.recovered_share(0.9, 0.9, 0.8) is None


def test_digits_split_is_stratified_disjoint_and_scaled():
    digits = distill_proxy.load_digits(16, seed=0)
    assert len(digits.train_labels) + len(digits.test_labels) == 1797
    assert digits.train_images.shape[1:] == (1, 16, 16)
    assert digits.train_images.min() >= -1 and digits.train_images.max() <= 1
    for digit in range(10):
        share = (digits.test_labels == digit).sum() / (digits.train_labels == digit).sum()
        assert 0.2 < share < 0.3
    again = distill_proxy.load_digits(16, seed=0)
    assert torch.equal(again.test_images, digits.test_images)
    assert not torch.equal(distill_proxy.load_digits(16, seed=1).test_labels, digits.test_labels)


def test_latent_is_flux_shaped_and_round_trips():
    images = torch.randn(3, 1, 32, 32)
    latents = distill_proxy.to_latent(images)
    assert latents.shape == (3, 16, 8, 8)
    assert torch.equal(distill_proxy.to_images(latents), images)


def test_tiny_end_to_end_run(tmp_path, capsys):
    """The whole pipeline on the tiny setting: teacher, teacher data, calibrated quantizer,
    both student starts, trainer, ablations, metrics, files, and the summary over seeds."""
    args = ["--size", "tiny", "--out", str(tmp_path), "--device", "cpu", "--ablations"]
    assert distill_proxy.main(args) == 0
    result = json.loads((tmp_path / "distill_proxy_tiny_seed0.json").read_text())
    rows = result["rows"]
    assert list(rows) == list(distill_proxy.ROWS)
    assert rows["teacher"]["velocity_mse"] == 0.0
    # Calibration, residual-SVD LoRA and training all bring the student closer to the teacher
    plain = rows["plain ternary"]["velocity_mse"]
    for name in ("calibrated ternary + LoRA", "distilled ternary + LoRA"):
        assert 0 < rows[name]["velocity_mse"] < plain, name
        assert set(rows[name]["recovered_share"]) == {"accuracy", "frechet_distance"}
    calibrated = rows["calibrated ternary + LoRA"]
    assert calibrated["median_output_error_calibrated"] < calibrated["median_output_error_plain"]
    assert (
        rows["distilled from calibrated"]["distill_loss"]["first_step"]
        < (rows["distilled ternary + LoRA"]["distill_loss"]["first_step"])
    )  # the calibrated start is a better start
    assert [a.name for a in distill_proxy.ABLATIONS] == list(result["ablations"])
    assert result["ablations"]["distill: calibrated start, half the steps"]["steps"] == 2
    for row in [*rows.values(), *result["ablations"].values()]:
        assert 0 <= row["accuracy"] <= 1 and row["frechet_distance"] >= 0
    table = (tmp_path / "distill_proxy_tiny_seed0.md").read_text()
    assert "| distilled from calibrated |" in table and "Ablations:" in table
    assert table in capsys.readouterr().out
    with pytest.raises(SystemExit):
        distill_proxy.main(args)  # no silent overwrite
    assert distill_proxy.main(["--size", "tiny", "--out", str(tmp_path), "--summarize"]) == 0
    summary = (tmp_path / "distill_proxy_tiny_summary.md").read_text()
    assert "seeds 0:" in summary and "| distilled from calibrated |" in summary


def seed_result(seed: int, share: float) -> dict:
    """A small-size result of one seed whose trained rows all recover ``share`` of accuracy."""
    rows = {n: {"velocity_mse": 0.1, "accuracy": 0.5, "frechet_distance": 9.0}
            for n in distill_proxy.ROWS}  # fmt: skip
    for name in distill_proxy.ROWS[2:]:
        rows[name]["recovered_share"] = {"accuracy": share, "frechet_distance": 0.5}
    return {"size": "small", "seed": seed, "rows": rows, "ablations": {}}


def test_summary_gives_mean_and_range_over_seeds():
    text = distill_proxy.summarize([seed_result(0, 0.9), seed_result(1, 0.96)])
    assert "| distilled from calibrated | 93.0 % [90.0, 96.0] | 50.0 % [50.0, 50.0] |" in text


def test_teacher_training_is_deterministic():
    size = dataclasses.replace(distill_proxy.SIZES["tiny"], teacher_steps=3)
    digits = distill_proxy.load_digits(4 * size.latent_side, seed=0)
    latents = distill_proxy.to_latent(digits.train_images)
    prompts = distill_proxy.DigitPrompts(seed=0)
    first, second = (
        distill_proxy.train_teacher(size, latents, digits.train_labels, prompts, seed=5)
        for _ in range(2)
    )
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_variant_picks_ablations_by_name_and_refuses_unknown_ones(capsys):
    names = ["distill: svd start, half the steps", "PTQ: no LoRA (rank 0)"]
    picked = distill_proxy.ablation_variants(names)
    assert [v.name for v in picked] == ["PTQ: no LoRA (rank 0)", names[0]]  # ABLATIONS' order
    assert distill_proxy.ablation_variants(None) == distill_proxy.ABLATIONS
    assert distill_proxy.ablation_variants([]) == ()
    with pytest.raises(SystemExit):
        distill_proxy.main(["--size", "tiny", "--variant", "no such variant"])
    assert "unknown variant(s) ['no such variant']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        distill_proxy.main(["--size", "tiny", "--ablations", "--variant", names[0]])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--held-out", "2"], "use it with --summarize"),
        (["--summarize", "--held-out", "2,x"], "comma-separated seeds (numbers), got '2,x'"),
    ],
)
def test_held_out_seeds_are_checked(args, message, capsys):
    with pytest.raises(SystemExit):
        distill_proxy.main(["--size", "tiny", *args])
    assert message in capsys.readouterr().err


def test_summary_keeps_held_out_seeds_apart():
    results = [
        seed_result(3, 0.98),
        seed_result(0, 0.9),
        seed_result(1, 0.96),
        seed_result(2, 0.97),
    ]
    text = distill_proxy.summary_text(results, held_out={2, 3})
    chosen, held_out, every = text.split("## ")[1:]
    assert chosen.startswith("Seeds the recipes were chosen on") and "seeds 0, 1:" in chosen
    assert "| distilled from calibrated | 93.0 % [90.0, 96.0] |" in chosen
    assert held_out.startswith("Held-out seeds") and "seeds 2, 3:" in held_out
    assert "| distilled from calibrated | 97.5 % [97.0, 98.0] |" in held_out
    assert "seeds 0, 1, 2, 3:" in every
    assert distill_proxy.summary_text(results, set()) == distill_proxy.summarize(
        sorted(results, key=lambda r: r["seed"])
    )


def stop_at(monkeypatch, stage: str, nth: int = 1) -> list[str]:
    """Make the run's deadline pass at the ``nth`` time it asks about ``stage`` (as a time
    limit would); returns the stages asked about."""
    asked: list[str] = []

    def passed(self, name: str) -> bool:
        asked.append(name)
        return name == stage and asked.count(stage) == nth

    monkeypatch.setattr(distill_proxy.Deadline, "passed", passed)
    return asked


def without_seconds(table: dict) -> dict:
    return {name: {k: v for k, v in row.items() if k != "seconds"} for name, row in table.items()}


def test_teacher_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, monkeypatch):
    size = dataclasses.replace(distill_proxy.SIZES["tiny"], teacher_steps=6)
    digits = distill_proxy.load_digits(4 * size.latent_side, seed=0)
    args = (size, distill_proxy.to_latent(digits.train_images), digits.train_labels,
            distill_proxy.DigitPrompts(seed=0), 5)  # fmt: skip
    whole = distill_proxy.train_teacher(*args).state_dict()
    monkeypatch.setattr(distill_proxy, "TEACHER_CHECKPOINT_EVERY", 2)
    checkpoint = tmp_path / "teacher.pt"

    class Killed(Exception):
        pass

    def killed_before_step_4(self, stage: str) -> bool:
        if stage == "teacher step 4/6":
            raise Killed  # no chance to save: the periodic checkpoint (step 2) is what is left
        return False

    monkeypatch.setattr(distill_proxy.Deadline, "passed", killed_before_step_4)
    with pytest.raises(Killed):
        distill_proxy.train_teacher(
            *args, checkpoint=checkpoint, deadline=distill_proxy.Deadline(1)
        )
    assert torch.load(checkpoint, weights_only=True)["step"] == 2
    stop_at(monkeypatch, "teacher step 6/6")  # a time limit: saved at the stop
    with pytest.raises(distill_proxy.Stopped, match="teacher step 6/6"):
        distill_proxy.train_teacher(
            *args, checkpoint=checkpoint, deadline=distill_proxy.Deadline(1)
        )
    assert torch.load(checkpoint, weights_only=True)["step"] == 5
    resumed = distill_proxy.train_teacher(*args, checkpoint=checkpoint).state_dict()
    for key, value in whole.items():
        assert torch.equal(value, resumed[key]), key


def test_run_cut_by_time_limits_and_resumed_gives_the_rows_of_one_run(
    tmp_path, monkeypatch, capsys
):
    """Stopped inside the teacher loop, between teacher data shards, at a row, inside a
    distillation and between a finished distillation and its samples: the rows, bit for bit."""
    settings = distill_proxy.teacher_settings
    monkeypatch.setattr(  # 20 prompts: three shards, so the builder can stop between them
        distill_proxy, "teacher_settings",
        lambda size, seed: dataclasses.replace(settings(size, seed), shard_size=8),
    )  # fmt: skip
    monkeypatch.setattr(distill_proxy, "TEACHER_CHECKPOINT_EVERY", 5)
    monkeypatch.setattr(distill_proxy, "DISTILL_CHECKPOINT_EVERY", 2)
    variant = "distill: svd start, half the steps"
    args = ["--size", "tiny", "--device", "cpu", "--variant", variant]
    assert distill_proxy.main([*args, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "distill_proxy_tiny_seed0.json").read_text())

    work = tmp_path / "work"
    cut = [*args, "--out", str(tmp_path / "cut"), "--work", str(work), "--time-limit", "100"]
    stops = [
        ("teacher step 8/20", 1),
        ("teacher data", 2),  # before the second shard
        ("plain ternary", 1),
        ("distilled ternary + LoRA: samples", 1),  # trained, not yet measured
        ("distilled from calibrated: step 3/5", 1),
        (f"{variant}: step 2/2", 1),
    ]
    capsys.readouterr()
    for stage, nth in stops:
        asked = stop_at(monkeypatch, stage, nth)
        assert distill_proxy.main(cut) == distill_proxy.STOPPED, stage
        assert asked[-1] == stage
        said = capsys.readouterr().out.splitlines()[-1]  # (the CLI's student prints too)
        where = "teacher data (8/20 prompts)" if stage == "teacher data" else stage
        assert said == f"stopped at {where}; rerun the same command to continue"
        if stage.startswith("teacher step"):
            assert torch.load(work / "teacher.checkpoint.pt", weights_only=True)["step"] == 7
        if stage == "teacher data":
            manifest = json.loads((work / "teacher_data" / "manifest.json").read_text())
            assert not manifest["complete"] and len(manifest["shards"]) == 1
        if stage.startswith("distilled from calibrated"):
            spent = json.loads((work / "spent.json").read_text())
            cut_seconds = spent["rows"]["distilled from calibrated"]
    assert not (work / "teacher.checkpoint.pt").exists()  # the teacher's file took its place
    monkeypatch.setattr(distill_proxy.Deadline, "passed", lambda self, stage: False)
    assert distill_proxy.main(cut) == 0
    resumed = json.loads((tmp_path / "cut" / "distill_proxy_tiny_seed0.json").read_text())
    assert without_seconds(resumed["rows"]) == without_seconds(whole["rows"])
    assert without_seconds(resumed["ablations"]) == without_seconds(whole["ablations"])
    assert resumed["real_digits"] == whole["real_digits"]
    assert resumed["calls"] == len(stops) + 1 and whole["calls"] == 1
    table = (tmp_path / "cut" / "distill_proxy_tiny_seed0.md").read_text()
    assert f"in {len(stops) + 1} calls on cpu" in table
    # a distillation cut in two calls counts the time of both
    assert resumed["rows"]["distilled from calibrated"]["seconds"] > cut_seconds > 0


def test_time_limit_stops_the_command_and_a_work_folder_serves_only_its_run(tmp_path, capsys):
    work = tmp_path / "work"
    args = ["--size", "tiny", "--device", "cpu", "--out", str(tmp_path), "--work", str(work)]
    assert distill_proxy.main([*args, "--time-limit", "0"]) == distill_proxy.STOPPED
    assert capsys.readouterr().out == (
        "stopped at classifier; rerun the same command to continue\n"
    )  # nothing may start after 0 s
    assert json.loads((work / "spent.json").read_text())["calls"] == 1
    assert not (work / "classifier.safetensors").exists()
    with pytest.raises(SystemExit):
        distill_proxy.main([*args, "--seed", "1"])
    assert (
        "holds the proxy run of size tiny, seed 0, device cpu, not this command's (different: seed)"
        in (capsys.readouterr().err)
    )
    with pytest.raises(SystemExit):
        distill_proxy.main([*args[:-2], "--time-limit", "5"])
    assert "--time-limit needs --work" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not the proxy's")
    with pytest.raises(SystemExit):
        distill_proxy.main([*args[:-1], str(tmp_path / "other")])
    assert "holds no proxy.json: not a proxy work folder" in capsys.readouterr().err


def test_every_row_has_its_own_file_in_a_work_folder():
    names = [*distill_proxy.ROWS, *(variant.name for variant in distill_proxy.ABLATIONS)]
    stems = {distill_proxy.row_file_stem(name) for name in names}
    assert len(stems) == len(names)
    assert all(stem and set(stem) <= set("abcdefghijklmnopqrstuvwxyz0123456789-") for stem in stems)
