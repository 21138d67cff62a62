"""Bad input at the data boundaries: pretraining collator settings and samples (token types, ids, ITM labels,
class distributions), webdataset samples that cannot be used, `datasets` rows that share an id but not an image,
evaluation manifests whose ids collide or are not ids, and manifest lines with values that cannot be boxes, classes
or paths. Every error names the sample, the file and line, the row or the shard and key."""

import io
import json
import logging

import numpy as np
import pytest
import torch

from imagebert_hf.data.collator import DataCollatorForImageBERTPretraining
from imagebert_hf.data.pair_sources import DatasetPairSource, WebDatasetPairSource
from imagebert_hf.data.retrieval_corpus import load_manifest_records
from imagebert_hf.formats.manifest import ManifestError, parse_manifest_line
from imagebert_hf.models.imagebert.region_batching import check_region_values

from .test_hostile_sources_and_curation import write_shard
from .testing_utils import require_module


def _sample(tokenizer, image_id: str, **changes) -> dict:
    ids = tokenizer("a red circle")["input_ids"]
    rng = np.random.default_rng(len(image_id))
    probs = rng.random((3, 4)).astype("f4")
    return {
        "input_ids": ids,
        "region_features": rng.random((3, 8)).astype("f4"),
        "region_locations": np.full((3, 5), 0.5, "f4"),
        "region_class_probs": probs / probs.sum(1, keepdims=True),
        "image_id": image_id,
        **changes,
    }


def _collate(tokenizer, changes: dict, **settings):
    collator = DataCollatorForImageBERTPretraining(tokenizer, itm_negative_probability=0.0, seed=0, **settings)
    return collator([_sample(tokenizer, "i0"), _sample(tokenizer, "i1", **changes)])


# ------------------------------------------------------------------------------------------------ collator


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"token_type_ids": [0, 5, -1, 0, 0]},
            r"sample 'i1': token_type_ids hold -1\.\.5; expected values in \[0, 2\)",
        ),
        ({"token_type_ids": [1]}, r"sample 'i1': token_type_ids has 1 entries but input_ids has 5"),
        ({"token_type_ids": [0.0, 1.5, 0.0, 0.0, 0.0]}, r"sample 'i1': token_type_ids has dtype float64"),
        ({"itm_labels": float("nan")}, r"sample 'i1': itm_labels must be 0 or 1, got nan"),
        ({"input_ids": [101.7, 1037.2, 102.0]}, r"sample 'i1': input_ids has dtype float64; expected integers"),
        ({"input_ids": []}, r"sample 'i1': input_ids is empty"),
        ({"input_ids": torch.tensor([2.0, 3.0])}, r"sample 'i1': input_ids has dtype float32"),
    ],
    ids=[
        "type range",
        "type broadcast",
        "float types",
        "nan itm",
        "float ids",
        "no ids",
        "float tensor",
    ],
)
def test_a_sample_with_unusable_text_or_labels_is_named(tokenizer, changes, message):
    if "itm_labels" in changes:  # every sample then carries its label, as the datasets give them
        collator = DataCollatorForImageBERTPretraining(tokenizer, seed=0)
        features = [_sample(tokenizer, "i0", itm_labels=1), _sample(tokenizer, "i1", **changes)]
        with pytest.raises(ValueError, match=message):
            collator(features)
        return
    with pytest.raises(ValueError, match=message):
        _collate(tokenizer, changes)


def test_token_types_within_the_model_pass_and_type_vocab_size_is_a_setting(tokenizer):
    batch = _collate(tokenizer, {"token_type_ids": [0, 0, 1, 1, 1]})
    assert batch["token_type_ids"][1, :5].tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match=r"token_type_ids hold 0\.\.1; expected values in \[0, 1\)"):
        _collate(tokenizer, {"token_type_ids": [0, 0, 1, 1, 1]}, type_vocab_size=1)


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"max_regions": -1}, ValueError, r"max_regions must be >= 1, got -1"),
        ({"max_regions": 0}, ValueError, r"max_regions must be >= 1, got 0"),
        ({"max_text_length": 0}, ValueError, r"max_text_length must be >= 2, got 0"),
        ({"max_text_length": 8.5}, TypeError, r"max_text_length must be an integer, got 8.5"),
        ({"mlm_probability": "0.5"}, ValueError, r"mlm_probability must be a number in \[0, 1\], got '0.5'"),
        ({"region_mask_probability": float("nan")}, ValueError, r"region_mask_probability must be a number in"),
        ({"pad_to_multiple_of": 0}, ValueError, r"pad_to_multiple_of must be >= 1, got 0"),
        ({"num_object_classes": 0}, ValueError, r"num_object_classes must be >= 1, got 0"),
        ({"type_vocab_size": 0}, ValueError, r"type_vocab_size must be >= 1, got 0"),
        ({"seed": 1.5}, TypeError, r"seed must be an integer, got 1.5"),
        ({"count_failed": "yes"}, TypeError, r"count_failed must be true or false, got 'yes'"),
    ],
    ids=lambda value: None if not isinstance(value, dict) else "-".join(f"{k}={v}" for k, v in value.items()),
)
def test_collator_settings_out_of_range_are_named(tokenizer, settings, error, message):
    with pytest.raises(error, match=message):
        DataCollatorForImageBERTPretraining(tokenizer, **settings)


