"""Stage 5: aggregation over the whole corpus.

Two grouped steps, each a pure function over one group of small key records (`pair_id`, `image_hash`,
`text_key`, `relevance_score`), so the local runner can group in memory and Spark with `groupByKey`:

1. by text: a text attached to more than `max_images_per_text` distinct images is dropped with all its pairs
   (site-wide captions such as "photo of the day");
2. by image content hash: an image found several times keeps only its best-scored text
   (ties broken by `pair_id`, so reruns are identical).
"""

from __future__ import annotations

from .config import AggregationConfig
from .tally import INPUT, KEPT, Tally


STAGE = "aggregation"


def aggregate_text_group(rows: list[dict], config: AggregationConfig) -> tuple[list[dict], Tally]:
    """Keeps the pairs of one text unless it is shared by too many distinct images."""
    tally = Tally()
    tally.add(STAGE, "pair", INPUT, len(rows))
    if len({row["image_hash"] for row in rows}) > config.max_images_per_text:
        tally.drop(STAGE, "pair", "text_shared_by_too_many_images", len(rows))
        return [], tally
    return list(rows), tally


def aggregate_image_group(rows: list[dict]) -> tuple[list[dict], Tally]:
    """Keeps the best-scored pair of one image."""
    tally = Tally()
    if not rows:
        return [], tally
    best = min(rows, key=lambda row: (-row["relevance_score"], row["pair_id"]))
    tally.drop(STAGE, "pair", "duplicate_image_lower_score", len(rows) - 1)
    tally.add(STAGE, "pair", KEPT)
    return [best], tally


def aggregate(keys: list[dict], config: AggregationConfig) -> tuple[set[str], Tally]:
    """Runs both steps in memory over all key records; returns the kept `pair_id`s and the counts."""
    tally = Tally()
    by_text: dict[str, list[dict]] = {}
    for row in keys:
        by_text.setdefault(row["text_key"], []).append(row)
    by_image: dict[str, list[dict]] = {}
    for text in sorted(by_text):
        kept, counts = aggregate_text_group(by_text[text], config)
        tally.update(counts)
        for row in kept:
            by_image.setdefault(row["image_hash"], []).append(row)
    kept_ids: set[str] = set()
    for image_hash in sorted(by_image):
        kept, counts = aggregate_image_group(by_image[image_hash])
        tally.update(counts)
        kept_ids.update(row["pair_id"] for row in kept)
    return kept_ids, tally


__all__ = ["STAGE", "aggregate", "aggregate_image_group", "aggregate_text_group"]
