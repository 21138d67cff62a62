"""The relations view's data: a gallery photo's true relation caption against its swapped twin, scored side by side.

The captions come from the relation-swap probe (`evaluation.relation_swaps`, docs/relation_swaps.md): for a photo whose
two annotated objects are the synthetic shapes, `data.synthetic.synthetic_swap_captions` ("a red circle to the left
of a blue square" against "a blue square to the left of a red circle", objects swapped, or "a blue circle to the left
of a red square", colours swapped); for any other photo with labelled boxes (COCO), the pair of
`clear_left_right_pair` captioned from its labels ("a dog to the left of a person") against the objects swapped. Both
captions hold the same words, so only a model that ties each word to its region, and the relation to the regions'
places, can prefer the true one.

Each pair is scored by the probe's own scorers (`SCORERS`): the cross-encoder (the ITM head) and the dual encoder
(cosine of the unimodal embeddings, left out where the checkpoint's projection heads are untrained). Over the whole
gallery, `relation_swap_accuracy` gives the share of photos whose true caption wins, so that one photo's winner is
read against what the model does on all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data.synthetic import CLASS_NAMES, relation_caption, synthetic_relation, synthetic_swap_captions
from ..evaluation.relation_swaps import (
    MIN_AREA_FRACTION,
    SCORERS,
    SWAP_KINDS,
    SwapProbe,
    clear_left_right_pair,
    relation_swap_accuracy,
)
from .engine import AppInputError, GalleryImage, RegionImportance, RetrievalDemo, annotated_labels


# What each swap is called in the page.
KIND_NAMES = {"object_swap": "objects swapped", "attribute_swap": "colours swapped"}
SCORER_NAMES = {"cross_encoder": "cross-encoder (ITM head)", "dual_encoder": "dual encoder (cosine of embeddings)"}
# The gallery's rate is taken over the examples of at most this many photos (their regions are padded in one batch).
MAX_SUMMARY_PHOTOS = 500
# Scores are shown to 3 decimals: a margin below half the last digit reads as equal scores.
TIE_TOLERANCE = 5e-4


@dataclass(frozen=True)
class RelationExample:
    """One gallery photo's true relation caption and one false twin of the same words.

    Attributes:
        key: the photo's name in the gallery (`GalleryImage.key`).
        kind: `"object_swap"` or `"attribute_swap"`.
        true_caption: the caption its annotations make true.
        swapped_caption: the same words with the objects (or their colours) exchanged.
        first, second: region indices, in the photo's region record, of the true caption's first and second object.
        relation: `"to the left of"` or `"above"`.
    """

    key: str
    kind: str
    true_caption: str
    swapped_caption: str
    first: int
    second: int
    relation: str


def _annotated_objects(image: GalleryImage, record: dict[str, Any]) -> list[tuple[int, str, tuple[float, ...]]]:
    """The photo's labelled object regions the model sees, `(region index, label, x1 y1 x2 y2)`: its annotated boxes
    within the record's regions, without the whole image."""
    if image.boxes is None or image.box_labels is None:
        return []
    return [
        (i, label, tuple(float(v) for v in image.boxes[i]))
        for i, label in enumerate(annotated_labels(image, record))
        if label and label != "whole image"
    ]


