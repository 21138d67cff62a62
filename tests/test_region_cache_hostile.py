"""A region cache that lies: a `cache_info.json` that disagrees with its shards, and an extractor whose records
cannot be stored as they are. Each is named, never read or written silently."""

import json
import re

import numpy as np
import pytest

from imagebert_hf.regions.cache_layout import RegionCacheError
from imagebert_hf.regions.cache_reader import load_region_cache, verify_region_cache
from imagebert_hf.regions.cache_writer import extract_regions
from imagebert_hf.regions.cli import main

from .test_region_cache_scale import FEATURES, GeneratedExtractor, build, image_table


@pytest.fixture(scope="module")
def cache_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    build(folder, num_images=8, shard_size=3)  # 3 shards of float16 features, 16-d, 5 classes
    return folder


# ------------------------------------------------------------------------------------------------ cache_info.json

EDITED_INFO = [
    ("region_feature_size", 8, r"shard-00000/data-00000-of-00001\.arrow \(region_features.*\) holds 16"),
    ("region_feature_size", 32, r"shard-00000/data-00000-of-00001\.arrow \(region_features.*\) holds 16"),
    ("num_object_classes", 7, r"shard-00000/data-00000-of-00001\.arrow \(region_class_probs.*\) holds 5"),
    ("feature_dtype", "float32", r"shard-00000/data-00000-of-00001\.arrow \(region_features\) holds 'float16'"),
    ("num_shards", 2, r"shards/ \(up to shard-00002\) holds 3"),
    ("num_shards", 4, r"shard-00000/shard_report\.json \(written with the shards\) holds 3"),
]


def edit_info(folder, name, value):
    info_path = folder / "cache_info.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), name: value}))


@pytest.mark.parametrize(("name", "value", "holds"), EDITED_INFO, ids=[f"{n}={v}" for n, v, _ in EDITED_INFO])
def test_a_cache_info_that_disagrees_with_the_shards_is_named_at_open_and_by_verify(cache_copy, name, value, holds):
    edit_info(cache_copy, name, value)
    message = rf"cache_info\.json says {name}={re.escape(repr(value))}, but .*{holds}: cache_info\.json was edited"
    with pytest.raises(RegionCacheError, match=message):
        load_region_cache(cache_copy)
    with pytest.raises(RegionCacheError, match=message):
        verify_region_cache(cache_copy)


def test_the_verify_flag_ends_naming_the_field_of_cache_info(cache_copy):
    edit_info(cache_copy, "region_feature_size", 8)
    # SystemExit with a message: one line on stderr, exit status 1.
    with pytest.raises(SystemExit, match=r"error: .*cache_info\.json says region_feature_size=8, but"):
        main(["--output_dir", str(cache_copy), "--verify"])


def test_an_intact_cache_still_opens_and_reads_its_own_sizes(cache_folder):
    cache = load_region_cache(cache_folder)
    record = cache[cache.keys()[0]]
    assert record["region_features"].shape[1] == FEATURES and record["region_class_probs"].shape[1] == 5
    assert verify_region_cache(cache_folder) == 4


# ------------------------------------------------------------------------------------------------ extractor output


def with_one_bad_record(change):
    """The generated extractor, with `change` applied to the record of most regions of each batch."""

    class BadExtractor(GeneratedExtractor):
        def extract(self, *args, **kwargs):
            records = super().extract(*args, **kwargs)
            change(max(records, key=lambda record: record["num_regions"]))
            return records

    return BadExtractor()


BAD_RECORDS = [
    (
        "features overflowing float16",
        lambda r: r.update(region_features=r["region_features"] * 1e6),
        r"region_features hold NaN or infinite values .*\(as stored, in float16\)",
    ),
    ("num_regions of another count", lambda r: r.update(num_regions=999), r"num_regions is 999, but region_features"),
    (
        "one box for every region",
        lambda r: r.update(region_boxes=r["region_boxes"][:1]),
        r"region_boxes has shape \(1, 4\); expected \(\d+, 4\)",
    ),
    (
        "negative class labels",
        lambda r: r.update(region_class_labels=np.full(r["num_regions"], -5)),
        r"region_class_labels \[-5, .*\] are outside \[0, 5\)",
    ),
    (
        "features of another width",
        lambda r: r.update(region_features=r["region_features"][:, :8]),
        rf"region_features has shape \(\d+, 8\); expected \(\d+, {FEATURES}\)",
    ),
    (
        "class distributions of fewer rows",
        lambda r: r.update(region_class_probs=r["region_class_probs"][:1]),
        r"region_class_probs has 1 rows but region_features has",
    ),
    ("a NaN box", lambda r: r["region_boxes"].__setitem__((0, 0), np.nan), r"region_boxes hold NaN or infinite"),
    (
        "float class labels",
        lambda r: r.update(region_class_labels=r["region_class_labels"].astype(np.float32)),
        r"region_class_labels has dtype float32",
    ),
]


@pytest.mark.parametrize(("change", "problem"), [c[1:] for c in BAD_RECORDS], ids=[c[0] for c in BAD_RECORDS])
def test_a_record_that_cannot_be_stored_is_a_failure_of_its_image(tmp_path, change, problem):
    report = extract_regions(
        image_table(4, repeat_first=False), tmp_path, with_one_bad_record(change), key_column="key", progress=False
    )
    assert (report.num_extracted, report.num_failed) == (3, 1), report.failures
    (failure,) = report.failures
    assert re.search(rf"(image|sample) '{failure['key']}'", failure["error"]), failure
    assert re.search(problem, failure["error"]), failure["error"]
    assert json.loads((tmp_path / "report.json").read_text())["failures"] == report.failures
    verify_region_cache(tmp_path)
    cache = load_region_cache(tmp_path)
    assert cache.errors == {failure["key"]: failure["error"]} and len(cache) == 3
    for key in cache:
        assert np.isfinite(cache[key]["region_features"]).all()


def test_features_that_fit_float32_are_stored_when_float32_is_asked_for(tmp_path):
    extractor = with_one_bad_record(lambda r: r.update(region_features=r["region_features"] * 1e6))
    report = extract_regions(
        image_table(4, repeat_first=False),
        tmp_path,
        extractor,
        key_column="key",
        progress=False,
        storage_dtype="float32",
    )
    assert (report.num_extracted, report.num_failed) == (4, 0), report.failures
