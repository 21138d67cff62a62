"""The region cache at scale: float16 storage, an open that makes no Python object per key, zero-copy reads,
damaged files that name themselves, and extraction split across processes and machines."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imagebert_hf.regions.cache_layout import RegionCacheError
from imagebert_hf.regions.cache_reader import load_region_cache
from imagebert_hf.regions.cache_writer import extract_regions, merge_region_caches, shards_of

from .testing_utils import PROJECT_ROOT


FEATURES, CLASSES = 16, 5


class GeneratedExtractor:
    """Stands in for the RoI extractor: regions generated from each image's content hash; `fail` ids give errors."""

    region_feature_size, num_object_classes, batch_size, max_file_bytes, device = FEATURES, CLASSES, 4, 1 << 20, None

    def __init__(self, fail=()):
        self.fail = set(fail)

    def to_dict(self):
        return {"generated": True, "device": self.device}

    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "preprocessor_config.json").write_text("{}")

    def extract(self, images, boxes=None, image_ids=None, on_error="record", return_class_probs=False):
        records = []
        for image, image_id in zip(images, image_ids):
            rng = np.random.default_rng(int(image_id[:12], 16))
            count = int(rng.integers(1, 9))
            probs = rng.dirichlet(np.ones(CLASSES), count).astype(np.float32)
            # Images given as bytes can be told to fail; those given as paths never do.
            error = "generated failure" if self.fail and bytes(image["bytes"]) in self.fail else None
            records.append(
                {
                    "region_features": rng.standard_normal((count, FEATURES)).astype(np.float32),
                    "region_boxes": rng.random((count, 4), dtype=np.float32),
                    "region_locations": rng.random((count, 5), dtype=np.float32),
                    "region_class_labels": probs.argmax(1),
                    "region_class_probs": probs,
                    "image_width": 64,
                    "image_height": 48,
                    "num_regions": count,
                    "error": error,
                }
            )
        return records


def image_table(num_images: int, repeat_first: bool = True):
    import datasets

    keys = [f"img{i:05d}" for i in range(num_images)]
    images = [{"bytes": b"image %d" % i, "path": None} for i in range(num_images)]
    if repeat_first:  # the same bytes under another key: one row, two keys
        keys.append("copy-of-img00000")
        images.append(images[0])
    return datasets.Dataset.from_dict({"key": keys, "image": images})


def build(folder, num_images=12, **kwargs):
    kwargs.setdefault("shard_size", 5)
    extractor = kwargs.pop("extractor", GeneratedExtractor())
    return extract_regions(image_table(num_images), folder, extractor, key_column="key", progress=False, **kwargs)


def records_of(cache):
    return {key: cache[key] for key in cache}


def assert_same_records(a, b):
    assert list(a) == list(b)
    for key in a:
        for name, value in a[key].items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(value, b[key][name], err_msg=f"{key} {name}")
            else:
                assert value == b[key][name], (key, name)


