"""The relation-swap probe (the idea of Winoground and ARO): does a model prefer an image's true caption to the same
words with the two objects exchanged ("a red circle to the left of a blue square" against "a blue square to the left
of a red circle"), or with their attributes exchanged ("a blue circle to the left of a red square")?

Both captions hold the same words, so a bag of words over a bag of regions cannot tell them apart; only a model that
binds each word to its region, and the relation to the regions' positions, can. Two sets:

- the synthetic shapes (`synthetic_swap_probes`): captions built from the annotations of `data.synthetic`, object
  and attribute swaps, generated at any size;
- real photos (`manifest_swap_probes`): for each image of a manifest with boxes (COCO), one pair of labelled boxes in
  a clear left/right relation, captioned from their labels ("a dog to the left of a person") against the swap.

`relation_swap_accuracy` scores each probe with the cross-encoder (the ITM head, `retrieval_index.score_pairs`) and
the dual encoder (cosine of `encode_texts` and `encode_images`), and reports the share of probes whose true caption
scores strictly higher, with a Wilson 95% interval, next to chance (50%).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from ..data.retrieval_corpus import check_region_cache_fits, region_cache_lookup
from ..data.synthetic import (
    SWAP_CAPTION_KINDS,
    make_synthetic_examples,
    relation_caption,
    synthetic_region_record,
    synthetic_swap_captions,
)
from ..formats.files import atomic_write_json, check_output_file
from ..formats.manifest import read_manifest
from ..models.imagebert.modeling_imagebert import ImageBERTForImageTextRetrieval
from ..models.imagebert.pipeline_image_text_retrieval import untrained_heads
from ..models.imagebert.processing_imagebert import tokenize_as_text
from ..models.imagebert.region_batching import pad_region_records
from ..models.imagebert.retrieval_index import (
    encode_images,
    encode_texts,
    prepare_region_inputs,
    region_rows,
    score_pairs,
)
from ..regions.cache_reader import load_region_cache
from . import full_ranking
from .recall import TIE_ATOL, TIE_RTOL


logger = logging.get_logger(__name__)

SWAP_KINDS = SWAP_CAPTION_KINDS
# A control, not a swap: the true caption against another image's true caption (other words), which any model that
# matches captions to images at all gets right; swaps near chance next to a high control mean "bag of words".
CONTROL_KIND = "other_image"
# Smallest share of the image each box of a real photo's pair covers: the one default of the functions, the probe
# script and the app (40 of COCO-128's images give a pair at 1%).
MIN_AREA_FRACTION = 0.01
PROBE_KINDS = (*SWAP_KINDS, CONTROL_KIND)
PROBE_SETS = ("synthetic", "manifest")
# The normal quantile of a two-sided 95% interval.
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class SwapProbe:
    """One image against two captions of the same words, the true one and a false twin.

    Attributes:
        image (`int`): Row of the image in the region inputs.
        true_caption (`str`): The caption that describes the image.
        swapped_caption (`str`): The same words with the objects (or attributes) exchanged.
        kind (`str`): `"object_swap"` or `"attribute_swap"`.
    """

    image: int
    true_caption: str
    swapped_caption: str
    kind: str


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default), as `(low, high)` shares in [0, 1]."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval needs 0 <= successes <= trials and trials >= 1, got {successes}/{trials}.")
    share = successes / trials
    denominator = 1 + z * z / trials
    centre = (share + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


# ----------------------------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------------------------


def _control(order: list[int], position: int, labels: Mapping[int, set[str]]) -> int | None:
    """The first image after `order[position]` (cyclically) whose labels share none with it."""
    index = order[position]
    others = (order[(position + step) % len(order)] for step in range(1, len(order)))
    return next((other for other in others if not labels[other] & labels[index]), None)


def synthetic_swap_probes(
    examples: Sequence[Mapping[str, Any]], kinds: Sequence[str] = PROBE_KINDS
) -> list[SwapProbe]:
    """The probes of synthetic examples (`make_synthetic_examples`): for each example and each of `kinds`, its true
    relation caption against the swap (`data.synthetic.synthetic_swap_captions`); `image` is the example's
    position in `examples`. An example without a clear relation, or without that swap, gives no probe of it.
    `"other_image"` (the control) pits the true caption against the true caption of the next example whose two
    labels both differ from this example's (cyclically)."""
    unknown = sorted(set(kinds) - set(PROBE_KINDS))
    if unknown:
        raise ValueError(f"kinds holds {unknown}; expected some of {PROBE_KINDS}.")
    captions = {index: synthetic_swap_captions(example) for index, example in enumerate(examples)}
    captions = {index: value for index, value in captions.items() if value is not None}
    labels = {index: {obj["label"] for obj in examples[index]["objects"]} for index in captions}
    order = sorted(captions)
    probes = []
    for position, index in enumerate(order):
        for kind in kinds:
            if kind in captions[index]:
                probes.append(SwapProbe(index, captions[index]["true"], captions[index][kind], kind))
            elif kind == CONTROL_KIND and (other := _control(order, position, labels)) is not None:
                probes.append(SwapProbe(index, captions[index]["true"], captions[other]["true"], kind))
    return probes


