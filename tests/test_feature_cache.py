"""The region cache: manifest reading, shards, deduplication, resumption, parallel workers, lookups, the CLI."""

import json
import shutil

import numpy as np
import pytest

from imagebert_hf import ImageBERTRoIExtractor
from imagebert_hf.formats.manifest import parse_manifest_line, read_manifest
from imagebert_hf.regions import extract_regions, load_region_cache, load_region_dataset
from imagebert_hf.regions.cli import main

from .testing_utils import COCO_DIR, FLICKR_DIR, require_shared_data


ARRAYS = ("region_features", "region_boxes", "region_locations", "region_class_labels", "region_class_probs")


@pytest.fixture(scope="module")
def extractor(make_tiny_extractor):
    return make_tiny_extractor(max_regions=8)


ROOT = {"image_root": COCO_DIR, "allow_outside_root": True}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Six COCO images, a repeated line, and a copy of the first image under another name (same bytes), outside
    the image root (read with `allow_outside_root=True`, see ROOT)."""
    if not (COCO_DIR / "captions.jsonl").is_file():
        pytest.skip(f"real data not found at {COCO_DIR}")
    folder = tmp_path_factory.mktemp("manifest")
    lines = (COCO_DIR / "captions.jsonl").read_text().splitlines()[:6]
    first = json.loads(lines[0])
    copy = folder / "copy_of_first.jpg"
    shutil.copy(COCO_DIR / first["image"], copy)
    extra = [lines[1], json.dumps({**first, "image": str(copy)})]
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(lines + extra) + "\n")
    return path


def _assert_same_cache(a, b, atol=0.0, rtol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        for name in ARRAYS:
            np.testing.assert_allclose(a[key][name], b[key][name], rtol=rtol, atol=atol, err_msg=f"{key} {name}")


# ---------------------------------------------------------------------------------------------- manifest


@require_shared_data
def test_read_manifest_coco_and_flickr():
    coco = read_manifest(COCO_DIR / "captions.jsonl")
    assert len(coco) == 128 and sum(len(r.captions) for r in coco) == 641
    assert sum(len(r.boxes or ()) for r in coco) == 898
    first = coco[0]
    assert first.image == "images/000000000139.jpg" and first.image_path == COCO_DIR / "images" / "000000000139.jpg"
    assert first.image_path.is_file() and (first.width, first.height) == (640, 426)
    x, y, w, h = json.loads((COCO_DIR / "captions.jsonl").read_text().splitlines()[0])["objects"][0]["bbox_xywh"]
    assert first.boxes[0] == pytest.approx((x, y, x + w, y + h))
    assert first.box_labels[0] == "potted plant" and first.extra["coco_id"] == 139
    flickr = read_manifest(FLICKR_DIR / "captions.jsonl")
    assert len(flickr) == 866 and flickr[0].boxes is None and flickr[0].extra["split"] in ("train", "dev")


def test_manifest_errors_name_the_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "a.jpg", "captions": ["x"]}\n\n{"image": "b.jpg"}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:3: no 'captions'"):
        read_manifest(path)
    path.write_text('{"image": "a.jpg", "caption": "one"}\nnot json\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: invalid JSON"):
        read_manifest(path)
    record = parse_manifest_line({"image": "a.jpg", "caption": "one"}, tmp_path / "root")
    assert record.captions == ("one",) and record.image_path == tmp_path / "root" / "a.jpg"


# ---------------------------------------------------------------------------------------------- cache


@require_shared_data
def test_cache_dedup_lookup_and_resume(manifest, extractor, tmp_path):
    partial = tmp_path / "partial"
    first = extract_regions(manifest, partial, extractor, **ROOT, shard_size=2, max_shards=1, progress=False)
    assert (first.num_items, first.num_unique, first.num_duplicates) == (8, 6, 2)
    assert first.num_shards == 3 and first.num_extracted == 2
    assert not json.loads((partial / "cache_info.json").read_text())["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        load_region_cache(partial)
    # A kill during a shard leaves only a temporary folder, which the rerun discards.
    (partial / "shards" / "shard-00001.tmp-999").mkdir()
    resumed = extract_regions(manifest, partial, extractor, **ROOT, shard_size=2, progress=False)
    assert resumed.num_shards_skipped == 1 and resumed.num_extracted == 6 and resumed.num_failed == 0
    assert not list((partial / "shards").glob("*.tmp-*"))
    assert json.loads((partial / "cache_info.json").read_text())["complete"]

    fresh = tmp_path / "fresh"
    extract_regions(manifest, fresh, extractor, **ROOT, shard_size=2, progress=False)
    cache = load_region_cache(partial)
    _assert_same_cache(cache, load_region_cache(fresh))

    records = read_manifest(manifest, **ROOT)
    assert cache.keys() == list(dict.fromkeys(r.image for r in records))
    copy_key = records[-1].image
    # Same bytes under two names: extracted once, found under both, by content hash and by cache key.
    assert cache[copy_key]["cache_key"] == cache[records[0].image]["cache_key"]
    assert len(load_region_dataset(partial)) == 6
    direct = extractor.extract(records[2].image_path)[0]
    stored = cache[records[2].image]
    assert cache.feature_dtype == np.float16 and stored["region_features"].dtype == np.float32
    for name in ARRAYS:
        # float16 storage by default: within half a float16 step of the extractor's float32 output.
        np.testing.assert_allclose(stored[name], direct[name], rtol=2**-11, atol=1e-7, err_msg=name)
    assert stored["image_id"] == direct["image_id"]
    assert cache[direct["image_id"]]["source"] == records[2].image
    assert records[2].image in cache and "nope.jpg" not in cache
    with pytest.raises(KeyError, match="not in the region cache"):
        cache["nope.jpg"]


@require_shared_data
def test_cache_refuses_another_extractor(manifest, extractor, tmp_path):
    extract_regions(manifest, tmp_path, extractor, **ROOT, shard_size=4, max_shards=1, progress=False)
    other = ImageBERTRoIExtractor.from_dict({**extractor.to_dict(), "max_regions": 3})
    with pytest.raises(ValueError, match="another source, extractor"):
        extract_regions(manifest, tmp_path, other, **ROOT, shard_size=4, progress=False)


@require_shared_data
def test_cache_with_manifest_boxes(manifest, extractor, tmp_path):
    extract_regions(manifest, tmp_path, extractor, **ROOT, use_boxes=True, progress=False, store_class_probs=False)
    cache = load_region_cache(tmp_path)
    for record in read_manifest(manifest, **ROOT):
        regions = cache[record.image]
        assert regions["num_regions"] == min(len(record.boxes), 8)
        np.testing.assert_allclose(regions["region_boxes"], np.array(record.boxes)[:8].clip(0, None), atol=1e-3)
        assert "region_class_probs" not in regions


@require_shared_data
def test_cache_from_datasets_dataset(extractor, tmp_path):
    from datasets import Dataset, Image

    records = read_manifest(COCO_DIR / "captions.jsonl")[:3]
    dataset = Dataset.from_dict(
        {"image": [str(r.image_path) for r in records], "name": [f"coco-{i}" for i in range(3)]}
    ).cast_column("image", Image())
    report = extract_regions(dataset, tmp_path, extractor, key_column="name", progress=False, storage_dtype="float32")
    assert report.num_extracted == 3
    cache = load_region_cache(tmp_path)
    assert cache.keys() == ["coco-0", "coco-1", "coco-2"] and cache.feature_dtype == np.float32
    direct = extractor.extract(records[1].image_path)[0]
    np.testing.assert_allclose(cache["coco-1"]["region_features"], direct["region_features"], atol=1e-6)


@require_shared_data
def test_cache_parallel_equals_serial(manifest, extractor, tmp_path):
    serial = extract_regions(manifest, tmp_path / "serial", extractor, **ROOT, shard_size=3, progress=False)
    parallel = extract_regions(
        manifest, tmp_path / "parallel", extractor, **ROOT, shard_size=3, num_proc=2, progress=False
    )
    assert parallel.num_extracted == serial.num_extracted == 6
    # Workers run with other thread counts: equal up to float summation order, which can move a value stored in
    # float16 (the cache's default) by one step of float16, 2**-10 of it.
    _assert_same_cache(
        load_region_cache(tmp_path / "serial"), load_region_cache(tmp_path / "parallel"), atol=1e-5, rtol=2**-10
    )


@require_shared_data
def test_command_line(manifest, extractor, tmp_path):
    extractor.save_pretrained(tmp_path / "extractor")
    status = main(
        [
            "--output_dir", str(tmp_path / "cache"),
            "--manifest", str(manifest),
            "--image_root", str(COCO_DIR), "--allow_outside_root",
            "--extractor", str(tmp_path / "extractor"),
            "--shard_size", "4",
            "--no_class_probs",
        ]
    )  # fmt: skip
    report = json.loads((tmp_path / "cache" / "report.json").read_text())
    assert status == 0 and report["num_extracted"] == 6 and report["num_shards"] == 2 and report["seconds"] > 0
    cache = load_region_cache(tmp_path / "cache")
    assert cache[cache.keys()[0]]["region_features"].shape == (5, 256)
