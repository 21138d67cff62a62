"""The jsonl manifest + image folder layout: one JSON object per line, one line per image.

```
{"image": "images/000000000139.jpg", "captions": ["A woman stands ...", ...], "width": 640, "height": 426,
 "objects": [{"label": "tv", "class_id": 62, "bbox_xywh": [7.03, 167.76, 149.32, 94.87]}, ...], ...}
```

`image` is relative to the manifest's folder (or to `image_root`); `captions` (or one `caption`) is required;
`objects` with `bbox_xywh` (absolute pixels, COCO style) or `bbox_xyxy` is optional. Other keys are kept in
`extra`. Reading is pure: no image is opened.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


_KNOWN_KEYS = {"image", "captions", "caption", "objects", "width", "height"}


@dataclass(frozen=True)
class ManifestRecord:
    """One image of a manifest.

    Attributes:
        image (`str`): The image path as written in the manifest (the record's key in a region cache).
        image_path (`Path`): That path resolved against the image root.
        captions (`tuple[str, ...]`): Its captions.
        boxes (`tuple[tuple[float, float, float, float], ...] | None`): Object boxes `x1, y1, x2, y2` in pixels,
            or None when the manifest gives no objects.
        box_labels (`tuple[str, ...] | None`): The objects' label names.
        box_class_ids (`tuple[int, ...] | None`): The objects' class ids.
        width (`int | None`): Width stated by the manifest.
        height (`int | None`): Height stated by the manifest.
        extra (`dict`): Every other key of the line.
    """

    image: str
    image_path: Path
    captions: tuple[str, ...]
    boxes: tuple[tuple[float, float, float, float], ...] | None = None
    box_labels: tuple[str, ...] | None = None
    box_class_ids: tuple[int, ...] | None = None
    width: int | None = None
    height: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def _parse_objects(objects: list[dict[str, Any]], where: str):
    boxes, labels, class_ids = [], [], []
    for obj in objects:
        if "bbox_xyxy" in obj:
            x1, y1, x2, y2 = (float(v) for v in obj["bbox_xyxy"])
        elif "bbox_xywh" in obj:
            x, y, w, h = (float(v) for v in obj["bbox_xywh"])
            x1, y1, x2, y2 = x, y, x + w, y + h
        else:
            raise ValueError(f"{where}: an object has neither bbox_xywh nor bbox_xyxy")
        boxes.append((x1, y1, x2, y2))
        labels.append(str(obj.get("label", "")))
        class_ids.append(int(obj.get("class_id", -1)))
    return tuple(boxes), tuple(labels), tuple(class_ids)


def parse_manifest_line(line: str | dict[str, Any], image_root: str | os.PathLike, where: str = "") -> ManifestRecord:
    """Parses one manifest line (a JSON string or an already decoded dict)."""
    item = json.loads(line) if isinstance(line, str) else dict(line)
    if "image" not in item:
        raise ValueError(f"{where}: no 'image' key")
    captions = item.get("captions", [item["caption"]] if "caption" in item else None)
    if captions is None:
        raise ValueError(f"{where}: no 'captions' (or 'caption') key")
    boxes = labels = class_ids = None
    if item.get("objects") is not None:
        boxes, labels, class_ids = _parse_objects(item["objects"], where)
    return ManifestRecord(
        image=str(item["image"]),
        image_path=Path(image_root) / item["image"],
        captions=tuple(str(c) for c in captions),
        boxes=boxes,
        box_labels=labels,
        box_class_ids=class_ids,
        width=item.get("width"),
        height=item.get("height"),
        extra={key: value for key, value in item.items() if key not in _KNOWN_KEYS},
    )


def iter_manifest(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> Iterator[ManifestRecord]:
    """Yields the records of a jsonl manifest; blank lines are skipped, a malformed line raises ValueError with its
    line number.

    Args:
        path: The `.jsonl` file.
        image_root: Folder the `image` paths are relative to; the manifest's folder by default.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield parse_manifest_line(line, root, where=f"{path}:{number}")
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: invalid JSON ({error})") from None


def read_manifest(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[ManifestRecord]:
    """All records of a jsonl manifest (see `iter_manifest`)."""
    return list(iter_manifest(path, image_root))


__all__ = ["ManifestRecord", "iter_manifest", "parse_manifest_line", "read_manifest"]