def clear_left_right_pair(
    labels: Sequence[str],
    boxes: Sequence[Sequence[float]],
    width: float,
    height: float,
    min_area_fraction: float = MIN_AREA_FRACTION,
) -> tuple[int, int] | None:
    """The most salient pair of boxes `(left, right)` in a clear left/right relation, or None.

    A pair qualifies when its labels differ, each box covers at least `min_area_fraction` of the image, the horizontal
    gap between the centres exceeds both half-widths (each centre lies outside the other box), and the swapped caption
    is false of every instance: every box labelled like the left one has its centre left of the centre of every box
    labelled like the right one. Among qualifying pairs, the one whose smaller box is largest wins (then the first).

    Args:
        labels: One label per box.
        boxes: Boxes `x1, y1, x2, y2` in pixels (`ManifestRecord.boxes`).
        width, height: The image size the boxes refer to.
        min_area_fraction: Smallest share of the image each box of the pair covers.
    """
    if len(labels) != len(boxes):
        raise ValueError(f"labels has {len(labels)} entries and boxes {len(boxes)}; expected one label per box.")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width} x {height}.")
    centres = [(x1 + x2) / 2 for x1, _, x2, _ in boxes]
    areas = [(x2 - x1) * (y2 - y1) / (width * height) for x1, y1, x2, y2 in boxes]
    centres_of: dict[str, list[float]] = {}
    for label, centre in zip(labels, centres):
        centres_of.setdefault(label, []).append(centre)
    best, best_area = None, 0.0
    for left in range(len(boxes)):
        for right in range(len(boxes)):
            if labels[left] == labels[right] or min(areas[left], areas[right]) < min_area_fraction:
                continue
            half_widths = ((boxes[left][2] - boxes[left][0]) / 2, (boxes[right][2] - boxes[right][0]) / 2)
            if centres[right] - centres[left] <= max(half_widths):
                continue
            if max(centres_of[labels[left]]) >= min(centres_of[labels[right]]):
                continue
            if min(areas[left], areas[right]) > best_area:
                best, best_area = (left, right), min(areas[left], areas[right])
    return best


def manifest_swap_probes(
    records: Sequence[Any], min_area_fraction: float = MIN_AREA_FRACTION, control: bool = True
) -> tuple[list[SwapProbe], list[Any]]:
    """Object-swap probes of real photos: for each manifest record with boxes (`formats.manifest.ManifestRecord`;
    COCO's labels), the caption of its `clear_left_right_pair` ("a dog to the left of a person") against the swap.
    With `control`, also an `"other_image"` probe per image: its caption against that of the next kept image whose
    pair shares no label with it.

    Returns:
        `(probes, kept)`: `kept` are the records that gave a probe, and `probe.image` indexes them.
    """
    captions, pairs, kept = [], [], []
    for record in records:
        if not record.boxes or record.width is None or record.height is None:
            continue
        pair = clear_left_right_pair(record.box_labels, record.boxes, record.width, record.height, min_area_fraction)
        if pair is None:
            continue
        left, right = (record.box_labels[i] for i in pair)
        captions.append(relation_caption(left, "to the left of", right))
        pairs.append((left, right))
        kept.append(record)
    probes = [
        SwapProbe(index, caption, relation_caption(right, "to the left of", left), "object_swap")
        for index, (caption, (left, right)) in enumerate(zip(captions, pairs))
    ]
    if control:
        labels = {index: set(pair) for index, pair in enumerate(pairs)}
        for index in range(len(kept)):
            other = _control(list(range(len(kept))), index, labels)
            if other is not None:
                probes.append(SwapProbe(index, captions[index], captions[other], CONTROL_KIND))
    return probes, kept


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------

