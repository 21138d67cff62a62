"""A generated image-caption dataset that ships with the package: coloured shapes on plain backgrounds.

Every caption is true of its image ("a red circle to the left of a blue square"), every object comes with its box
and label, and nothing is downloaded, so the demo, the tests and the benchmarks run anywhere. The words are few,
which lets a tiny model with a tiny vocabulary learn the grounding in minutes on a CPU.
"""

from __future__ import annotations

import json
import math
import random
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "white": (235, 235, 235),
}
# One class per (colour, shape): the object label the MOC task can learn from the annotated boxes.
CLASS_NAMES: tuple[str, ...] = tuple(f"{color} {shape}" for shape in SHAPES for color in COLORS)
_RELATIONS = ("horizontal", "vertical")
# The false twins `synthetic_swap_captions` builds: the two objects exchanged, or their colours.
SWAP_CAPTION_KINDS: tuple[str, ...] = ("object_swap", "attribute_swap")
_FILLER_WORDS = ("there", "is", "on", "the", "of", "and", "with", "image", "background", "shows", "next", "to")


def synthetic_vocabulary() -> list[str]:
    """Every word a synthetic caption (clean or corrupted) can contain, BERT's special tokens first."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "left", "right", "above", "below"]
    words += list(COLORS) + list(SHAPES) + list(BACKGROUNDS) + list(_FILLER_WORDS)
    return list(dict.fromkeys(words))


def make_synthetic_tokenizer():
    """A WordPiece tokenizer over `synthetic_vocabulary()`: a few dozen ids instead of BERT's 30522."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={word: index for index, word in enumerate(synthetic_vocabulary())})


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]):
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)
    elif shape == "cross":
        third_w, third_h = (x2 - x1) / 3, (y2 - y1) / 3
        draw.rectangle((x1 + third_w, y1, x2 - third_w, y2), fill=fill)
        draw.rectangle((x1, y1 + third_h, x2, y2 - third_h), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _describe(first: dict, second: dict, relation: str, rng: random.Random, background: str) -> list[str]:
    """Several true captions for two objects, `first` being left of (or above) `second`."""
    a = f"{_article(first['color'])} {first['color']} {first['shape']}"
    b = f"{_article(second['color'])} {second['color']} {second['shape']}"
    if relation == "horizontal":
        captions = [f"{a} to the left of {b}", f"{b} to the right of {a}"]
    else:
        captions = [f"{a} above {b}", f"{b} below {a}"]
    captions.append(f"{a} and {b} on {_article(background)} {background} background")
    rng.shuffle(captions)
    return captions


def _make_one(index: int, seed: int, image_size: int, captions_per_image: int) -> dict[str, Any]:
    # One generator per image, so image i is the same whatever num_images is.
    rng = random.Random(seed * 1_000_003 + index)
    background = rng.choice(list(BACKGROUNDS))
    relation = rng.choice(_RELATIONS)
    colors = rng.sample(list(COLORS), 2)
    shapes = [rng.choice(SHAPES), rng.choice(SHAPES)]
    base = np.array(BACKGROUNDS[background], dtype=np.int16)
    noise = np.random.default_rng(seed * 7919 + index).integers(-12, 13, size=(image_size, image_size, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)

    objects = []
    half = image_size // 2
    for slot, (color, shape) in enumerate(zip(colors, shapes)):
        size = rng.randint(int(image_size * 0.22), int(image_size * 0.4))
        # Each object lives in its own half (left/right or top/bottom), so the relation in the caption holds.
        if relation == "horizontal":
            x_lo, x_hi = slot * half, (slot + 1) * half - size
            y_lo, y_hi = 0, image_size - size
        else:
            x_lo, x_hi = 0, image_size - size
            y_lo, y_hi = slot * half, (slot + 1) * half - size
        x1, y1 = rng.randint(x_lo, max(x_lo, x_hi)), rng.randint(y_lo, max(y_lo, y_hi))
        _draw_shape(draw, shape, (x1, y1, x1 + size - 1, y1 + size - 1), COLORS[color])
        label = f"{color} {shape}"
        objects.append(
            {
                "label": label,
                "class_id": CLASS_NAMES.index(label),
                "bbox_xywh": [float(x1), float(y1), float(size), float(size)],
                "color": color,
                "shape": shape,
            }
        )

    captions = _describe(objects[0], objects[1], relation, rng, background)
    captions = [captions[i % len(captions)] for i in range(captions_per_image)]
    return {
        "image_id": f"synthetic-{seed}-{index:06d}",
        "image": image,
        "captions": captions,
        "objects": [{key: obj[key] for key in ("label", "class_id", "bbox_xywh")} for obj in objects],
        "width": image_size,
        "height": image_size,
    }


# The seed of the held-out synthetic set `evaluate_retrieval --dataset synthetic` ranks: a fine-tuning run may not
# generate its training images from it.
HELD_OUT_SEED = 1234


def make_synthetic_examples(
    num_images: int, seed: int = 0, image_size: int = 96, captions_per_image: int = 2
) -> list[dict[str, Any]]:
    """The synthetic records as plain dicts (PIL image, captions, objects); see `make_synthetic_dataset`."""
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}.")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}.")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be at least 1, got {captions_per_image}.")
    return [_make_one(i, seed, image_size, captions_per_image) for i in range(num_images)]