def relation_examples(image: GalleryImage, record: dict[str, Any]) -> list[RelationExample]:
    """The relation examples of one gallery photo, from its annotations (none for a photo without labelled boxes or
    without a clear relation).

    Two synthetic shapes (labels of `CLASS_NAMES`) give the probe's synthetic captions (`synthetic_swap_captions`:
    left/right or above/below, objects and colours swapped where the twin reads differently); other labelled boxes give
    the real-photo probe's left/right pair (`clear_left_right_pair` at a 1% smallest box, objects swapped).
    """
    objects = _annotated_objects(image, record)
    if len(objects) == 2 and all(label in CLASS_NAMES for _, label, _ in objects):
        example = {
            "objects": [
                {"label": label, "bbox_xywh": [x1, y1, x2 - x1, y2 - y1]} for _, label, (x1, y1, x2, y2) in objects
            ]
        }
        captions = synthetic_swap_captions(example)
        if captions is None:
            return []
        first, words, second = synthetic_relation(example)
        return [
            RelationExample(
                image.key, kind, captions["true"], captions[kind], objects[first][0], objects[second][0], words
            )
            for kind in SWAP_KINDS
            # Two shapes of one kind: the colour swap reads like the object swap, shown once.
            if kind in captions and (kind == "object_swap" or captions[kind] != captions.get("object_swap"))
        ]
    width, height = float(record.get("image_width") or 0), float(record.get("image_height") or 0)
    if len(objects) < 2 or width <= 0 or height <= 0:
        return []
    pair = clear_left_right_pair(
        [label for _, label, _ in objects], [box for _, _, box in objects], width, height, MIN_AREA_FRACTION
    )
    if pair is None:
        return []
    (left, left_label, _), (right, right_label, _) = (objects[i] for i in pair)
    true = relation_caption(left_label, "to the left of", right_label)
    swapped = relation_caption(right_label, "to the left of", left_label)
    return [RelationExample(image.key, "object_swap", true, swapped, left, right, "to the left of")]


@dataclass
class ScorerComparison:
    """One scorer's scores of the true caption and of its twin."""

    scorer: str
    true_score: float
    swapped_score: float

    @property
    def margin(self) -> float:
        """The true caption's score minus the twin's (positive: the true caption wins)."""
        return self.true_score - self.swapped_score

    def verdict(self) -> str:
        """What the scores say, in words: which caption wins and by how much, or that they are equal at the shown
        precision."""
        if abs(self.margin) < TIE_TOLERANCE:
            return "the model cannot tell these apart (equal scores to 3 decimals)"
        winner = "the true caption" if self.margin > 0 else "the swapped caption"
        return f"{winner} wins by {abs(self.margin):.3f}"


@dataclass
class SwapComparison:
    """A relation example scored: per scorer the two scores, and for each caption the region importance (score
    drop per masked region, `RetrievalDemo.region_importance`)."""

    example: RelationExample
    scores: list[ScorerComparison]
    true_importance: RegionImportance
    swapped_importance: RegionImportance


def share_sentence(result: dict[str, Any], scorer: str) -> str:
    """One scorer's gallery rate (`relation_swap_accuracy`) in words, read against its 95% interval and chance."""
    low, high = 100 * result["ci_low"], 100 * result["ci_high"]
    ties = int(result.get("ties") or 0)
    losses = result["n"] - result["wins"] - ties
    if low > 50:
        reading = "better than chance: it reads who is where here"
    elif high < 50 and losses > ties:
        reading = "worse than chance: it prefers the twin"
    elif high < 50:
        # The probe counts a tie as a loss: a rate this low made of ties is no preference for the twin.
        reading = (
            "below chance through ties (an equal score counts as a loss): the model cannot tell these twins apart"
        )
    else:
        reading = "no better than chance: the model cannot tell these twins apart"
    tied = f", {ties} ties" if ties else ""
    return (
        f"{SCORER_NAMES[scorer]}: the true caption wins for {result['wins']} of {result['n']} photos "
        f"({100 * result['accuracy']:.0f}%, 95% interval {low:.0f}-{high:.0f}%{tied}; chance 50%), {reading}."
    )