# A scorer maps (model, text_inputs, region_inputs, image_indices, text_indices, batch_size) to one score per pair.
Scorer = Callable[[Any, Mapping, Any, torch.Tensor, torch.Tensor, int], torch.Tensor]


def cross_encoder_scores(model, text_inputs, region_inputs, image_indices, text_indices, batch_size=256):
    """The ITM head's score of each pair (`retrieval_index.score_pairs`)."""
    return score_pairs(model, text_inputs, region_inputs, image_indices, text_indices, batch_size)


def dual_encoder_scores(model, text_inputs, region_inputs, image_indices, text_indices, batch_size=256):
    """The cosine of the unimodal embeddings of each pair (`retrieval_index.encode_texts` / `encode_images`); each
    text and each image is embedded once."""
    texts = encode_texts(model, text_inputs, batch_size)
    images = torch.as_tensor(image_indices).long()
    unique, inverse = torch.unique(images, return_inverse=True)
    regions = region_rows(prepare_region_inputs(region_inputs), unique)
    embeddings = encode_images(model, regions, batch_size)[inverse]
    return (texts[torch.as_tensor(text_indices).long()] * embeddings).sum(-1)


SCORERS: dict[str, Scorer] = {"cross_encoder": cross_encoder_scores, "dual_encoder": dual_encoder_scores}


def _share(wins: int, trials: int) -> dict[str, float | int]:
    low, high = wilson_interval(wins, trials)
    return {"accuracy": wins / trials, "ci_low": low, "ci_high": high, "wins": wins, "n": trials}


