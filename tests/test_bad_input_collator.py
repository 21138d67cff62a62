"""Bad input at the pretraining collator: token ids beyond the tokenizer, NaN regions, region class labels beyond
the MOC head (never clamped), ITM labels other than 0/1 and rows that disagree fail naming the sample."""

import math

import numpy as np
import pytest

from imagebert_hf.data.collator import DataCollatorForImageBERTPretraining


@pytest.fixture(scope="module")
def collator(tokenizer):
    return DataCollatorForImageBERTPretraining(tokenizer, num_object_classes=24, seed=0)


def feature(collator, **changes) -> dict:
    tokenizer = collator.tokenizer
    out = {
        "image_id": "img-7",
        "input_ids": tokenizer("a red circle")["input_ids"],
        "region_features": np.ones((3, 6), dtype=np.float32),
        "region_locations": np.full((3, 5), 0.5, dtype=np.float32),
        "region_class_labels": np.array([0, 5, 23]),
    }
    out.update(changes)
    return out


def _nan(shape, where=(1, 2), value=math.nan):
    array = np.ones(shape, dtype=np.float32)
    array[where] = value
    return array


CASES = [
    ("token id beyond the vocabulary", {"input_ids": [2, 10_000, 3]}, "input_ids hold"),
    ("negative token id", {"input_ids": [2, -1, 3]}, "input_ids hold"),
    # Padded by the tokenizer (padding="max_length"): attention over [PAD], and a cut text ending on one.
    ("padded already", {"input_ids": [2, 5, 3, 0, 0]}, r"input_ids hold the padding id 0 at \[3, 4\]"),
    ("NaN feature", {"region_features": _nan((3, 6))}, "region_features hold NaN or infinite values"),
    (
        "infinite feature",
        {"region_features": _nan((3, 6), value=math.inf)},
        "region_features hold NaN or infinite values",
    ),
    (
        "NaN location",
        {"region_locations": _nan((3, 5))},
        "region_locations hold values outside \\[0, 1\\] or not finite",
    ),
    ("label beyond the classes", {"region_class_labels": np.array([0, 24, 1])}, r"region_class_labels \[24\]"),
    ("label 150", {"region_class_labels": np.array([150, 0, 1])}, r"region_class_labels \[150\]"),
    ("negative label", {"region_class_labels": np.array([0, -1, 1])}, r"region_class_labels \[-1\]"),
    ("itm label 2", {"itm_labels": 2}, "itm_labels must be 0 or 1"),
    ("itm label -1", {"itm_labels": -1}, "itm_labels must be 0 or 1"),
    ("itm label 0.5", {"itm_labels": 0.5}, "itm_labels must be 0 or 1"),
    ("labels rows", {"region_class_labels": np.array([0, 1])}, "region_class_labels has 2 rows"),
    ("locations rows", {"region_locations": np.full((2, 5), 0.5, np.float32)}, "region_locations has 2 rows"),
]


@pytest.mark.parametrize(("changes", "named"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_feature_is_named(collator, changes, named):
    good = feature(collator)
    with pytest.raises(ValueError, match=named) as info:
        collator([good, feature(collator, **changes)])
    assert "img-7" in str(info.value) or "rows" in named


def test_good_labels_pass_unchanged(collator):
    batch = collator([feature(collator, region_class_labels=np.array([-100, 0, 23]), itm_labels=1)])
    assert batch["region_class_labels"][0].tolist() == [-100, 0, 23]


def test_without_num_object_classes_labels_are_not_checked(tokenizer):
    collator = DataCollatorForImageBERTPretraining(tokenizer, seed=0)
    batch = collator([feature(collator, region_class_labels=np.array([0, 999, 1]))])
    assert batch["region_class_labels"][0].tolist() == [0, 999, 1]