def make_synthetic_dataset(num_images: int, seed: int = 0, image_size: int = 96, captions_per_image: int = 2):
    """Generates `num_images` images of two coloured shapes, with true captions, boxes and labels.

    Args:
        num_images (`int`): How many images to generate.
        seed (`int`, *optional*, defaults to 0): Image `i` depends only on `(seed, i)`.
        image_size (`int`, *optional*, defaults to 96): Side of the square images, in pixels.
        captions_per_image (`int`, *optional*, defaults to 2): Captions per image (at most 3 distinct ones;
            more repeat them).

    Returns:
        `datasets.Dataset` with columns `image_id` (str), `image` (`Image()`), `captions` (list of str), `objects`
        (list of `{"label", "class_id", "bbox_xywh"}`, boxes in pixels as in the COCO manifest), `width`, `height`.
    """
    import datasets

    examples = make_synthetic_examples(num_images, seed, image_size, captions_per_image)
    features = datasets.Features(
        {
            "image_id": datasets.Value("string"),
            "image": datasets.Image(),
            "captions": datasets.Sequence(datasets.Value("string")),
            # A list literal makes a list of structs (a Sequence of a dict would become a dict of lists).
            "objects": [
                {
                    "label": datasets.Value("string"),
                    "class_id": datasets.Value("int64"),
                    "bbox_xywh": datasets.Sequence(datasets.Value("float32"), length=4),
                }
            ],
            "width": datasets.Value("int64"),
            "height": datasets.Value("int64"),
        }
    )
    columns = {name: [example[name] for example in examples] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)


def write_synthetic_manifest(
    output_dir: str | Path,
    num_images: int,
    seed: int = 0,
    image_size: int = 96,
    captions_per_image: int = 2,
    test_fraction: float = 0.0,
) -> Path:
    """Writes the synthetic set in the jsonl manifest + image folder layout of the real data.

    Lines look like `{"image": "images/<id>.png", "captions": [...], "objects": [...], "width", "height",
    "split"}`; the last `round(test_fraction * num_images)` images get `"split": "test"`, the others `"train"`.

    Returns:
        The path of the written `captions.jsonl`.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}.")
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    num_test = round(test_fraction * num_images)
    manifest = output_dir / "captions.jsonl"
    with open(manifest, "w", encoding="utf-8") as handle:
        for index, example in enumerate(make_synthetic_examples(num_images, seed, image_size, captions_per_image)):
            relative = f"images/{example['image_id']}.png"
            example["image"].save(output_dir / relative)
            line = {
                "image": relative,
                "image_id": example["image_id"],
                "captions": example["captions"],
                "objects": example["objects"],
                "width": example["width"],
                "height": example["height"],
                "split": "test" if index >= num_images - num_test else "train",
                "source": "imagebert_hf synthetic shapes",
            }
            handle.write(json.dumps(line) + "\n")
    return manifest


def corrupt_caption(caption: str, rng: random.Random) -> str:
    """A web-like noisy version of a caption: colours or shapes swapped, relation flipped, or words shuffled.

    The result is usually no longer true of the image, as with weakly supervised web text.
    """
    words = caption.split()
    kind = rng.randrange(4)
    if kind == 0:
        colors = [i for i, w in enumerate(words) if w in COLORS]
        for i in colors:
            words[i] = rng.choice(list(COLORS))
    elif kind == 1:
        shapes = [i for i, w in enumerate(words) if w in SHAPES]
        for i in shapes:
            words[i] = rng.choice(SHAPES)
    elif kind == 2:
        flips = {"left": "right", "right": "left", "above": "below", "below": "above"}
        words = [flips.get(w, w) for w in words]
        if words == caption.split():
            rng.shuffle(words)
    else:
        rng.shuffle(words)
    return " ".join(words)


def corrupt_captions(captions: list[str], rate: float, seed: int = 0) -> list[str]:
    """Replaces a `rate` share of `captions` (chosen with `seed`) by `corrupt_caption` of themselves."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}.")
    rng = random.Random(seed)
    return [corrupt_caption(c, rng) if rng.random() < rate else c for c in captions]