def relation_swap_accuracy(
    model,
    probes: Sequence[SwapProbe],
    tokenizer,
    region_inputs,
    scorers: Mapping[str, Scorer] | None = None,
    batch_size: int = 256,
    max_text_length: int | None = None,
) -> dict[str, Any]:
    """The share of probes whose true caption scores strictly higher than its swap, per kind and per scorer.

    Args:
        model (`ImageBERTForImageTextRetrieval`): The model; `scorers` read it.
        probes (`Sequence[SwapProbe]`): The probes (`synthetic_swap_probes`, `manifest_swap_probes`).
        tokenizer: The model's tokenizer; every distinct caption is tokenized once.
        region_inputs: Padded regions of the images (`region_batching.pad_region_records` of their records, or a
            `RegionBatches` gallery); `probe.image` is a row of them.
        scorers (`Mapping[str, Scorer]`, *optional*): Name -> scorer; defaults to `SCORERS` (the cross-encoder and
            the dual encoder).
        batch_size (`int`, *optional*, defaults to 256): Pairs (or inputs) per forward pass.
        max_text_length (`int`, *optional*): Truncate captions to this many tokens (the model's
            `config.max_text_length` by default).

    Returns:
        `{kind: {scorer: {"accuracy", "ci_low", "ci_high", "wins", "n", "ties"}, "chance": 0.5, "indistinguishable":
        k}}` for each kind present, plus `"all_swaps"` over the swap probes when there is more than one kind of swap
        (the `"other_image"` control stays apart). A tie (scores within `TIE_RTOL` / `TIE_ATOL`, float32 batch noise)
        counts as a loss (the true caption must win), and `ties` says how many there were. A probe whose two captions
        the tokenizer reads as the same tokens (words outside its vocabulary, both `[UNK]`; a cut at
        `max_text_length` before the swapped words) gives the model one input twice: it measures nothing and is left
        out of `n`, counted in `indistinguishable` (a kind left with no probe has no scorer entry). `"all_swaps"`
        pools two probes per image, which are not independent: its interval is too narrow, so read the per-kind ones.

    Raises:
        ValueError: no probes, unknown kinds, or every probe indistinguishable.
    """
    if not probes:
        raise ValueError("probes is empty; expected at least one SwapProbe (no image had a clear relation?).")
    unknown = sorted({probe.kind for probe in probes} - set(PROBE_KINDS))
    if unknown:
        raise ValueError(f"probes hold kinds {unknown}; expected some of {PROBE_KINDS}.")
    scorers = SCORERS if scorers is None else scorers
    texts = list(dict.fromkeys(c for probe in probes for c in (probe.true_caption, probe.swapped_caption)))
    position = {text: i for i, text in enumerate(texts)}
    if max_text_length is None:
        max_text_length = getattr(getattr(model, "config", None), "max_text_length", None)
    truncate = {"truncation": True, "max_length": max_text_length} if max_text_length else {}
    # On the right whatever the tokenizer's saved `padding_side`: the model reads the pair's summary at position 0.
    text_inputs = dict(
        tokenize_as_text(
            tokenizer, texts, name="caption", padding=True, padding_side="right", return_tensors="pt", **truncate
        )
    )
    ids, mask = text_inputs["input_ids"], text_inputs["attention_mask"].bool()
    read = [tuple(ids[row][mask[row]].tolist()) for row in range(len(texts))]
    same = {
        i
        for i, probe in enumerate(probes)
        if read[position[probe.true_caption]] == read[position[probe.swapped_caption]]
    }
    if len(same) == len(probes):
        example = probes[0].true_caption
        tokens = tokenizer.convert_ids_to_tokens(list(read[position[example]]))
        raise ValueError(
            f"all {len(probes)} probes give the model the same tokens for the true and the swapped caption (e.g. "
            f"{example!r} -> {tokens}): the tokenizer does not read the words that were swapped, so there is nothing "
            "to measure."
        )
    images = torch.tensor([probe.image for probe in probes]).repeat_interleave(2)
    captions = torch.tensor([position[c] for probe in probes for c in (probe.true_caption, probe.swapped_caption)])
    kinds = [probe.kind for probe in probes]
    groups = {kind: [i for i, k in enumerate(kinds) if k == kind] for kind in PROBE_KINDS if kind in kinds}
    if len(set(kinds) & set(SWAP_KINDS)) > 1:
        groups["all_swaps"] = [i for i, kind in enumerate(kinds) if kind in SWAP_KINDS]
    results: dict[str, Any] = {
        name: {"chance": 0.5, "indistinguishable": sum(i in same for i in members)} for name, members in groups.items()
    }
    groups = {name: [i for i in members if i not in same] for name, members in groups.items()}
    for name, scorer in scorers.items():
        scores = torch.as_tensor(scorer(model, text_inputs, region_inputs, images, captions, batch_size)).float()
        if scores.shape != (2 * len(probes),):
            raise ValueError(f"scorer {name!r} returned shape {tuple(scores.shape)}; expected ({2 * len(probes)},).")
        true_scores, swapped_scores = scores.view(-1, 2).unbind(1)
        for group, members in groups.items():
            if not members:
                continue
            members = torch.tensor(members)
            true_member, swapped_member = true_scores[members], swapped_scores[members]
            # The same pair in two rows of a batch can score a few float32 units apart: that is a tie, not a win.
            tied = torch.isclose(true_member, swapped_member, rtol=TIE_RTOL, atol=TIE_ATOL)
            wins = int(((true_member > swapped_member) & ~tied).sum())
            ties = int(tied.sum())
            results[group][name] = {**_share(wins, len(members)), "ties": ties}
    return results


