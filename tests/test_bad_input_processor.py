"""Bad input at the processor boundary: text of the wrong type or empty, lengths that are not lengths, counts that
disagree, region records whose rows disagree or hold NaN, and class labels beyond the extractor's classes fail
naming the argument (never reshaped, clamped or replaced by a default)."""

import math

import numpy as np
import pytest
from PIL import Image

from imagebert_hf import ImageBERTRoIExtractor
from imagebert_hf.models.imagebert.processing_imagebert import ImageBERTProcessor


F = 8  # feature size of the hand-made region records


class _Regions(ImageBERTRoIExtractor):
    """The precomputed layout without files: records are given with regions=, so only the sizes matter."""

    @property
    def region_feature_size(self) -> int:
        return F

    @property
    def num_object_classes(self) -> int:
        return 5


@pytest.fixture(scope="module")
def processor(tokenizer):
    extractor = _Regions(backbone_name="test_efficientnet", backbone_weights=None, max_regions=4)
    return ImageBERTProcessor(extractor, tokenizer, max_text_length=12, max_regions=4)


def record(rows: int = 3, locations: int | None = None, **changes) -> dict:
    locations = rows if locations is None else locations
    out = {
        "image_id": "img",
        "region_features": np.ones((rows, F), dtype=np.float32),
        "region_locations": np.full((locations, 5), 0.5, dtype=np.float32),
        "region_class_labels": np.zeros(rows, dtype=np.int64),
    }
    out.update(changes)
    return out


TEXT_CASES = [
    ("a number", 5, TypeError, "text must be a string"),
    ("a dict", {"a": 1}, TypeError, "text must be a string"),
    ("empty list", [], ValueError, "text is an empty list"),
    ("empty string", "", ValueError, r"text\[0\] is empty"),
    ("blank string", "   ", ValueError, r"text\[0\] is empty"),
    ("an empty one of two", ["a red circle", ""], ValueError, r"text\[1\] is empty"),
    ("a number in the list", ["a red circle", 3], TypeError, r"text\[1\] must be a string"),
    ("None in the list", [None], TypeError, r"text\[0\] must be a string"),
    ("bytes in the list", [b"a red circle"], TypeError, r"text\[0\] must be a string"),
    ("a nested list", [["a", "red"]], TypeError, r"text\[0\] must be a string"),
]


@pytest.mark.parametrize(("text", "error", "named"), [c[1:] for c in TEXT_CASES], ids=[c[0] for c in TEXT_CASES])
def test_bad_text_is_named(processor, text, error, named):
    with pytest.raises(error, match=named):
        processor(text=text)


LENGTH_CASES = [
    ("max_length", 0, ValueError),
    ("max_length", 1, ValueError),
    ("max_length", -4, ValueError),
    ("max_length", 8.0, TypeError),
    ("max_length", "8", TypeError),
    ("max_length", True, TypeError),
    ("max_regions", 0, ValueError),
    ("max_regions", -1, ValueError),
    ("max_regions", 2.5, TypeError),
    ("max_regions", "4", TypeError),
]


@pytest.mark.parametrize(("name", "value", "error"), LENGTH_CASES, ids=[f"{n}={v!r}" for n, v, _ in LENGTH_CASES])
def test_a_length_that_is_not_a_length_is_named_not_replaced(processor, name, value, error):
    with pytest.raises(error, match=rf"{name} must be"):
        processor(text=["a red circle"], regions=[record()], **{name: value})


def test_an_explicit_max_length_is_used(processor):
    out = processor(text=["a red circle"], max_length=3, return_tensors="np")
    assert out["input_ids"].shape == (1, 3)


CALL_CASES = [
    ("texts and regions disagree", {"text": ["a", "b"], "regions": [record()]}, ValueError, "got 2 texts and 1"),
    ("nothing", {}, ValueError, "at least text"),
    ("images and regions", {"images": [Image.new("RGB", (8, 8))], "regions": [record()]}, ValueError, "not both"),
    ("padding", {"text": "a", "padding": "do_not_pad"}, ValueError, "padding must be one of"),
    ("regions a string", {"regions": "img.npz"}, TypeError, "regions must be a region record"),
    ("regions a number", {"regions": 3}, TypeError, "regions must be a region record"),
    ("regions empty", {"regions": []}, ValueError, "regions is an empty list"),
    ("a record a list", {"regions": [[1, 2, 3]]}, TypeError, r"regions\[0\] must be a region record"),
    ("boxes without images", {"text": "a", "boxes": [[0, 0, 1, 1]]}, ValueError, "need images"),
]


@pytest.mark.parametrize(("kwargs", "error", "named"), [c[1:] for c in CALL_CASES], ids=[c[0] for c in CALL_CASES])
def test_bad_call_is_named(processor, kwargs, error, named):
    with pytest.raises(error, match=named):
        processor(**kwargs)


RECORD_CASES = [
    ("six features three locations", record(6, 3), "shape"),
    ("three features six locations", record(3, 6), "shape"),
    ("locations of 4 values", record(region_locations=np.zeros((3, 4), np.float32)), "location sizes"),
    ("features one-dimensional", record(region_features=np.ones(F, np.float32)), "shape"),
    ("NaN feature", record(region_features=np.where(np.eye(3, F) > 0, math.nan, 1.0)), "NaN"),
    ("infinite location", record(region_locations=np.full((3, 5), math.inf, np.float32)), "NaN or infinite"),
    ("no locations", {"image_id": "img", "region_features": np.ones((3, F), np.float32)}, "region_locations"),
    ("a failed extraction", record(error="file not found"), "file not found"),
    ("another feature size", record(region_features=np.ones((3, F + 1), np.float32)), "feature size"),
]


@pytest.mark.parametrize(("bad", "named"), [c[1:] for c in RECORD_CASES], ids=[c[0] for c in RECORD_CASES])
def test_bad_region_records_are_named_never_reshaped(processor, bad, named):
    with pytest.raises(ValueError, match=named):
        processor(text=["a red circle", "a blue square"], regions=[record(), bad], padding="longest")


LABEL_CASES = [
    ("beyond the classes", [0, 5, 1]),
    ("far beyond", [150, 0, 0]),
    ("negative", [-1, 0, 0]),
    ("-99", [0, -99, 0]),
]


@pytest.mark.parametrize("labels", [c[1] for c in LABEL_CASES], ids=[c[0] for c in LABEL_CASES])
def test_out_of_range_class_labels_are_refused_not_clamped(processor, labels):
    bad = record(region_class_labels=np.asarray(labels))
    with pytest.raises(ValueError, match=r"regions\[0\] .*region_class_labels .* outside \[0, 5\)"):
        processor(regions=[bad], return_region_labels=True)


def test_good_labels_and_padding_pass(processor):
    good = record(region_class_labels=np.asarray([-100, 0, 4]))
    out = processor(regions=[good], return_region_labels=True, return_tensors="np")
    assert out["region_class_labels"][0].tolist() == [-100, 0, 4, -100]