def synthetic_region_record(example: dict[str, Any], feature_size: int, seed: int = 0) -> dict[str, Any]:
    """Region records (the extractor's schema) built from a synthetic example's annotations, without any CNN.

    Each object's feature encodes its colour and shape through fixed random directions plus noise, and the whole
    image is added as a last region. Meant for fast tests of the training code; the demo runs the real extractor.
    """
    if feature_size < 8:
        raise ValueError(f"feature_size must be at least 8, got {feature_size}.")
    directions = np.random.default_rng(1234).standard_normal((len(COLORS) + len(SHAPES) + 1, feature_size))
    noise_rng = np.random.default_rng([seed, zlib.crc32(example["image_id"].encode())])
    width, height = float(example["width"]), float(example["height"])
    features, boxes, labels = [], [], []
    for obj in example["objects"]:
        color, shape = obj["label"].split()
        vector = directions[list(COLORS).index(color)] + directions[len(COLORS) + SHAPES.index(shape)]
        features.append(vector + 0.1 * noise_rng.standard_normal(feature_size))
        x, y, w, h = obj["bbox_xywh"]
        boxes.append([x, y, x + w, y + h])
        labels.append(obj["class_id"])
    features.append(directions[-1] + 0.1 * noise_rng.standard_normal(feature_size))
    boxes.append([0.0, 0.0, width, height])
    labels.append(-100)
    boxes = np.asarray(boxes, dtype=np.float32)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (width * height)
    locations = np.stack(
        [boxes[:, 0] / width, boxes[:, 1] / height, boxes[:, 2] / width, boxes[:, 3] / height, area], axis=1
    )
    return {
        "image_id": example["image_id"],
        "region_features": np.asarray(features, dtype=np.float32),
        "region_boxes": boxes,
        "region_locations": np.clip(locations, 0.0, 1.0).astype(np.float32),
        "region_class_labels": np.asarray(labels, dtype=np.int64),
        "image_width": int(width),
        "image_height": int(height),
        "num_regions": len(labels),
        "error": None,
    }


def relation_caption(first: str, relation: str, second: str) -> str:
    """Two object names joined by a relation, each with its article: `relation_caption("red circle", "to the left
    of", "orange square")` is `"a red circle to the left of an orange square"`."""
    return f"{_article(first)} {first} {relation} {_article(second)} {second}"


def synthetic_relation(example: dict[str, Any]) -> tuple[int, str, int] | None:
    """The spatial relation of an example's two objects, read from their boxes: `(first, relation, second)`, the
    object indices in caption order, `relation` being `"to the left of"` when the boxes do not overlap horizontally
    and `"above"` when they overlap horizontally but not vertically. None when the example does not hold exactly
    two objects or their boxes overlap both ways (no clear relation)."""
    objects = example["objects"]
    if len(objects) != 2:
        return None
    (ax, ay, aw, ah), (bx, by, bw, bh) = (obj["bbox_xywh"] for obj in objects)
    if ax + aw <= bx:
        return 0, "to the left of", 1
    if bx + bw <= ax:
        return 1, "to the left of", 0
    if ay + ah <= by:
        return 0, "above", 1
    if by + bh <= ay:
        return 1, "above", 0
    return None