# ----------------------------------------------------------------------------------------------------------------
# The command line (examples/evaluate_relation_swaps.py)
# ----------------------------------------------------------------------------------------------------------------


def _check_arguments(
    probe: str,
    scorers: str,
    num_images: int,
    batch_size: int,
    synthetic_first_index: int,
    min_area_fraction: float,
    manifest: str | None,
    region_cache: str | None,
    output_file: str | None = None,
) -> list[str]:
    if probe not in PROBE_SETS:
        raise ValueError(f"probe is {probe!r}; expected one of {PROBE_SETS}.")
    names = [name.strip() for name in scorers.split(",") if name.strip()]
    if not names or any(name not in SCORERS for name in names):
        raise ValueError(f"scorers is {scorers!r}; expected a comma-separated list of {tuple(SCORERS)}.")
    for name, value in (("num_images", num_images), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} is {value}; expected at least 1.")
    if synthetic_first_index < 0:
        raise ValueError(f"synthetic_first_index is {synthetic_first_index}; expected at least 0.")
    if not 0.0 <= min_area_fraction <= 1.0:
        raise ValueError(f"min_area_fraction is {min_area_fraction}; expected a share in [0, 1].")
    if output_file is not None:
        check_output_file(output_file, "output_file")
    if probe == "manifest":
        for name, value in (("manifest", manifest), ("region_cache", region_cache)):
            if value is None:
                raise ValueError(f"probe 'manifest' needs {name}; got none.")
            if not Path(value).exists():
                raise FileNotFoundError(f"{name} {value} does not exist.")
    return names


def load_retrieval_model(model_name_or_path: str) -> tuple[ImageBERTForImageTextRetrieval, bool]:
    """The model as `ImageBERTForImageTextRetrieval` (loaded as the evaluation loads it: a missing folder or a
    damaged weights file named in one line) and whether its dual-encoder heads were trained (False for a pretraining
    checkpoint or a UNITER conversion: the projections are then freshly initialised and their scores mean nothing)."""
    model = full_ranking.load_retrieval_model(model_name_or_path)
    new = untrained_heads(model)
    if new:
        logger.warning(
            f"{model_name_or_path} has no trained dual-encoder heads ({', '.join(sorted(new))} are freshly "
            "initialised, as for a pretraining checkpoint); they are not scored. Fine-tune for retrieval to train them."
        )
    return model, not new


