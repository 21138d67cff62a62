"""Web-like caption noise for real image-text data: the weak supervision of alt text, made from clean captions.

ImageBERT's staged pretraining starts on large, noisy web pairs and ends on small, clean ones. To study that at small
scale with real photographs, a clean manifest (human captions) is turned into a noisy one the way crawled alt text
goes wrong (`WebNoise` holds the rates):

- **mismatched** (`mismatch_rate`): the caption belongs to another image (templated pages, galleries whose alt text
  is shifted, shared stock captions);
- **truncated** (`truncate_rate`): only the first 1-3 words survive (length-capped alt attributes, file-name-like
  text);
- **boilerplate** (`boilerplate_rate`): the caption is replaced by page boilerplate ("click to enlarge",
  "IMG_4821.JPG"), or boilerplate is appended to it (half of the cases each).

The kinds are exclusive; the rest of the captions stay clean. The draw of caption j of image i depends only on
`(seed, i, j)`, so the noisy manifest is the same on every machine and for every subset of images.

`write_noisy_manifest` is the one writer of noisy manifest copies: web noise (`write_web_noisy_manifest`) and the
synthetic set's corruption (`corrupted_captions`, the demo's noisy stage) both go through it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..formats.files import atomic_write_text, loads_json
from ..formats.manifest import read_manifest
from .synthetic import corrupt_captions


BOILERPLATE = (
    "click to enlarge",
    "image",
    "photo",
    "untitled",
    "view larger image",
    "stock photo",
    "thumbnail",
    "share this picture",
    "all rights reserved",
    "uploaded by user",
    "picture of the day",
    "see more photos",
)


@dataclass(frozen=True)
class WebNoise:
    """Rates of each kind of caption noise (exclusive; together at most 1)."""

    mismatch_rate: float = 0.3
    truncate_rate: float = 0.15
    boilerplate_rate: float = 0.15

    def __post_init__(self):
        rates = asdict(self)
        for name, rate in rates.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"WebNoise.{name} must be in [0, 1], got {rate}.")
        if sum(rates.values()) > 1.0 + 1e-9:
            raise ValueError(f"WebNoise rates are exclusive and must sum to at most 1, got {rates}.")


def boilerplate_text(rng: random.Random) -> str:
    """One piece of page boilerplate, or a camera file name."""
    if rng.random() < 0.25:
        return f"IMG_{rng.randrange(10000):04d}.JPG"
    return rng.choice(BOILERPLATE)


def noisy_caption(caption: str, other_caption: str, rng: random.Random, noise: WebNoise) -> tuple[str, str]:
    """The caption as web alt text might give it, and the kind of noise applied (`"clean"` when none).

    `other_caption` is a caption of another image, used for a mismatch.
    """
    draw = rng.random()
    if draw < noise.mismatch_rate:
        return other_caption, "mismatched"
    draw -= noise.mismatch_rate
    if draw < noise.truncate_rate:
        words = caption.split()
        return " ".join(words[: rng.randint(1, 3)]), "truncated"
    draw -= noise.truncate_rate
    if draw < noise.boilerplate_rate:
        if rng.random() < 0.5:
            return boilerplate_text(rng), "boilerplate"
        return f"{caption.rstrip(' .')} | {boilerplate_text(rng)}", "boilerplate"
    return caption, "clean"


def write_noisy_manifest(
    manifest: str | Path,
    output: str | Path,
    noisy_captions: Callable[[list[dict[str, Any]]], list[list[str]]],
    splits: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Writes a copy of a jsonl manifest whose captions are replaced by `noisy_captions(lines)`, atomically.

    The manifest is read as the package's manifest reader reads it: a malformed line raises `ManifestError` naming
    `file:line` and the field before anything is written. Every other field of a line (the image path, its split,
    boxes) is kept, so the copy reads the same region cache (whose keys are the manifest's image paths); the captions
    are written as `"captions"`, a list, whether the line gave `"captions"` or one `"caption"`.

    Args:
        manifest: The clean `captions.jsonl`.
        output: Where the noisy manifest goes.
        noisy_captions: Given the kept lines (dicts, in order, each with its `"captions"` list), the captions of
            each line in the copy.
        splits: Keep only lines whose `"split"` is one of these (None: every line).

    Returns:
        The lines written.
    """
    manifest = Path(manifest)
    # No image is opened here and the copy keeps each path as written: whoever reads the copy applies the image
    # root rule.
    records = read_manifest(manifest, allow_outside_root=True)
    # The lines as written, for the fields the records parse (objects) or leave out; every line parsed above.
    with open(manifest, encoding="utf-8") as handle:
        raw = [loads_json(line) for line in handle if line.strip()]
    lines = [
        {**{key: value for key, value in line.items() if key != "caption"}, "captions": list(record.captions)}
        for line, record in zip(raw, records)
        if splits is None or record.extra.get("split") in splits
    ]
    captions = noisy_captions(lines)
    if len(captions) != len(lines):
        raise ValueError(
            f"noisy_captions gave captions for {len(captions)} lines of {manifest}, expected {len(lines)}."
        )
    written = [{**line, "captions": list(texts)} for line, texts in zip(lines, captions)]
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, "".join(json.dumps(line) + "\n" for line in written))
    return written


def write_web_noisy_manifest(
    manifest: str | Path,
    output: str | Path,
    noise: WebNoise | None = None,
    seed: int = 0,
    splits: list[str] | None = None,
) -> dict[str, int]:
    """Writes a copy of a jsonl manifest whose captions carry web-like noise (see the module docstring), through
    `write_noisy_manifest`.

    Args:
        manifest: The clean `captions.jsonl`.
        output: Where the noisy manifest goes.
        noise: The rates (defaults: `WebNoise()`).
        seed: Seed of the draws.
        splits: Keep only lines whose `"split"` is one of these (None: every line).

    Returns:
        How many captions got each kind of noise (`{"clean": ..., "mismatched": ..., ...}`).
    """
    noise = noise or WebNoise()
    counts = dict.fromkeys(("clean", "mismatched", "truncated", "boilerplate"), 0)

    def web_captions(lines: list[dict[str, Any]]) -> list[list[str]]:
        if len(lines) < 2:
            raise ValueError(f"{manifest} has {len(lines)} usable lines; mismatched captions need at least 2 images.")
        result = []
        for i, line in enumerate(lines):
            captions = []
            for j, caption in enumerate(line["captions"]):
                rng = random.Random(f"{seed}/{i}/{j}")
                other = lines[(i + rng.randrange(1, len(lines))) % len(lines)]
                text, kind = noisy_caption(caption, rng.choice(other["captions"]), rng, noise)
                captions.append(text)
                counts[kind] += 1
            result.append(captions)
        return result

    write_noisy_manifest(manifest, output, web_captions, splits)
    return counts


def corrupted_captions(rate: float, seed: int = 0) -> Callable[[list[dict[str, Any]]], list[list[str]]]:
    """The synthetic set's caption noise (`corrupt_captions`: a `rate` share of all captions, drawn with `seed` in
    manifest order) as `write_noisy_manifest` takes it."""

    def corrupt(lines: list[dict[str, Any]]) -> list[list[str]]:
        flat = iter(corrupt_captions([caption for line in lines for caption in line["captions"]], rate, seed))
        return [[next(flat) for _ in line["captions"]] for line in lines]

    return corrupt


__all__ = [
    "BOILERPLATE",
    "WebNoise",
    "boilerplate_text",
    "corrupted_captions",
    "noisy_caption",
    "write_noisy_manifest",
    "write_web_noisy_manifest",
]
