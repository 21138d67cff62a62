"""Box geometry: format conversion, clipping, the multi-scale grid and the location features (5-d, or UNITER's 7-d).

All boxes here are float32 arrays of shape (R, 4) in pixels of the original image, `x1, y1, x2, y2`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


BOX_FORMATS = ("xyxy", "xywh")


def as_boxes(boxes, box_format: str = "xyxy") -> np.ndarray:
    """Converts boxes in `box_format` ("xyxy", or "xywh" as COCO) to a float32 (R, 4) `x1, y1, x2, y2` array.

    Raises:
        ValueError: When the array does not have 4 columns, holds NaN/inf, or has negative widths or heights.
    """
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}.")
    array = np.asarray(boxes if boxes is not None else [], dtype=np.float32)
    if array.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    if array.ndim == 1 and array.shape[0] == 4:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must have shape (R, 4), got {tuple(array.shape)}.")
    if not np.isfinite(array).all():
        raise ValueError("boxes contain NaN or infinite values.")
    if box_format == "xywh":
        array = np.concatenate([array[:, :2], array[:, :2] + array[:, 2:]], axis=1)
    if (array[:, 2] < array[:, 0]).any() or (array[:, 3] < array[:, 1]).any():
        raise ValueError("boxes must satisfy x2 >= x1 and y2 >= y1 (is box_format right?).")
    return np.ascontiguousarray(array, dtype=np.float32)


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clips boxes to the image `[0, width] x [0, height]`."""
    clipped = boxes.astype(np.float32, copy=True)
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    return clipped


LOCATION_SIZES = (5, 7)


def box_locations(boxes: np.ndarray, width: int, height: int, size: int = 5) -> np.ndarray:
    """The location feature of each box, every value in [0, 1].

    `size=5` is the ImageBERT paper's `(x1/W, y1/H, x2/W, y2/H, area/(W*H))`; `size=7` is UNITER's
    `(x1/W, y1/H, x2/W, y2/H, w/W, h/H, (w/W)*(h/H))` with `w = x2 - x1`, `h = y2 - y1`.

    Args:
        boxes: (R, 4) pixel boxes `x1, y1, x2, y2` (clipped to the image here).
        width: Image width W.
        height: Image height H.
        size: 5 or 7.

    Returns:
        float32 array of shape (R, size).
    """
    if size not in LOCATION_SIZES:
        raise ValueError(f"location size must be one of {LOCATION_SIZES}, got {size}.")
    boxes = clip_boxes(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), width, height)
    scale = np.array([width, height, width, height], dtype=np.float32)
    corners = boxes / scale
    relative_w = corners[:, 2] - corners[:, 0]
    relative_h = corners[:, 3] - corners[:, 1]
    if size == 5:
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / np.float32(width * height)
        extra = [area[:, None]]
    else:
        extra = [relative_w[:, None], relative_h[:, None], (relative_w * relative_h)[:, None]]
    return np.concatenate([corners, *extra], axis=1).clip(0.0, 1.0).astype(np.float32)


def grid_boxes(width: int, height: int, grid_sizes: Sequence[int]) -> np.ndarray:
    """Boxes tiling the image at several scales: an n x n grid for each n in `grid_sizes`, coarse to fine.

    `(1, 2, 3, 4, 5, 6)` gives 1 + 4 + 9 + 16 + 25 + 36 = 91 regions: the whole image, halves, thirds and so on,
    a detector-free stand-in for object proposals.
    """
    boxes = []
    for n in grid_sizes:
        if n < 1:
            raise ValueError(f"grid sizes must be positive, got {n}.")
        xs = np.linspace(0.0, width, n + 1, dtype=np.float64)
        ys = np.linspace(0.0, height, n + 1, dtype=np.float64)
        for row in range(n):
            for column in range(n):
                boxes.append((xs[column], ys[row], xs[column + 1], ys[row + 1]))
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def scale_boxes(boxes: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """Multiplies x coordinates by `scale_x` and y coordinates by `scale_y`."""
    return (boxes * np.array([scale_x, scale_y, scale_x, scale_y], dtype=np.float32)).astype(np.float32)


__all__ = ["LOCATION_SIZES", "as_boxes", "box_locations", "clip_boxes", "grid_boxes", "scale_boxes"]