def synthetic_swap_captions(example: dict[str, Any]) -> dict[str, str] | None:
    """A true relation caption of a synthetic example and its two false twins, built from the annotations.

    For a red circle left of a blue square: `"true"` is "a red circle to the left of a blue square",
    `"object_swap"` (the two objects exchanged) "a blue square to the left of a red circle", and `"attribute_swap"`
    (the colours exchanged between the shapes) "a blue circle to the left of a red square". A twin that would
    read like the true caption (two objects with the same label, or the same colour) is left out.

    Returns:
        The captions by name, or None when the example has no clear relation (see `synthetic_relation`).
    """
    relation = synthetic_relation(example)
    if relation is None:
        return None
    first, words, second = relation
    (color_a, shape_a), (color_b, shape_b) = (example["objects"][i]["label"].split() for i in (first, second))
    captions = {"true": relation_caption(f"{color_a} {shape_a}", words, f"{color_b} {shape_b}")}
    if (color_a, shape_a) != (color_b, shape_b):
        captions["object_swap"] = relation_caption(f"{color_b} {shape_b}", words, f"{color_a} {shape_a}")
    if color_a != color_b:
        captions["attribute_swap"] = relation_caption(f"{color_b} {shape_a}", words, f"{color_a} {shape_b}")
    return captions


def swap_caption_words(caption: str) -> dict[str, str]:
    """The false twins of one synthetic caption, in its own wording: `"object_swap"` exchanges its two objects
    ("a blue square to the right of a red circle" becomes "a red circle to the right of a blue square") and
    `"attribute_swap"` its two colours ("a red square to the right of a blue circle").

    Unlike `synthetic_swap_captions`, which builds the twins of an image's relation in one wording ("to the left
    of", "above"), these keep the caption's wording, so a twin can be told from a true caption only by what it
    says, never by how it is phrased. Only a caption of two "<colour> <shape>" objects gets twins; a caption that
    joins its objects with "and" (no relation: swapping them keeps it true) gets no object swap, nor a colour swap
    of two shapes alike (which is the same exchange), and a twin that would read like the caption (same objects, or
    same colours) is left out.
    """
    words = caption.split()
    colors = [i for i, word in enumerate(words) if word in COLORS]
    if len(colors) != 2 or any(i + 1 >= len(words) or words[i + 1] not in SHAPES for i in colors):
        return {}
    (first, second) = colors

    def with_objects(one: tuple[str, str], other: tuple[str, str]) -> str:
        swapped = list(words)
        for index, (color, shape) in zip((first, second), (one, other)):
            swapped[index], swapped[index + 1] = color, shape
            if index > 0 and swapped[index - 1] in ("a", "an"):
                swapped[index - 1] = _article(color)
        return " ".join(swapped)

    a, b = (words[first], words[first + 1]), (words[second], words[second + 1])
    joined = "and" in words[first + 2 : second]
    twins = {}
    if a != b and not joined:
        twins["object_swap"] = with_objects(b, a)
    # Two shapes alike: exchanging their colours exchanges the objects, which "and" leaves true.
    if a[0] != b[0] and not (joined and a[1] == b[1]):
        twins["attribute_swap"] = with_objects((b[0], a[1]), (a[0], b[1]))
    return twins


def chance_recall(num_candidates: int, k: int, num_relevant: int = 1) -> float:
    """Probability that a random ranking of `num_candidates` puts one of `num_relevant` items in the top `k`."""
    if k >= num_candidates:
        return 1.0
    miss = math.comb(num_candidates - num_relevant, k) / math.comb(num_candidates, k)
    return 1.0 - miss


__all__ = [
    "HELD_OUT_SEED",
    "CLASS_NAMES",
    "COLORS",
    "SHAPES",
    "SWAP_CAPTION_KINDS",
    "chance_recall",
    "corrupt_caption",
    "corrupt_captions",
    "make_synthetic_dataset",
    "make_synthetic_examples",
    "make_synthetic_tokenizer",
    "relation_caption",
    "synthetic_region_record",
    "synthetic_relation",
    "synthetic_swap_captions",
    "swap_caption_words",
    "synthetic_vocabulary",
    "write_synthetic_manifest",
]
