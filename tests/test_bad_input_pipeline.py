"""Bad input at the pipeline boundary: `top_k`, `batch_size` and `shortlist_k` that are not counts, empty or
non-string texts, region records with NaN, and the 12000 x 12000 PNG bomb: every error names the argument,
`texts[i]` or `images[i]` and the path; nothing is converted, replaced by a default or decoded."""

import math

import numpy as np
import pytest
import torch

from .test_bad_images import BOMB_SIDE, _peak_rss_mib, _reset_peak_rss, png_zero_bomb
from .test_pipeline_retrieval import TEXTS, retriever, saved_model  # noqa: F401 - fixtures


COUNTS = ["top_k", "batch_size", "shortlist_k"]
BAD_COUNTS = [(0, ValueError), (-2, ValueError), (2.5, TypeError), ("3", TypeError), (True, TypeError)]
COUNT_CASES = [(name, value, error) for name in COUNTS for value, error in BAD_COUNTS]


@pytest.mark.parametrize(("name", "value", "error"), COUNT_CASES, ids=[f"{n}={v!r}" for n, v, _ in COUNT_CASES])
def test_a_count_that_is_not_a_count_is_named(retriever, saved_model, name, value, error):  # noqa: F811
    _, paths = saved_model
    with pytest.raises(error, match=rf"{name} must be"):
        retriever(images=paths[0], texts=TEXTS, **{name: value})


TEXT_CASES = [
    ("empty", ["a red circle", ""], ValueError, r"texts\[1\] is empty"),
    ("blank", ["   "], ValueError, r"texts\[0\] is empty"),
    ("single empty", "", ValueError, r"texts\[0\] is empty"),
    ("None", [None], TypeError, r"texts\[0\]"),
    ("bytes", [b"a red circle"], TypeError, r"texts\[0\]"),
    ("a number", 7, TypeError, "texts must be a string or a list"),
    ("empty list", [], ValueError, "texts is an empty list"),
]


@pytest.mark.parametrize(("texts", "error", "named"), [c[1:] for c in TEXT_CASES], ids=[c[0] for c in TEXT_CASES])
def test_bad_texts_are_named(retriever, saved_model, texts, error, named):  # noqa: F811
    _, paths = saved_model
    with pytest.raises(error, match=named):
        retriever(images=paths[0], texts=texts)


def _record(feature_size: int, **changes) -> dict:
    record = {
        "image_id": "cached",
        "region_features": np.ones((3, feature_size), dtype=np.float32),
        "region_locations": np.full((3, 5), 0.5, dtype=np.float32),
    }
    record.update(changes)
    return record


@pytest.mark.parametrize(
    ("name", "value"), [("region_features", math.nan), ("region_features", math.inf), ("region_locations", math.nan)]
)
def test_region_records_with_nan_are_named_not_scored(retriever, name, value):  # noqa: F811
    size = retriever.processor.image_processor.region_feature_size
    bad = _record(size)
    bad[name] = bad[name].copy()
    bad[name][1, 0] = value
    with pytest.raises(ValueError, match=rf"images\[1\] \(cached regions 'cached'\): {name} contain NaN or infinite"):
        retriever(images=[_record(size), bad], texts=TEXTS[0])


def test_the_bomb_is_refused_by_the_pipeline_before_decoding(retriever, saved_model, tmp_path):  # noqa: F811
    _, paths = saved_model
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_zero_bomb(BOMB_SIDE, BOMB_SIDE))
    measured = _reset_peak_rss()
    before = _peak_rss_mib() if measured else 0.0
    with pytest.raises(ValueError) as info:
        retriever(images=[paths[0], str(bomb)], texts=TEXTS[0])
    message = str(info.value)
    assert "images[1]" in message and str(bomb) in message and "12000x12000" in message, message
    if measured:
        grown = _peak_rss_mib() - before
        # Decoding it would take 137 MiB at least; the model and one real image cost a few.
        assert grown < 48, f"peak memory grew by {grown:.0f} MiB"


ARRAY_CASES = [
    ("strings", lambda: np.array([["a"] * 32] * 32), "an array of dtype <U1 holds no pixel values"),
    ("objects", lambda: np.array([[None] * 32] * 32, dtype=object), "an array of dtype object holds no pixel values"),
    ("complex", lambda: np.full((32, 32, 3), 0.5 + 1j, dtype=np.complex64), "dtype complex64 holds no pixel values"),
    ("datetimes", lambda: np.zeros((32, 32, 3), dtype="datetime64[s]"), "dtype datetime64\\[s\\] holds no pixel"),
    ("complex tensor", lambda: torch.rand(3, 32, 32, dtype=torch.complex64), "dtype torch.complex64 holds no pixel"),
    ("meta tensor", lambda: torch.empty(3, 32, 32, device="meta"), "a tensor on the meta device holds no pixels"),
    (
        "ragged record",
        lambda: {"region_features": [[1.0] * 8, [1.0] * 3], "region_locations": [[0.1] * 5] * 2},
        "region_features must hold numbers",
    ),
]


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in ARRAY_CASES], ids=[c[0] for c in ARRAY_CASES])
def test_arrays_without_pixel_values_are_named_among_the_images(retriever, saved_model, make, message):  # noqa: F811
    # They escaped as numpy's or torch's own errors (or, complex, were cast to their real part with a warning),
    # naming no image.
    _, paths = saved_model
    with pytest.raises(ValueError, match=rf"(?s)1 of 2 image\(s\) could not be used.*images\[0\] .*{message}"):
        retriever(images=[make(), paths[0]], texts=TEXTS[0])


def test_a_bfloat16_image_tensor_reads_as_its_float32_values(retriever, saved_model):  # noqa: F811
    image = torch.rand(3, 32, 32).to(torch.bfloat16)
    expected = retriever(images=image.float(), texts=TEXTS[:1])[0]["score"]
    assert retriever(images=image, texts=TEXTS[:1])[0]["score"] == expected