def test_float16_by_default_float32_on_request_and_both_read_as_float32(tmp_path):
    build(tmp_path / "half")
    build(tmp_path / "full", storage_dtype="float32")
    half, full = load_region_cache(tmp_path / "half"), load_region_cache(tmp_path / "full")
    assert (half.feature_dtype, full.feature_dtype) == (np.float16, np.float32)
    assert half.info["feature_dtype"] == "float16"
    for name in ("region_features", "region_class_probs"):
        assert half.table.column(name).nbytes < 0.6 * full.table.column(name).nbytes, name
    for key in full:
        for name in ("region_features", "region_class_probs"):
            assert half[key][name].dtype == np.float32 and half[key][name].flags.writeable
            np.testing.assert_array_equal(half[key][name], full[key][name].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(half[key]["region_boxes"], full[key]["region_boxes"])  # float32 always
    with pytest.raises(ValueError, match="storage_dtype must be"):
        build(tmp_path / "bad", storage_dtype="bfloat16")


def test_a_float32_cache_written_before_the_lookup_table_opens_and_resumes(tmp_path):
    build(tmp_path / "new", storage_dtype="float32")
    expected = records_of(load_region_cache(tmp_path / "new"))
    # What an older version left: no feature_dtype in the info, no lookup table, and one shard not yet done.
    old = tmp_path / "old"
    build(old, storage_dtype="float32", max_shards=2)
    info = json.loads((old / "cache_info.json").read_text())
    del info["feature_dtype"]
    info["extractor"].pop("device")
    (old / "cache_info.json").write_text(json.dumps(info))
    assert not (old / "lookup.arrow").exists()
    # Resuming it with the default float16 would mix dtypes in one cache: refused, saying how to match.
    with pytest.raises(ValueError, match="storage dtype.*float32"):
        build(old)
    build(old, storage_dtype="float32")
    assert (old / "lookup.arrow").is_file()
    assert_same_records(records_of(load_region_cache(old)), expected)
    (old / "lookup.arrow").unlink()  # a complete older cache: the table is rebuilt at the first open
    assert_same_records(records_of(load_region_cache(old)), expected)
    assert (old / "lookup.arrow").is_file()


def test_lookups_by_item_key_cache_key_and_image_id_and_failures(tmp_path):
    build(tmp_path, extractor=GeneratedExtractor(fail={b"image 3"}))
    cache = load_region_cache(tmp_path)
    assert cache.keys() == [f"img{i:05d}" for i in range(12) if i != 3] + ["copy-of-img00000"]
    assert len(cache) == 12 and "img00003" not in cache and "nope" not in cache
    assert cache.errors == {"img00003": "generated failure"}
    with pytest.raises(KeyError, match="has no regions: generated failure"):
        cache["img00003"]
    with pytest.raises(KeyError, match="not in the region cache"):
        cache["nope"]
    first = cache["img00000"]
    assert cache["copy-of-img00000"]["cache_key"] == first["cache_key"]
    assert_same_records({"a": cache[first["cache_key"]]}, {"a": first})
    assert_same_records({"a": cache[first["image_id"]]}, {"a": first})
    assert cache.num_regions("img00001") == cache["img00001"]["region_features"].shape[0]
    assert len(cache.dataset) == 12  # one row per distinct image


def test_reads_are_views_of_the_mapped_file(tmp_path):
    build(tmp_path)
    stored = load_region_cache(tmp_path, dtype=None)["img00002"]
    features = stored["region_features"]
    assert features.dtype == np.float16 and not features.flags.writeable and not features.flags.owndata
    np.testing.assert_array_equal(
        features.astype(np.float32), load_region_cache(tmp_path)["img00002"]["region_features"]
    )


def _blocks_to_open(folder) -> int:
    import gc

    gc.collect()
    before = sys.getallocatedblocks()
    cache = load_region_cache(folder)
    gc.collect()
    blocks = sys.getallocatedblocks() - before
    del cache
    return blocks


def test_opening_makes_no_python_object_per_key(tmp_path):
    build(tmp_path / "small", num_images=50, shard_size=1000)
    build(tmp_path / "large", num_images=2000, shard_size=1000)
    for folder in ("small", "large"):
        load_region_cache(tmp_path / folder)  # builds and stores each lookup table, and warms imports
    # The median of several opens: other tests' garbage freed by the process during one open must not count.
    small = statistics.median(_blocks_to_open(tmp_path / "small") for _ in range(5))
    large = statistics.median(_blocks_to_open(tmp_path / "large") for _ in range(5))
    # 40x the keys: a dict over every key (what the cache used to build) would hold thousands more objects.
    assert large - small < 200, (small, large)


def test_a_damaged_shard_names_itself_and_a_rerun_rebuilds_only_it(tmp_path):
    build(tmp_path)
    expected = records_of(load_region_cache(tmp_path))
    arrow = next((tmp_path / "shards" / "shard-00001").glob("data-*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    with pytest.raises(RegionCacheError, match=r"shard-00001/data-.*\.arrow is damaged.*Delete its shard folder"):
        load_region_cache(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "shards" / "shard-00001")
    report = build(tmp_path)
    assert report.num_shards_skipped == 2
    assert_same_records(records_of(load_region_cache(tmp_path)), expected)
    (tmp_path / "lookup.arrow").write_bytes(b"not arrow")  # rebuilt, with a warning
    assert_same_records(records_of(load_region_cache(tmp_path)), expected)
    (tmp_path / "cache_info.json").write_text("{")
    with pytest.raises(RegionCacheError, match="cache_info.json is damaged"):
        load_region_cache(tmp_path)
    with pytest.raises(RegionCacheError, match="not a region cache"):
        load_region_cache(tmp_path / "shards")


# ------------------------------------------------------------------------------------------ across machines


def test_shards_are_split_deterministically_whatever_each_machine_runs():
    # Machine 0 with 2 processes, machine 1 with 3: every shard exactly once.
    taken = (
        shards_of(17, 2, 0, 0, 2)
        + shards_of(17, 2, 0, 1, 2)
        + [s for r in range(3) for s in shards_of(17, 2, 1, r, 3)]
    )
    assert sorted(taken) == list(range(17))
    assert shards_of(17, 2, 1) == list(range(1, 17, 2))
    with pytest.raises(ValueError, match="shard_index"):
        shards_of(17, 2, 2)


def test_two_machines_merge_into_the_single_machine_cache(tmp_path):
    build(tmp_path / "single")
    for index in (0, 1):
        part = build(tmp_path / f"part{index}", num_shards=2, shard_index=index)
        assert not json.loads((tmp_path / f"part{index}" / "cache_info.json").read_text())["complete"]
        assert part.num_shards == 3
    with pytest.raises(ValueError, match="missing"):
        merge_region_caches([tmp_path / "part0"], tmp_path / "merged_one")
    report = merge_region_caches([tmp_path / "part0", tmp_path / "part1"], tmp_path / "merged")
    assert (report.num_items, report.num_unique, report.num_extracted) == (13, 12, 12)
    assert_same_records(
        records_of(load_region_cache(tmp_path / "merged")), records_of(load_region_cache(tmp_path / "single"))
    )
    assert (tmp_path / "merged" / "index.jsonl").read_bytes() == (tmp_path / "single" / "index.jsonl").read_bytes()
    build(tmp_path / "other", num_images=5)
    with pytest.raises(ValueError, match="different caches"):
        merge_region_caches([tmp_path / "part0", tmp_path / "other"], tmp_path / "mixed")


EXTRACT_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tests.test_region_cache_scale import build
build({folder!r}, num_shards=2, shard_index={index})
"""


def test_two_processes_on_each_of_two_machines_give_the_single_machine_cache(tmp_path):
    build(tmp_path / "single")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "OMP_NUM_THREADS": "1"}
    for index in (0, 1):  # two "machines", each launching two processes with torchrun, into one shared folder
        script = tmp_path / f"extract{index}.py"
        script.write_text(EXTRACT_SCRIPT.format(root=str(PROJECT_ROOT), folder=str(tmp_path / "shared"), index=index))
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "0",
            str(script),
        ]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "shared" / "cache_info.json").read_text())
    assert info["complete"] and info["num_shards"] == 3
    assert_same_records(
        records_of(load_region_cache(tmp_path / "shared")), records_of(load_region_cache(tmp_path / "single"))
    )


def test_a_gallery_batch_equals_the_stacked_records_and_holds_no_features(tmp_path):
    import torch

    from imagebert_hf.data.retrieval_corpus import stack_region_records

    build(tmp_path)
    cache = load_region_cache(tmp_path)
    keys = cache.keys()[::-1]
    gallery = cache.gallery(keys, max_regions=5)
    assert len(gallery) == len(keys) and gallery.rows.nbytes + gallery.num_regions.nbytes == 16 * len(keys)
    for indices in ([3, 0, 7], slice(2, 9), torch.tensor([11, 1])):
        positions = list(range(len(keys)))[indices] if isinstance(indices, slice) else [int(i) for i in indices]
        expected = stack_region_records([cache[keys[i]] for i in positions], max_regions=5)
        batch = gallery.batch(indices)
        for name, value in expected.items():
            torch.testing.assert_close(batch[name], value, rtol=0, atol=0, msg=name)
    assert gallery.batch([0], padding="max_length")["region_features"].shape == (1, 5, FEATURES)
    whole = cache.gallery()  # every image in cache.keys() order, without a lookup per key
    assert len(whole) == len(cache) and np.array_equal(whole.rows, cache.gallery(cache.keys()).rows)
    with pytest.raises(KeyError, match="not in the region cache"):
        cache.gallery(["nope"])