@pytest.mark.parametrize(
    ("probs", "message"),
    [
        (np.full((3, 4), 7.0, "f4"), r"sample 'i1': region_class_probs hold .*rows that do not sum to 1"),
        (np.full((3, 4), 0.2, "f4"), r"sample 'i1': region_class_probs hold .*rows that do not sum to 1"),
        (np.zeros((3, 4), "f4"), r"sample 'i1': region_class_probs are all zero in 3 of 3 regions .*no target"),
    ],
    ids=["sevens", "sum 0.8", "zeros"],
)
def test_class_distributions_that_are_not_one_are_refused(tokenizer, probs, message):
    with pytest.raises(ValueError, match=message):
        _collate(tokenizer, {"region_class_probs": probs})


def test_float16_distributions_and_regions_without_one_pass_where_they_are_legitimate(tokenizer):
    logits = torch.randn(3, 1000)
    stored = torch.softmax(logits, -1).half().numpy()  # a float16 region cache's rows
    batch = _collate(tokenizer, {"region_class_probs": stored[:, :4] / stored[:, :4].sum(1, keepdims=True)})
    assert batch["region_class_probs"].shape == (2, 3, 4)
    # Distributions of 1000 classes in float16 sum to 1 only within rounding.
    check_region_values({"region_class_probs": torch.from_numpy(stored)[None]})
    # All zeros: the extractor's "no distribution" (a backbone without a classifier), for the processor's output.
    check_region_values({"region_class_probs": torch.zeros(1, 3, 4)})
    # Without MOC's KL loss the collator does not return them, so such regions train with cross-entropy.
    batch = _collate(tokenizer, {"region_class_probs": np.zeros((3, 4), "f4")}, return_region_class_probs=False)
    assert "region_class_probs" not in batch


# ------------------------------------------------------------------------------------------------ sources


def _image_bytes(fmt: str, color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format=fmt)
    return buffer.getvalue()


@require_module("webdataset")
def test_unusable_webdataset_samples_are_counted_and_the_first_named(tmp_path, caplog):
    shard = write_shard(
        tmp_path / "00000.tar",
        {
            "k0.jpg": _image_bytes("JPEG"),
            "k0.txt": b"a red square",
            "k1.gif": _image_bytes("GIF"),
            "k1.txt": b"a gif",
            "k2.txt": b"no image",
            "k3.jpg": _image_bytes("JPEG"),
            "k3.txt": b"   ",
            "k4.jpg": _image_bytes("JPEG"),
            "k4.json": json.dumps({"caption": "from json"}).encode(),
            "k5.tiff": _image_bytes("TIFF"),
            "k5.txt": b"a tiff",
        },
    )
    with caplog.at_level(logging.WARNING):
        source = WebDatasetPairSource(shard, name="wds")
    assert source.pairs == [("k0", "a red square"), ("k1", "a gif"), ("k4", "from json"), ("k5", "a tiff")]
    assert "webdataset source 'wds': 2 sample(s) skipped as unusable; first: shard" in caplog.text
    assert "key 'k2': no image member" in caplog.text
    assert source.open_image("k1").size == source.open_image("k5").size == (8, 8)


@require_module("datasets")
def test_rows_sharing_an_id_with_different_images_are_refused_naming_the_rows():
    import datasets
    from PIL import Image

    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    data = {"key": ["k", "j", "k"], "captions": ["a red square", "a blue one", "red"], "image": [red, blue, blue]}
    dataset = datasets.Dataset.from_dict(
        data,
        features=datasets.Features(
            {"key": datasets.Value("string"), "captions": datasets.Value("string"), "image": datasets.Image()}
        ),
    )
    source = DatasetPairSource(dataset, id_column="key", name="web")
    assert source.pairs == [("k", "a red square"), ("j", "a blue one"), ("k", "red")]
    assert source.open_image("j").getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(ValueError, match=r"dataset source 'web': rows 0 and 2 share the id 'k' but hold different"):
        source.open_image("k")
    same = DatasetPairSource(dataset.select([0, 1, 0]), id_column="key", name="web")
    assert same.open_image("k").getpixel((0, 0)) == (255, 0, 0)


# ------------------------------------------------------------------------------------------------ manifests


