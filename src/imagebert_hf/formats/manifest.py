"""The jsonl manifest + image folder layout: one JSON object per line, one line per image.

```
{"image": "images/000000000139.jpg", "captions": ["A woman stands ...", ...], "width": 640, "height": 426,
 "objects": [{"label": "tv", "class_id": 62, "bbox_xywh": [7.03, 167.76, 149.32, 94.87]}, ...], ...}
```

`image` is relative to the manifest's folder (or to `image_root`); `captions` (or one `caption`) is required;
`objects` with `bbox_xywh` (absolute pixels, COCO style) or `bbox_xyxy` is optional. Other keys are kept in
`extra`. Reading is pure: no image is opened. Every line is checked where it is read: a malformed one raises
`ManifestError` with `file:line` and the field; captions must be non-empty strings, and an `image` path that leaves
the image root (absolute, or `../`) is refused unless `allow_outside_root=True`. A key given twice in one object, a
path holding NUL, a box corner that is not finite, a `class_id` outside `[0, MAX_CLASS_ID]` (other than -1, none)
and an `image_id` / `coco_id` that is not a non-empty string or an integer are refused too.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import DuplicateJSONKeyError, loads_json


_KNOWN_KEYS = {"image", "captions", "caption", "objects", "width", "height"}
# Keys of `extra` that name the image, in the order the retrieval gallery takes its id from them.
ID_KEYS = ("image_id", "coco_id")
# Class ids are stored as int64 and index a classifier: past this bound an id is a damaged value, not a class.
MAX_CLASS_ID = 2**31 - 1


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
        where (`str`): Where the line is (`file:line`), for messages about the record.
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
    where: str = field(default="", compare=False, repr=False)

    @property
    def image_id(self) -> str:
        """The image's id in a retrieval gallery: the line's `image_id`, else its `coco_id` (0 included), else the
        image path as written, unique per image where the file name alone would make images/train/001.jpg and
        images/val/001.jpg one item. Lines of one id are one image (`merge_duplicate_images`)."""
        return str(self.extra[self.id_field]) if self.id_field is not None else self.image

    @property
    def id_field(self) -> str | None:
        """The field `image_id` reads (`image_id`, else `coco_id`), or None when the line has neither."""
        return next((key for key in ID_KEYS if self.extra.get(key) is not None), None)


class ManifestError(ValueError):
    """A manifest line that cannot be read; the message starts with `file:line` and names the field."""


def _fail(where: str, message: str):
    raise ManifestError(f"{where}: {message}" if where else message)


def _number(value: Any, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(where, f"{name} must be a finite number, got {value!r}")
    return float(value)


def _parse_objects(objects: Any, where: str):
    if not isinstance(objects, list):
        _fail(where, f"'objects' must be a list of objects, got {type(objects).__name__} {objects!r:.60}")
    boxes, labels, class_ids = [], [], []
    for i, obj in enumerate(objects):
        name = f"objects[{i}]"
        if not isinstance(obj, dict):
            _fail(where, f"{name} must be an object with bbox_xywh or bbox_xyxy, got {obj!r:.60}")
        key = "bbox_xyxy" if "bbox_xyxy" in obj else "bbox_xywh" if "bbox_xywh" in obj else None
        if key is None:
            _fail(where, f"{name} has neither bbox_xywh nor bbox_xyxy")
        box = obj[key]
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            _fail(where, f"{name}.{key} must be 4 numbers, got {box!r:.60}")
        a, b, c, d = (_number(v, where, f"{name}.{key}[{k}]") for k, v in enumerate(box))
        x1, y1, x2, y2 = (a, b, c, d) if key == "bbox_xyxy" else (a, b, a + c, b + d)
        if not (math.isfinite(x2) and math.isfinite(y2)):
            _fail(where, f"{name}.{key} gives a corner that is not finite (x2={x2}, y2={y2}), got {list(box)}")
        if x2 < x1 or y2 < y1:
            _fail(where, f"{name}.{key} has a negative width or height, got {list(box)}")
        label, class_id = obj.get("label", ""), obj.get("class_id", -1)
        if not isinstance(label, str):
            _fail(where, f"{name}.label must be a string, got {label!r}")
        if isinstance(class_id, bool) or not isinstance(class_id, int):
            _fail(where, f"{name}.class_id must be an integer, got {class_id!r}")
        if class_id != -1 and not 0 <= class_id <= MAX_CLASS_ID:
            _fail(where, f"{name}.class_id must be in [0, {MAX_CLASS_ID}] (or -1 for none), got {class_id!r}")
        boxes.append((x1, y1, x2, y2))
        labels.append(label)
        class_ids.append(class_id)
    return tuple(boxes), tuple(labels), tuple(class_ids)


def _captions(item: dict[str, Any], where: str) -> tuple[str, ...]:
    if "captions" in item:
        captions = item["captions"]
        if isinstance(captions, str):
            _fail(
                where,
                f"'captions' must be a list of strings, got the string {captions!r:.60} (write [...] or use 'caption')",
            )
        if not isinstance(captions, list) or not captions:
            _fail(where, f"'captions' must be a non-empty list of strings, got {captions!r:.60}")
        name = "captions[{}]"
    elif "caption" in item:
        captions, name = [item["caption"]], "caption"
    else:
        _fail(where, "no 'captions' (or 'caption') key")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            _fail(where, f"{name.format(i)} must be a non-empty string, got {caption!r:.60}")
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError:
            # JSON's "\ud800" escape gives a lone surrogate, which no tokenizer reads: found here, not at its batch.
            _fail(where, f"{name.format(i)} holds a lone surrogate (a broken \\u escape), not text: {caption!r:.60}")
    return tuple(captions)


def image_path_inside_root(
    image: Any, image_root: str | os.PathLike, where: str, allow_outside_root: bool = False, field: str = "image"
) -> Path:
    """`image_root / image`, refusing (`ManifestError` naming `where` and `field`) a path that is not a non-empty
    string or, unless `allow_outside_root`, one that leaves the image root (absolute, or `../`): the rule for every
    image path read from a user's file (manifests, Karpathy split files)."""
    if not isinstance(image, str) or not image.strip():
        _fail(where, f"{field!r} must be a non-empty path string, got {image!r:.60}")
    if "\0" in image:
        # The OS cuts a path at NUL (or refuses it): the file opened would not be the one named.
        _fail(where, f"{field!r} holds a NUL character, got {image!r:.60}")
    path = Path(image_root) / image
    if not allow_outside_root:
        root = os.path.normpath(os.path.abspath(image_root))
        resolved = os.path.normpath(os.path.abspath(path))
        if os.path.isabs(image) or os.path.commonpath([root, resolved]) != root:
            _fail(
                where,
                f"{field!r} {image!r} points outside the image root {image_root}; give a path inside it, or pass "
                "allow_outside_root=True to follow it",
            )
    return path


