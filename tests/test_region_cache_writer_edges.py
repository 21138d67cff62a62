"""The region cache writer at its edges: precomputed regions looked up by key, a rerun with other extractor
weights, keys that name two images or are not UTF-8, extractors whose locations the cache cannot store, and a bad
row of a dataset's boxes column; each refusal comes before anything is written."""

import json
import os
import runpy
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from imagebert_hf import ImageBERTRoIExtractor
from imagebert_hf.models.imagebert.roi_image_loading import image_content_hash
from imagebert_hf.models.imagebert.roi_precomputed import LXMERT_TSV_FIELDS, write_npz_regions, write_tsv_regions
from imagebert_hf.regions import extract_regions, load_region_cache
from imagebert_hf.regions.cache_writer import merge_region_caches

from .testing_utils import PROJECT_ROOT


def _images(folder, count):
    """`count` random PNGs under `folder/images` and a manifest listing them (one object box each)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / "images" / f"{i:03d}.png")
        objects = [{"label": "x", "class_id": 1, "bbox_xywh": [5, 5, 30, 20]}]
        lines.append(json.dumps({"image": f"images/{i:03d}.png", "captions": [f"caption {i}"], "objects": objects}))
    manifest = folder / "captions.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="module")
def tiny(make_tiny_extractor):
    return make_tiny_extractor()


# ---------------------------------------------------------------------------------------------- precomputed


def test_precomputed_regions_are_found_by_the_manifest_key(tiny, tmp_path):
    manifest = _images(tmp_path, 3)
    npz = tmp_path / "npz"
    npz.mkdir()
    expected = {}
    for i in range(3):
        record = tiny.extract(str(tmp_path / "images" / f"{i:03d}.png"))[0]
        write_npz_regions(npz / f"{i:03d}.npz", record)
        expected[f"images/{i:03d}.png"] = record
    # A line whose image file is absent: the precomputed backend does not need it.
    write_npz_regions(npz / "absent.npz", expected["images/000.png"])
    with open(manifest, "a") as handle:
        handle.write(json.dumps({"image": "images/absent.png", "captions": ["c"]}) + "\n")
        handle.write(json.dumps({"image": "images/absent.png", "captions": ["again"]}) + "\n")
    precomputed = ImageBERTRoIExtractor(backend="precomputed", precomputed_path=str(npz))

    report = extract_regions(manifest, tmp_path / "cache", precomputed, progress=False, storage_dtype="float32")

    assert (report.num_extracted, report.num_failed, report.num_duplicates) == (4, 0, 1), report.failures
    cache = load_region_cache(tmp_path / "cache")
    for key, record in expected.items():
        np.testing.assert_allclose(cache[key]["region_features"], record["region_features"], rtol=1e-6)
        # The cache's image id stays the content hash of the image.
        assert cache[key]["image_id"] == image_content_hash(str(tmp_path / key))
    np.testing.assert_allclose(
        cache["images/absent.png"]["region_features"], expected["images/000.png"]["region_features"], rtol=1e-6
    )


def test_lxmert_class_ids_without_distributions_need_the_class_count_and_then_are_kept(tiny, tmp_path):
    manifest = _images(tmp_path, 2)
    records = []
    for i in range(2):
        record = tiny.extract(str(tmp_path / "images" / f"{i:03d}.png"))[0]
        count = record["num_regions"]
        record.update(image_id=f"{i:03d}", region_class_labels=np.arange(count) % 7, region_class_probs=None)
        records.append(record)
    tsv = tmp_path / "regions.tsv"
    write_tsv_regions(tsv, records, LXMERT_TSV_FIELDS)

    undeclared = ImageBERTRoIExtractor(backend="precomputed", precomputed_path=str(tsv))
    report = extract_regions(manifest, tmp_path / "refused", undeclared, progress=False)
    assert report.num_extracted == 0 and report.num_failed == 2
    assert "Set the extractor's precomputed_num_classes" in report.failures[0]["error"]

    declared = ImageBERTRoIExtractor(backend="precomputed", precomputed_path=str(tsv), precomputed_num_classes=1600)
    report = extract_regions(manifest, tmp_path / "cache", declared, progress=False)
    assert (report.num_extracted, report.num_failed) == (2, 0), report.failures
    cache = load_region_cache(tmp_path / "cache")
    np.testing.assert_array_equal(cache["images/001.png"]["region_class_labels"], records[1]["region_class_labels"])


def test_the_example_ends_with_one_line_when_no_image_was_extracted(tmp_path, monkeypatch):
    manifest = _images(tmp_path, 2)
    npz = tmp_path / "npz"
    npz.mkdir()
    record = {
        "region_features": np.ones((2, 8), np.float32),
        "region_boxes": np.array([[0, 0, 10, 10], [5, 5, 20, 20]], np.float32),
        "region_class_probs": None,
        "image_width": 64,
        "image_height": 48,
    }
    write_npz_regions(npz / "unrelated.npz", record)
    flags = ["--backend", "precomputed", "--precomputed_path", str(npz), "--manifest", str(manifest)]
    monkeypatch.setattr(sys, "argv", ["extract_regions.py", *flags, "--output_dir", str(tmp_path / "cache")])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(PROJECT_ROOT / "examples" / "extract_regions.py"), run_name="__main__")
    line = str(stop.value.code)
    assert line.startswith("extract_regions: error: no image could be extracted: all 2 failed"), line
    assert "images/000.png" in line and "\n" not in line


# ---------------------------------------------------------------------------------------------- weights


def test_a_rerun_with_other_weights_of_the_same_settings_is_refused(make_tiny_extractor, tmp_path):
    manifest = _images(tmp_path, 4)
    make_tiny_extractor().save_pretrained(tmp_path / "v1")
    make_tiny_extractor().save_pretrained(tmp_path / "v2")  # the same settings, other (random) weights
    assert (tmp_path / "v1" / "preprocessor_config.json").read_text() == (
        tmp_path / "v2" / "preprocessor_config.json"
    ).read_text()
    cache = tmp_path / "cache"
    extract_regions(manifest, cache, str(tmp_path / "v1"), shard_size=2, max_shards=1, progress=False)
    shards_before = sorted(os.listdir(cache / "shards"))
    for num_proc in (1, 2):
        with pytest.raises(ValueError, match="made with other extractor weights"):
            extract_regions(manifest, cache, str(tmp_path / "v2"), shard_size=2, num_proc=num_proc, progress=False)
    assert sorted(os.listdir(cache / "shards")) == shards_before
    # The same weights, loaded again, resume it.
    report = extract_regions(manifest, cache, str(tmp_path / "v1"), shard_size=2, progress=False)
    assert report.num_shards_skipped == 1 and report.num_extracted == 4


def test_parts_of_other_weights_are_not_merged(make_tiny_extractor, tmp_path):
    manifest = _images(tmp_path, 4)
    for index in (0, 1):
        extract_regions(
            manifest, tmp_path / f"part{index}", make_tiny_extractor(), shard_size=2, num_shards=2,
            shard_index=index, progress=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="different caches"):
        merge_region_caches([tmp_path / "part0", tmp_path / "part1"], tmp_path / "merged")


# ---------------------------------------------------------------------------------------------- keys


def test_a_dataset_key_naming_two_images_is_refused_before_anything_is_written(tiny, tmp_path):
    datasets = pytest.importorskip("datasets")
    _images(tmp_path, 3)
    images = [str(tmp_path / "images" / f"{i:03d}.png") for i in range(3)]
    dataset = datasets.Dataset.from_dict({"image": images, "key": ["a", "b", "a"]})
    with pytest.raises(
        ValueError, match=r"the key 'a' names two different images .*: dataset row 0 and dataset row 2"
    ):
        extract_regions(dataset, tmp_path / "cache", tiny, key_column="key", progress=False)
    assert not (tmp_path / "cache").exists()
    # The same key for the same image is one image listed twice.
    same = datasets.Dataset.from_dict({"image": [images[0], images[1], images[0]], "key": ["a", "b", "a"]})
    report = extract_regions(same, tmp_path / "cache", tiny, key_column="key", progress=False)
    assert (report.num_items, report.num_unique, report.num_failed) == (3, 2, 0)


def test_a_manifest_key_that_is_not_utf8_is_refused_naming_its_line(tiny, tmp_path):
    manifest = _images(tmp_path, 2)
    odd = os.fsdecode(b"images/photo_\xe9t\xe9.png")  # a Latin-1 file name, read as surrogate escapes
    shutil.copy(tmp_path / "images" / "000.png", tmp_path / odd)
    with open(manifest, "a") as handle:
        handle.write(json.dumps({"image": odd, "captions": ["c"]}) + "\n")
    with pytest.raises(ValueError, match=r"captions.jsonl:3: the image key .* is not valid UTF-8"):
        extract_regions(manifest, tmp_path / "cache", tiny, progress=False)
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------- settings and rows


def test_an_extractor_of_7d_locations_is_refused_before_anything_is_written(make_tiny_extractor, tmp_path):
    manifest = _images(tmp_path, 2)
    extractor = make_tiny_extractor(region_location_size=7)
    with pytest.raises(ValueError, match=r"region_location_size is 7, but a region cache stores 5-d locations"):
        extract_regions(manifest, tmp_path / "cache", extractor, progress=False)
    assert not (tmp_path / "cache").exists()


def test_a_bad_row_of_the_boxes_column_is_named(tiny, tmp_path):
    datasets = pytest.importorskip("datasets")
    _images(tmp_path, 3)
    images = [str(tmp_path / "images" / f"{i:03d}.png") for i in range(3)]
    boxes = [[[1, 1, 20, 20]], [[1, 1, 20, 20]], [[30, 1, 20, 20]]]
    dataset = datasets.Dataset.from_dict({"image": images, "key": ["a", "b", "c"], "boxes": boxes})
    with pytest.raises(ValueError, match=r"boxes_column 'boxes', dataset row 2 \(key 'c'\): boxes must satisfy"):
        extract_regions(dataset, tmp_path / "cache", tiny, key_column="key", boxes_column="boxes", progress=False)
    assert not (tmp_path / "cache").exists()