class RelationView:
    """The relation examples of a `RetrievalDemo`'s gallery and their scores.

    Args:
        demo: the app's engine (model, processor, gallery and its region records).
    """

    def __init__(self, demo: RetrievalDemo):
        self.demo = demo
        # Only photos with labelled boxes can have one: the others' records (read from disk for a cached gallery)
        # are never asked for.
        self.examples = [
            example
            for position, image in enumerate(demo.gallery)
            if image.box_labels is not None
            for example in relation_examples(image, demo.records[position])
        ]
        # Untrained projection heads (a pretraining checkpoint) give meaningless cosines: not shown.
        self.scorers = {
            name: scorer for name, scorer in SCORERS.items() if name == "cross_encoder" or not demo.untrained_heads
        }
        self._summary: dict[str, Any] | None = None

    def photos(self) -> list[str]:
        """The gallery photos with at least one example, in gallery order."""
        return list(dict.fromkeys(example.key for example in self.examples))

    def kinds(self, key: str) -> list[str]:
        return [example.kind for example in self.examples if example.key == key]

    def example(self, key: str | None, kind: str | None = None) -> RelationExample:
        """The example of photo `key` of that kind (its first one when `kind` is None or it has no such twin)."""
        if not key:
            raise AppInputError("Pick a gallery photo first.")
        mine = [example for example in self.examples if example.key == key]
        if not mine:
            raise AppInputError(
                f"{key!r} has no relation example: it needs two labelled objects in a clear relation "
                "(left/right, or above/below for the synthetic shapes)."
            )
        return next((example for example in mine if example.kind == kind), mine[0])

    def compare(self, example: RelationExample) -> SwapComparison:
        """Both captions of `example` scored against its photo by every scorer shown, with each caption's region
        importance."""
        demo = self.demo
        _, record = demo.gallery_image(example.key)
        captions = [example.true_caption, example.swapped_caption]
        text_inputs = dict(demo.processor(text=captions, return_tensors="pt"))
        region_inputs = dict(demo.processor(regions=[record], return_tensors="pt"))
        model = demo.retriever.model
        scores = []
        for name, scorer in self.scorers.items():
            values = scorer(
                model, text_inputs, region_inputs, torch.zeros(2, dtype=torch.long), torch.arange(2), demo.batch_size
            )
            true_score, swapped_score = (float(v) for v in torch.as_tensor(values).float())
            scores.append(ScorerComparison(name, true_score, swapped_score))
        return SwapComparison(
            example,
            scores,
            demo.region_importance(example.true_caption, record),
            demo.region_importance(example.swapped_caption, record),
        )

    def summary(self) -> dict[str, Any]:
        """`relation_swap_accuracy` over the examples of the gallery's first `MAX_SUMMARY_PHOTOS` photos with one, by
        kind and scorer (computed once)."""
        if self._summary is None:
            if not self.examples:
                raise AppInputError(
                    "no gallery photo has two labelled objects in a clear relation, so there is nothing to compare."
                )
            rows = {key: row for row, key in enumerate(self.photos()[:MAX_SUMMARY_PHOTOS])}
            records = [self.demo.gallery_image(key)[1] for key in rows]
            probes = [
                SwapProbe(rows[e.key], e.true_caption, e.swapped_caption, e.kind)
                for e in self.examples
                if e.key in rows
            ]
            region_inputs = dict(self.demo.processor(regions=records, return_tensors="pt"))
            try:
                self._summary = relation_swap_accuracy(
                    self.demo.retriever.model,
                    probes,
                    self.demo.processor.tokenizer,
                    region_inputs,
                    self.scorers,
                    self.demo.batch_size,
                    self.demo.processor.max_text_length,
                )
            except ValueError as error:  # e.g. a tokenizer that reads none of the gallery's object names
                raise AppInputError(str(error)) from None
        return self._summary

    def summary_lines(self, kind: str) -> list[str]:
        """The gallery's rate for `kind`, one sentence per scorer."""
        result = self.summary().get(kind, {})
        return [share_sentence(result[name], name) for name in self.scorers if name in result]

    def where(self, example: RelationExample) -> str:
        """Where the true caption's two objects are, from the annotated boxes of the photo's regions."""
        image, record = self.demo.gallery_image(example.key)
        boxes = np.asarray(record["region_boxes"], dtype=np.float32).reshape(-1, 4)
        names = image.box_labels or ()
        axis, side = (0, "width") if example.relation == "to the left of" else (1, "height")
        size = float(record.get(f"image_{side}") or boxes[:, 2 + axis].max())

        def place(region: int) -> str:
            centre = float(boxes[region, axis] + boxes[region, axis + 2]) / 2
            return f"the {names[region]} (region centre {'x' if axis == 0 else 'y'} = {centre:.0f} of {size:.0f})"

        return f"{place(example.first)} is {example.relation} {place(example.second)}."


__all__ = [
    "KIND_NAMES",
    "MAX_SUMMARY_PHOTOS",
    "MIN_AREA_FRACTION",
    "SCORER_NAMES",
    "TIE_TOLERANCE",
    "RelationExample",
    "RelationView",
    "ScorerComparison",
    "SwapComparison",
    "relation_examples",
    "share_sentence",
]