def outside_root_flag(paths: str) -> Any:
    """The `allow_outside_root` field of a script's argument dataclass (`HfArgumentParser`), `paths` naming the
    image paths it lets leave their root."""
    return field(
        default=False,
        metadata={
            "help": f"Follow image paths of {paths} that leave their image root (absolute, or ../); refused by "
            "default."
        },
    )


def parse_manifest_line(
    line: str | dict[str, Any],
    image_root: str | os.PathLike,
    where: str = "",
    allow_outside_root: bool = False,
) -> ManifestRecord:
    """Parses one manifest line (a JSON string or an already decoded dict); a malformed line raises
    `ManifestError` naming `where` (`file:line`) and the field.

    Args:
        line: The line.
        image_root: Folder the `image` path is relative to.
        where: Printed before every error.
        allow_outside_root: Follow `image` paths that leave `image_root` (absolute, or `../`); refused by default.
    """
    try:
        item = loads_json(line) if isinstance(line, str) else line
    except json.JSONDecodeError as error:
        _fail(where, f"invalid JSON ({error})")
    except DuplicateJSONKeyError as error:
        _fail(where, f"key {error.key!r} appears twice in one object; JSON keeps only the last, so write it once")
    except ValueError as error:  # a number of more digits than Python converts
        _fail(where, f"invalid JSON ({error})")
    if not isinstance(item, dict):
        _fail(where, f"a line must be a JSON object, got {type(item).__name__}")
    if "image" not in item:
        _fail(where, "no 'image' key")
    captions = _captions(item, where)
    image_path = image_path_inside_root(item["image"], image_root, where, allow_outside_root)
    boxes = labels = class_ids = None
    if item.get("objects") is not None:
        boxes, labels, class_ids = _parse_objects(item["objects"], where)
    for key in ("width", "height"):
        value = item.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            _fail(where, f"{key!r} must be a positive integer, got {value!r}")
    for key in ID_KEYS:
        value = item.get(key)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, (str, int))
            or (isinstance(value, str) and not value.strip())
        ):
            _fail(where, f"{key!r} must be a non-empty string or an integer, got {value!r:.60}")
    return ManifestRecord(
        image=item["image"],
        image_path=image_path,
        captions=captions,
        boxes=boxes,
        box_labels=labels,
        box_class_ids=class_ids,
        width=item.get("width"),
        height=item.get("height"),
        extra={key: value for key, value in item.items() if key not in _KNOWN_KEYS},
        where=where,
    )


def check_id_text(value: Any, field: str, where: str, seen: dict[str, tuple[Any, str, str]]) -> None:
    """Refuses an integer id that reads as a string id of an earlier line (or the reverse), naming both lines: ids
    are compared as text (`ManifestRecord.image_id`), so `1` and `"1"` would be one image without a word. `seen`
    maps each id's text to the value, field and place of its first line; the caller keeps it across the lines of
    one gallery or source."""
    earlier = seen.setdefault(str(value), (value, field, where))
    if type(earlier[0]) is not type(value):
        kinds = {int: "an integer", str: "a string"}
        raise ManifestError(
            f"{where}: {field!r} is {value!r} ({kinds[type(value)]}), but {earlier[2]} gives {earlier[1]!r} "
            f"{earlier[0]!r} ({kinds[type(earlier[0])]}); ids are compared as text, so these would be one image. "
            "Write every id as a string, or every id as an integer."
        )


def iter_manifest(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, allow_outside_root: bool = False
) -> Iterator[ManifestRecord]:
    """Yields the records of a jsonl manifest; blank lines are skipped, a malformed line raises `ManifestError`
    with `file:line` and the field.

    Args:
        path: The `.jsonl` file.
        image_root: Folder the `image` paths are relative to; the manifest's folder by default.
        allow_outside_root: Follow `image` paths that leave the image root (absolute, or `../`); refused by default.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    with open(path, encoding="utf-8") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield parse_manifest_line(line, root, f"{path}:{number}", allow_outside_root)
        except UnicodeDecodeError as error:
            raise ManifestError(f"{path}: not UTF-8 text ({error})") from None


def read_manifest(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, allow_outside_root: bool = False
) -> list[ManifestRecord]:
    """All records of a jsonl manifest (see `iter_manifest`)."""
    return list(iter_manifest(path, image_root, allow_outside_root))


__all__ = [
    "ID_KEYS",
    "ManifestError",
    "ManifestRecord",
    "check_id_text",
    "image_path_inside_root",
    "iter_manifest",
    "outside_root_flag",
    "parse_manifest_line",
    "read_manifest",
]
