"""Calibration prompts: the seeded generator and the prompt-file reader."""

import json

import pytest

from comfyui_ternary_flux.distill.prompts import (
    CATEGORIES,
    COLORS,
    SHAPES,
    SPATIAL_RELATIONS,
    TEXTURES,
    PromptFileError,
    generate_prompts,
    generate_tagged_prompts,
    read_prompt_file,
)


def test_generator_is_deterministic_and_seed_dependent():
    assert generate_prompts(50, seed=3) == generate_prompts(50, seed=3)
    assert generate_prompts(50, seed=3) != generate_prompts(50, seed=4)
    # A longer list starts with the shorter one: n does not change earlier prompts.
    assert generate_prompts(80, seed=3)[:50] == generate_prompts(50, seed=3)


def test_generator_covers_every_category_with_distinct_prompts():
    prompts = generate_tagged_prompts(600, seed=0)
    assert len({p.text for p in prompts}) == 600
    counts = {c: sum(p.category == c for p in prompts) for c in CATEGORIES}
    assert counts == {c: 100 for c in CATEGORIES}
    assert {p.category for p in generate_tagged_prompts(6, seed=9)} == set(CATEGORIES)


@pytest.mark.parametrize(
    "category, words",
    [("color", COLORS), ("shape", SHAPES), ("texture", TEXTURES), ("spatial", SPATIAL_RELATIONS)],
)
def test_prompts_of_a_category_use_its_vocabulary(category, words):
    for prompt in generate_tagged_prompts(60, seed=1):
        if prompt.category == category:
            subject = prompt.text.split(" in ")[0].split(" on a ")[0]
            assert any(f" {word} " in f" {subject} " for word in words), prompt.text


def test_complex_prompts_combine_attributes_and_relations():
    for prompt in generate_tagged_prompts(60, seed=2):
        if prompt.category == "complex":
            assert any(f" {c} " in prompt.text for c in COLORS)
            assert any(f" {t} " in prompt.text for t in TEXTURES)
            assert " while " in prompt.text


def test_generator_rejects_negative_counts():
    assert generate_prompts(0) == []
    with pytest.raises(ValueError, match="non-negative"):
        generate_prompts(-1)


def test_txt_one_prompt_per_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\ufeffa red cube\n\n  a blue ball  \n", encoding="utf-8")
    assert read_prompt_file(path) == ["a red cube", "a blue ball"]


def test_csv_prompt_column_or_first_column(tmp_path):
    with_header = tmp_path / "h.csv"
    with_header.write_text('seed,Prompt\n1,"a cat, sleeping"\n2,a dog\n', encoding="utf-8")
    assert read_prompt_file(with_header) == ["a cat, sleeping", "a dog"]
    no_header = tmp_path / "n.csv"
    no_header.write_text("a cat,3\n\na dog,4\n", encoding="utf-8")
    assert read_prompt_file(no_header) == ["a cat", "a dog"]


def test_json_strings_or_objects(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["a cat", {"prompt": "a dog", "seed": 1}]), encoding="utf-8")
    assert read_prompt_file(path) == ["a cat", "a dog"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "\n  \n", "contains no prompts"),
        ("empty.json", "[]", "contains no prompts"),
        ("empty.csv", "prompt\n", "contains no prompts"),
        ("bad.json", "[1, 2", "not valid JSON"),
        ("dict.json", '{"prompt": "a cat"}', "expected a JSON list"),
        ("item.json", '["a cat", {"text": "a dog"}]', "item 1"),
        ("cell.csv", "prompt,seed\na cat,1\n,2\n", "line 3 has no prompt"),
        ("p.yaml", "- a cat", "unknown prompt file type"),
    ],
)
def test_bad_prompt_files_raise_clear_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptFileError, match=message):
        read_prompt_file(path)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        read_prompt_file(tmp_path / "missing.txt")
    path = tmp_path / "binary.txt"
    path.write_bytes(b"\xff\xfe\x00a")
    with pytest.raises(PromptFileError, match="not UTF-8"):
        read_prompt_file(path)
