import json
import re

import numpy as np
import pytest

from imagebert_hf.data.synthetic import (
    CLASS_NAMES,
    COLORS,
    SHAPES,
    chance_recall,
    corrupt_captions,
    make_synthetic_dataset,
    make_synthetic_examples,
    make_synthetic_tokenizer,
    synthetic_region_record,
    write_synthetic_manifest,
)


PHRASE = r"an? (\w+) (" + "|".join(SHAPES) + ")"


def _object(example, color, shape):
    matches = [obj for obj in example["objects"] if obj["label"] == f"{color} {shape}"]
    assert matches, f"caption mentions a {color} {shape} that is not annotated"
    return matches[0]


def _centre(obj):
    x, y, w, h = obj["bbox_xywh"]
    return x + w / 2, y + h / 2


def test_captions_are_true_of_the_image():
    for example in make_synthetic_examples(60, seed=3, captions_per_image=3):
        pixels = np.asarray(example["image"]).astype(int)
        for obj in example["objects"]:
            color, _ = obj["label"].split()
            x, y = _centre(obj)
            # The box centre is inside every shape (the triangle's too), so it shows the object's colour.
            assert np.abs(pixels[int(y), int(x)] - np.array(COLORS[color])).max() <= 1
            assert CLASS_NAMES[obj["class_id"]] == obj["label"]
        for caption in example["captions"]:
            (c1, s1), (c2, s2) = re.findall(PHRASE, caption)
            first, second = _object(example, c1, s1), _object(example, c2, s2)
            (x1, y1), (x2, y2) = _centre(first), _centre(second)
            if "left of" in caption:
                assert x1 < x2
            elif "right of" in caption:
                assert x1 > x2
            elif "above" in caption:
                assert y1 < y2
            elif "below" in caption:
                assert y1 > y2
            else:
                assert caption.endswith("background")
                background = caption.split()[-2]
                corner = pixels[:4, :4].reshape(-1, 3).mean(0)
                from imagebert_hf.data.synthetic import BACKGROUNDS

                assert np.abs(corner - np.array(BACKGROUNDS[background])).max() < 15


def test_deterministic_and_independent_of_size():
    first = make_synthetic_examples(5, seed=11)
    again = make_synthetic_examples(8, seed=11)
    other = make_synthetic_examples(5, seed=12)
    for a, b in zip(first, again):
        assert a["captions"] == b["captions"] and a["objects"] == b["objects"]
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert [a["captions"] for a in first] != [b["captions"] for b in other]


def test_dataset_columns_and_manifest_layout(tmp_path):
    dataset = make_synthetic_dataset(6, seed=0, image_size=64)
    assert set(dataset.column_names) == {"image_id", "image", "captions", "objects", "width", "height"}
    row = dataset[0]
    assert row["image"].size == (64, 64)
    assert len(row["objects"]) == 2 and set(row["objects"][0]) == {"label", "class_id", "bbox_xywh"}

    manifest = write_synthetic_manifest(tmp_path / "shapes", 10, seed=0, image_size=64, test_fraction=0.3)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [line["split"] for line in lines] == ["train"] * 7 + ["test"] * 3
    for line in lines:
        assert (manifest.parent / line["image"]).is_file()
        assert line["captions"] and line["objects"]
    with pytest.raises(ValueError, match="test_fraction"):
        write_synthetic_manifest(tmp_path / "bad", 4, test_fraction=1.0)


def test_tokenizer_covers_every_caption_clean_or_corrupted():
    tokenizer = make_synthetic_tokenizer()
    captions = [c for e in make_synthetic_examples(40, seed=1, captions_per_image=3) for c in e["captions"]]
    for caption in captions + corrupt_captions(captions, rate=1.0, seed=0):
        assert tokenizer.unk_token_id not in tokenizer(caption)["input_ids"], caption
    assert len(tokenizer) < 64


def test_corruption_rate_and_falsity():
    captions = [c for e in make_synthetic_examples(200, seed=2) for c in e["captions"]]
    noisy = corrupt_captions(captions, rate=0.5, seed=0)
    changed = sum(a != b for a, b in zip(captions, noisy)) / len(captions)
    # Some corruptions leave a caption unchanged (a colour redrawn to itself), so the rate is a bit under 0.5.
    assert 0.35 < changed < 0.55
    assert corrupt_captions(captions, rate=0.0) == captions
    with pytest.raises(ValueError):
        corrupt_captions(captions, rate=2.0)


def test_annotation_regions_follow_the_record_schema():
    example = make_synthetic_examples(1, seed=0)[0]
    record = synthetic_region_record(example, feature_size=16)
    assert record["region_features"].shape == (3, 16) and record["region_features"].dtype == np.float32
    assert record["region_locations"].shape == (3, 5)
    assert ((record["region_locations"] >= 0) & (record["region_locations"] <= 1)).all()
    assert record["region_class_labels"].tolist()[:2] == [obj["class_id"] for obj in example["objects"]]
    assert record["region_class_labels"][-1] == -100
    x, y, w, h = example["objects"][0]["bbox_xywh"]
    np.testing.assert_allclose(record["region_boxes"][0], [x, y, x + w, y + h])
    np.testing.assert_allclose(record["region_locations"][0, 4], w * h / (96 * 96), rtol=1e-5)
    same = synthetic_region_record(example, feature_size=16)
    assert np.array_equal(record["region_features"], same["region_features"])


def test_chance_recall():
    assert chance_recall(100, 1) == pytest.approx(0.01)
    assert chance_recall(100, 10) == pytest.approx(0.10)
    assert chance_recall(10, 20) == 1.0
    # Five relevant items among 50: one minus the chance that all top 5 miss them.
    assert chance_recall(50, 5, num_relevant=5) == pytest.approx(
        1 - (45 * 44 * 43 * 42 * 41) / (50 * 49 * 48 * 47 * 46)
    )
    assert len(SHAPES) * len(COLORS) == len(CLASS_NAMES)