def _manifest(tmp_path, lines) -> str:
    path = tmp_path / "captions.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def test_images_of_one_file_name_in_two_folders_are_two_gallery_items(tmp_path):
    path = _manifest(
        tmp_path,
        [
            {"image": "images/train/001.jpg", "captions": ["a cat"]},
            {"image": "images/val/001.jpg", "captions": ["a dog"]},
            {"image": "images/val/002.jpg", "captions": ["a cow"], "image_id": 0},
            {"image": "images/val/003.jpg", "captions": ["a hen"], "coco_id": 391895},
        ],
    )
    ids = [record["image_id"] for record in load_manifest_records(path)]
    assert ids == ["images/train/001.jpg", "images/val/001.jpg", "0", "391895"]


@pytest.mark.parametrize("image_id", [[1, 2], {"id": 1}, True, " ", 1.5])
def test_an_image_id_that_is_not_an_id_is_named(tmp_path, image_id):
    path = _manifest(
        tmp_path,
        [{"image": "a.jpg", "captions": ["a cat"]}, {"image": "b.jpg", "captions": ["x"], "image_id": image_id}],
    )
    with pytest.raises(ManifestError, match=r"captions\.jsonl:2: 'image_id' must be a non-empty string or an integer"):
        load_manifest_records(path)


BAD_LINES = [
    ({"objects": [{"bbox_xywh": [1e308, 0, 1e308, 1]}]}, r"objects\[0\]\.bbox_xywh gives a corner that is not finite"),
    ({"objects": [{"bbox_xyxy": [0, 0, 1, 1], "class_id": 10**30}]}, r"objects\[0\]\.class_id must be in \[0, "),
    ({"objects": [{"bbox_xyxy": [0, 0, 1, 1], "class_id": -7}]}, r"objects\[0\]\.class_id must be in \[0, .*got -7"),
    ({"image": "images/a.jpg\x00.png"}, r"'image' holds a NUL character"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_LINES, ids=["inf corner", "huge class", "negative class", "nul"])
def test_manifest_values_that_cannot_be_boxes_classes_or_paths_are_named(tmp_path, changes, message):
    line = json.dumps({"image": "images/a.jpg", "captions": ["a cat"], **changes})
    with pytest.raises(ManifestError, match=r"m\.jsonl:3: " + message):
        parse_manifest_line(line, tmp_path, "m.jsonl:3")


def test_a_key_given_twice_in_a_manifest_line_is_named(tmp_path):
    line = '{"image": "a.jpg", "captions": ["a cat"], "captions": ["a dog"]}'
    with pytest.raises(ManifestError, match=r"m\.jsonl:3: key 'captions' appears twice in one object"):
        parse_manifest_line(line, tmp_path, "m.jsonl:3")
    nested = '{"image": "a.jpg", "captions": ["a cat"], "objects": [{"bbox_xyxy": [0, 0, 1, 1], "label": "a", "label": "b"}]}'
    with pytest.raises(ManifestError, match=r"key 'label' appears twice"):
        parse_manifest_line(nested, tmp_path, "m.jsonl:3")
    # The "none" class id and plain boxes still read.
    record = parse_manifest_line(
        '{"image": "a.jpg", "captions": ["a cat"], "objects": [{"bbox_xywh": [1, 2, 3, 4], "class_id": -1}]}',
        tmp_path,
    )
    assert record.boxes == ((1.0, 2.0, 4.0, 6.0),) and record.box_class_ids == (-1,)


def test_a_file_name_from_another_folder_never_takes_another_picture_s_regions(tmp_path, make_tiny_extractor):
    """A cache extracted for folder A keys its regions by A's file names; folder B's other pictures of the same
    names are not in it, and a byte-identical copy elsewhere is the same picture."""
    import shutil

    from PIL import Image

    from imagebert_hf.data.retrieval_corpus import region_cache_key
    from imagebert_hf.regions import extract_regions, load_region_cache

    for folder, colour in (("A", (200, 30, 30)), ("B", (30, 30, 200))):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (32, 32), colour).save(tmp_path / folder / "1.png")
    (tmp_path / "A" / "captions.jsonl").write_text(json.dumps({"image": "1.png", "captions": ["red"]}) + "\n")
    extract_regions(tmp_path / "A" / "captions.jsonl", tmp_path / "cache", make_tiny_extractor(), progress=False)
    cache = load_region_cache(tmp_path / "cache")
    (tmp_path / "C").mkdir()
    shutil.copyfile(tmp_path / "A" / "1.png", tmp_path / "C" / "1.png")
    lines = [{"image": "B/1.png", "captions": ["blue"]}, {"image": "C/1.png", "captions": ["red"]}]
    (tmp_path / "split.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    other, copy = load_manifest_records(tmp_path / "split.jsonl")
    with pytest.raises(KeyError, match=r"image 'B/1.png' is not in the region cache"):
        region_cache_key(cache, other)
    assert region_cache_key(cache, copy) == "1.png"