def run_relation_swap_evaluation(
    model_name_or_path: str,
    probe: str = "synthetic",
    num_images: int = 500,
    synthetic_seed: int = 0,
    synthetic_first_index: int = 0,
    manifest: str | None = None,
    region_cache: str | None = None,
    min_area_fraction: float = MIN_AREA_FRACTION,
    scorers: str = "cross_encoder,dual_encoder",
    batch_size: int = 256,
    output_file: str | None = None,
) -> dict[str, Any]:
    """Builds the probes, scores them with a saved model and returns (and, with `output_file`, writes as JSON) the
    results of `relation_swap_accuracy` under `"results"`, with the probe's description and its first probes.

    Args:
        model_name_or_path: An ImageBERT folder with its tokenizer, loaded as `ImageBERTForImageTextRetrieval`.
        probe: `"synthetic"` (generated shapes, regions from their annotations) or `"manifest"` (real photos).
        num_images: synthetic: how many images to generate and probe.
        synthetic_seed: synthetic: the generator seed of the images.
        synthetic_first_index: synthetic: index of the first image, to skip the images the model trained on.
        manifest: manifest: a jsonl manifest with boxes and labels (COCO's `captions.jsonl`).
        region_cache: manifest: the region cache of its images.
        min_area_fraction: manifest: smallest share of the image each box of a pair covers.
        scorers: Comma-separated names of `SCORERS`; the dual encoder is skipped when its heads were not trained.
        batch_size: Pairs (or inputs) per forward pass.
        output_file: Also write the results to this JSON file.
    """
    from transformers import AutoTokenizer

    scorer_names = _check_arguments(
        probe,
        scorers,
        num_images,
        batch_size,
        synthetic_first_index,
        min_area_fraction,
        manifest,
        region_cache,
        output_file,
    )
    model, dual_trained = load_retrieval_model(model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if not dual_trained:
        scorer_names = [name for name in scorer_names if name != "dual_encoder"]
        if not scorer_names:
            raise ValueError(
                f"scorers asks only for dual_encoder, but {model_name_or_path} has no trained dual-encoder heads."
            )
    if probe == "synthetic":
        first = synthetic_first_index
        examples = make_synthetic_examples(first + num_images, seed=synthetic_seed)[first:]
        probes = synthetic_swap_probes(examples)
        records = [synthetic_region_record(example, model.config.region_feature_size) for example in examples]
        description = {
            "images": len(examples),
            "seed": synthetic_seed,
            "first_index": first,
            "regions": "annotations",
        }
    else:
        probes, kept = manifest_swap_probes(read_manifest(manifest), min_area_fraction)
        if not probes:
            raise ValueError(
                f"manifest {manifest} gave no image with a clear left/right pair of labelled boxes at "
                f"min_area_fraction {min_area_fraction}; expected objects with boxes and labels."
            )
        cache = load_region_cache(region_cache)
        check_region_cache_fits(cache, model.config, f"region_cache {region_cache}", model_name_or_path)
        # Found as the evaluation finds them: by manifest path, image path or id, under any spelling of the path.
        lookup = region_cache_lookup(cache)
        records, missing = [], []
        for record in kept:
            try:
                records.append(
                    lookup(
                        {"manifest_image": record.image, "image": str(record.image_path), "image_id": record.image_id}
                    )
                )
            except KeyError:
                missing.append(record.image)
        if missing:
            raise ValueError(
                f"region_cache {region_cache} has no regions for {len(missing)} image(s) of the manifest, e.g. "
                f"{missing[0]}; expected every image (extract them with imagebert-extract-regions)."
            )
        description = {"images": len(kept), "manifest": manifest, "min_area_fraction": min_area_fraction}
    region_inputs = pad_region_records(records, "longest", model.config.max_regions)
    results = relation_swap_accuracy(
        model, probes, tokenizer, region_inputs, {name: SCORERS[name] for name in scorer_names}, batch_size
    )
    summary = {
        "model": model_name_or_path,
        "probe": probe,
        **description,
        "dual_encoder_heads_trained": dual_trained,
        "results": results,
        "examples": [
            {"true": probe.true_caption, "swapped": probe.swapped_caption, "kind": probe.kind} for probe in probes[:4]
        ],
    }
    if output_file:
        Path(output_file).expanduser().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(output_file).expanduser(), summary, indent=1)
    return summary


def format_relation_swap_table(results: Mapping[str, Any]) -> str:
    """The results of `relation_swap_accuracy` as a Markdown table: accuracy and 95% interval per kind and scorer."""
    lines = [
        "| probes | scorer | true caption wins | 95% interval | n | ties | left out (same tokens) |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, by_scorer in results.items():
        left_out = by_scorer.get("indistinguishable", 0)
        for name, value in by_scorer.items():
            if not isinstance(value, Mapping):
                continue
            lines.append(
                f"| {group} | {name} | {100 * value['accuracy']:.1f}% | "
                f"{100 * value['ci_low']:.1f}-{100 * value['ci_high']:.1f}% | {value['n']} | {value['ties']} | "
                f"{left_out} |"
            )
        lines.append(f"| {group} | chance | 50.0% | | | | {left_out} |")
    return "\n".join(lines)


__all__ = [
    "MIN_AREA_FRACTION",
    "PROBE_SETS",
    "CONTROL_KIND",
    "PROBE_KINDS",
    "SCORERS",
    "SWAP_KINDS",
    "SwapProbe",
    "clear_left_right_pair",
    "cross_encoder_scores",
    "dual_encoder_scores",
    "format_relation_swap_table",
    "load_retrieval_model",
    "manifest_swap_probes",
    "relation_swap_accuracy",
    "run_relation_swap_evaluation",
    "synthetic_swap_probes",
    "wilson_interval",
]
