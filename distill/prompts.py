"""Calibration prompts for distillation: read a user's prompt file, or generate varied prompts.

The generator covers the six categories of T2I-CompBench (colour, shape and texture binding,
spatial and non-spatial relations, complex scenes), so that a student trained on its prompts
sees the compositional cases where a quantized model fails first. It is deterministic from a
seed: the same (n, seed) gives the same list on every machine.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

CATEGORIES = ("color", "shape", "texture", "spatial", "non-spatial", "complex")
PROMPT_FILE_SUFFIXES = (".txt", ".csv", ".json")

OBJECTS = (
    "apple", "backpack", "ball", "bench", "bicycle", "book", "bottle", "bowl", "box",
    "candle", "car", "chair", "clock", "cup", "door", "guitar", "hat", "kite", "lamp",
    "mirror", "mug", "pillow", "plate", "suitcase", "table", "teapot", "umbrella", "vase",
    "violin", "wallet", "watch", "window", "boat", "train", "house", "tower", "bridge",
    "bucket", "shoe", "scarf",
)  # fmt: skip
AGENTS = (
    "woman", "man", "girl", "boy", "old man", "young woman", "chef", "astronaut", "knight",
    "robot", "dog", "cat", "horse", "fox", "bear", "owl", "rabbit", "monkey", "panda",
    "elephant",
)  # fmt: skip
COLORS = (
    "red", "blue", "green", "yellow", "orange", "purple", "pink", "black", "white", "brown",
    "gray", "golden", "silver", "turquoise", "crimson", "teal",
)  # fmt: skip
SHAPES = (
    "round", "square", "triangular", "oval", "rectangular", "hexagonal", "cylindrical",
    "spherical", "conical", "cubic", "heart-shaped", "star-shaped", "tall", "flat",
)  # fmt: skip
TEXTURES = (
    "wooden", "metallic", "glass", "leather", "fluffy", "plastic", "rubber", "knitted",
    "stone", "ceramic", "velvet", "marble", "paper", "furry", "rusty", "woven",
)  # fmt: skip
SPATIAL_RELATIONS = (
    "on the left of", "on the right of", "on top of", "under", "next to", "near",
    "in front of", "behind", "above", "below", "inside", "beside",
)  # fmt: skip
ACTIONS = (
    "holding", "looking at", "playing with", "carrying", "painting", "pushing", "pulling",
    "sitting on", "standing next to", "reaching for", "hiding behind", "throwing",
)  # fmt: skip
SETTINGS = (
    "in a kitchen", "on a beach", "in a forest", "on a city street", "in a library",
    "in a desert", "on a snowy mountain", "in a garden", "in an empty room", "at night",
    "under a cloudy sky", "in a workshop",
)  # fmt: skip
STYLES = (
    "photograph", "oil painting", "watercolor", "3D render", "pencil sketch", "anime style",
    "pixel art", "cinematic still", "studio photo", "isometric illustration",
    "children's book illustration", "film photograph",
)  # fmt: skip
COMPOSITIONS = (
    "close-up", "wide shot", "top-down view", "centered composition", "rule of thirds",
    "shallow depth of field", "low angle", "symmetrical composition", "soft lighting",
    "dramatic lighting",
)  # fmt: skip


class PromptFileError(ValueError):
    """A prompt file that cannot be read as prompts: empty, malformed or of unknown type."""


@dataclass(frozen=True)
class Prompt:
    """A generated prompt and the T2I-CompBench category it exercises."""

    text: str
    category: str


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _thing(rng: random.Random, adjectives: tuple[str, ...], nouns: tuple[str, ...]) -> str:
    phrase = f"{rng.choice(adjectives)} {rng.choice(nouns)}"
    return f"{_article(phrase)} {phrase}"


def _subject(category: str, rng: random.Random) -> str:
    """The compositional core of a prompt of one category."""
    if category in ("color", "shape", "texture"):
        words = {"color": COLORS, "shape": SHAPES, "texture": TEXTURES}[category]
        return f"{_thing(rng, words, OBJECTS)} and {_thing(rng, words, OBJECTS)}"
    if category == "spatial":
        first, second = rng.sample(OBJECTS, 2)
        relation = rng.choice(SPATIAL_RELATIONS)
        return f"{_article(first)} {first} {relation} {_article(second)} {second}"
    agent, thing = rng.choice(AGENTS), rng.choice(OBJECTS)
    if category == "non-spatial":
        return f"{_article(agent)} {agent} {rng.choice(ACTIONS)} {_article(thing)} {thing}"
    first = _thing(rng, COLORS, OBJECTS)
    second = _thing(rng, TEXTURES, OBJECTS)
    return (
        f"{first} {rng.choice(SPATIAL_RELATIONS)} {second} while {_article(agent)} {agent} is "
        f"{rng.choice(ACTIONS)} {_thing(rng, SHAPES, (thing,))}"
    )


def generate_tagged_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """n distinct prompts, categories in turn (any n >= 6 covers all six), from a seed."""
    if n < 0:
        raise ValueError(f"number of prompts must be non-negative, got {n}")
    rng = random.Random(seed)
    prompts: list[Prompt] = []
    seen: set[str] = set()
    while len(prompts) < n:
        category = CATEGORIES[len(prompts) % len(CATEGORIES)]
        for _ in range(1000):
            text = (
                f"{_subject(category, rng)} {rng.choice(SETTINGS)}, "
                f"{rng.choice(STYLES)}, {rng.choice(COMPOSITIONS)}"
            )
            if text not in seen:
                break
        else:
            raise ValueError(f"cannot make {n} distinct prompts; ask for fewer")
        seen.add(text)
        prompts.append(Prompt(text, category))
    return prompts


def generate_prompts(n: int, seed: int = 0) -> list[str]:
    """The texts of ``generate_tagged_prompts(n, seed)``."""
    return [p.text for p in generate_tagged_prompts(n, seed)]


def _read_txt(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_csv(text: str, name: str) -> list[str]:
    """The 'prompt' column if the first row names one, else the first column of every row."""
    reader = csv.reader(text.splitlines())
    rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    if not rows:
        return []
    header = [cell.strip().lower() for cell in rows[0][1]]
    if "prompt" in header:
        column, rows = header.index("prompt"), rows[1:]
    else:
        column = 0
    prompts = []
    for line, row in rows:
        cell = row[column].strip() if column < len(row) else ""
        if not cell:
            raise PromptFileError(f"{name}: line {line} has no prompt in column {column + 1}")
        prompts.append(cell)
    return prompts


def _read_json(text: str, name: str) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptFileError(f"{name}: not valid JSON ({error})") from None
    if not isinstance(data, list):
        raise PromptFileError(
            f"{name}: expected a JSON list of strings or of objects with a 'prompt', "
            f"got {type(data).__name__}"
        )
    prompts = []
    for index, item in enumerate(data):
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptFileError(
                f"{name}: item {index} is not a non-empty string or an object with a "
                f"non-empty 'prompt' string: {json.dumps(item)[:80]}"
            )
        prompts.append(prompt.strip())
    return prompts


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a .txt (one per line, blank lines skipped), .csv or .json file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in PROMPT_FILE_SUFFIXES:
        raise PromptFileError(
            f"{path}: unknown prompt file type {suffix or '(none)'!r}; "
            f"expected one of {', '.join(PROMPT_FILE_SUFFIXES)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise PromptFileError(f"{path}: not UTF-8 text ({error.reason})") from None
    if suffix == ".txt":
        prompts = _read_txt(text)
    elif suffix == ".csv":
        prompts = _read_csv(text, str(path))
    else:
        prompts = _read_json(text, str(path))
    if not prompts:
        raise PromptFileError(f"{path}: contains no prompts")
    return prompts
