"""The region picture: a photo with its regions boxed and labelled, coloured by how much each mattered, and a ranked
legend beside it that says what the colours, names and numbers are, so that it reads at a glance.

A region's importance for a (text, photo) match is its score drop, `score(all regions) - score(that region masked
out)` (`RetrievalDemo.region_importance`): red when masking the region lowers the score (it supported the match),
blue when masking it raises the score, grey when it changes little, and thicker the larger the drop is against the
largest one of the photo."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .engine import LABEL_SOURCES, RegionImportance, RegionLabel


DISPLAY_SIDE = 448
LEGEND_WIDTH = 330
# Boxes without an importance (a photo not yet matched with a text) cycle through these.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
SUPPORT = np.array((200, 30, 40), dtype=np.float32)  # red: masking it lowers the score (a positive drop)
AGAINST = np.array((40, 90, 210), dtype=np.float32)  # blue: masking it raises the score (a negative drop)
NEUTRAL = np.array((150, 150, 150), dtype=np.float32)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def importance_colour(weight: float) -> tuple[int, int, int]:
    """The colour of a region whose score drop, over the largest drop of its photo, is `weight` in [-1, 1]: grey at
    0, red towards +1 (masking the region lowers the score), blue towards -1 (masking it raises the score)."""
    weight = float(np.clip(weight, -1.0, 1.0))
    end = SUPPORT if weight >= 0 else AGAINST
    colour = NEUTRAL + abs(weight) * (end - NEUTRAL)
    return tuple(int(round(c)) for c in colour)


def region_weights(importance: RegionImportance | None, count: int) -> np.ndarray | None:
    """Each region's score drop over the largest drop in absolute value, in [-1, 1]."""
    if importance is None:
        return None
    drops = np.asarray(importance.drops, dtype=np.float32)[:count]
    scale = float(np.abs(drops).max()) if len(drops) else 0.0
    return drops / scale if scale > 0 else np.zeros_like(drops)


def render_regions(
    photo: Image.Image,
    record: dict[str, Any],
    labels: Sequence[RegionLabel],
    importance: RegionImportance | None = None,
    text: str | None = None,
) -> Image.Image:
    """The photo with its regions drawn, and a legend listing them, most important first.

    Args:
        photo: the image the record's boxes refer to (its size is `record["image_width"]` x `["image_height"]`).
        record: its region record (`region_boxes` in pixels).
        labels: what to write on each box (`region_labels`).
        importance: the score drops of `RegionImportance` for the matched text; boxes are then coloured red
            (masking the region lowers the score) to blue (masking it raises the score) and drawn thicker the more
            they mattered.
        text: the matched text, written above the legend.
    """
    boxes = np.asarray(record["region_boxes"], dtype=np.float32).reshape(-1, 4)
    count = len(boxes)
    width = float(record.get("image_width") or photo.width)
    height = float(record.get("image_height") or photo.height)
    scale = DISPLAY_SIDE / max(width, height)
    shown = photo.convert("RGB").resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC
    )
    weights = region_weights(importance, count)
    order = importance.ranking()[:count] if importance is not None else list(range(count))
    rank_of = {region: rank for rank, region in enumerate(order, start=1)}

    canvas = Image.new("RGB", (shown.width + LEGEND_WIDTH, max(shown.height, 250 + 26 * count)), (255, 255, 255))
    canvas.paste(shown, (0, 0))
    draw = ImageDraw.Draw(canvas)
    tag_font, legend_font, title_font = _font(13), _font(14), _font(15)

    def colour_of(region: int) -> tuple[int, int, int]:
        return importance_colour(weights[region]) if weights is not None else PALETTE[region % len(PALETTE)]

    def tag_of(region: int) -> str:
        label = labels[region] if region < len(labels) else RegionLabel(f"region {region + 1}")
        score = f" {100 * label.score:.0f}%" if label.score is not None else ""
        return f"#{rank_of[region]} {label.name}{score}"

    # Tags are placed most important first (each at its box's corner, moved down past the tags already there),
    # boxes drawn least important first so the most important is on top, and tags last, over every box.
    placed: list[tuple[float, float, float, float]] = []
    tags = {}
    for region in order:
        x1, y1 = (max(0.0, float(v) * scale) for v in boxes[region][:2])
        tag = tag_of(region)
        left, top, right, bottom = draw.textbbox((0, 0), tag, font=tag_font)
        tag_w, tag_h = right - left + 6, bottom - top + 6
        tag_x, tag_y = min(x1 + 2, max(0.0, shown.width - tag_w)), y1 + 2
        while (
            any(
                tag_x < px2 and px1 < tag_x + tag_w and tag_y < py2 and py1 < tag_y + tag_h
                for px1, py1, px2, py2 in placed
            )
            and tag_y + 2 * tag_h < shown.height
        ):
            tag_y += tag_h + 1
        placed.append((tag_x, tag_y, tag_x + tag_w, tag_y + tag_h))
        tags[region] = (tag, tag_x, tag_y, tag_w, tag_h, top)
    for region in reversed(order):
        x1, y1, x2, y2 = (float(v) * scale for v in boxes[region])
        x1, y1 = max(0.0, x1), max(0.0, y1)
        x2, y2 = min(shown.width - 1.0, x2), min(shown.height - 1.0, y2)
        thickness = 2 + (round(6 * abs(float(weights[region]))) if weights is not None else 1)
        draw.rectangle((x1, y1, x2, y2), outline=colour_of(region), width=thickness)
    for region in reversed(order):
        tag, tag_x, tag_y, tag_w, tag_h, top = tags[region]
        draw.rectangle((tag_x, tag_y, tag_x + tag_w, tag_y + tag_h), fill=colour_of(region))
        draw.text((tag_x + 3, tag_y + 3 - top), tag, fill=(255, 255, 255), font=tag_font)

    x, y = shown.width + 14, 10
    if importance is not None:
        draw.text((x, y), "Regions, most important first", fill=(0, 0, 0), font=title_font)
        y += 22
        if text:
            for line in textwrap.wrap(f'for "{text}" (score {importance.score:.3f})', 40)[:3]:
                draw.text((x, y), line, fill=(70, 70, 70), font=legend_font)
                y += 18
        draw.text((x, y), "drop: score minus the score without it", fill=(70, 70, 70), font=legend_font)
        y += 24
    else:
        draw.text((x, y), "Extracted regions", fill=(0, 0, 0), font=title_font)
        y += 30
    for region in order:
        draw.rectangle((x, y + 2, x + 14, y + 16), fill=colour_of(region))
        line = tag_of(region)
        if importance is not None:
            line += f"   drop {float(importance.drops[region]):+.3f}"
        draw.text((x + 22, y), line[:42], fill=(0, 0, 0), font=legend_font)
        y += 26
    y += 4
    notes: list[str] = []
    if importance is not None:
        notes += [
            "red: masking it lowers the score",
            "blue: masking it raises the score",
            "grey: masking it changes little",
            "thicker: a larger drop",
        ]
    sources = dict.fromkeys(label.source for label in labels[:count])
    notes += [LABEL_SOURCES[source] for source in sources if source in LABEL_SOURCES]
    for line in notes:
        draw.text((x, y), line, fill=(90, 90, 90), font=tag_font)
        y += 17
    return canvas


__all__ = ["importance_colour", "region_weights", "render_regions"]
