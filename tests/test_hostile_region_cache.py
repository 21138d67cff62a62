"""Hostile input at the region cache: settings out of range, a damaged `cache_info.json`, swapped or replaced
shards and key tables, a read dtype that is not a float, a gallery given a string. Every error names the file or the
argument; a swapped file never returns another image's regions."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from imagebert_hf.regions.cache_layout import RegionCacheError
from imagebert_hf.regions.cache_reader import load_region_cache, verify_region_cache
from imagebert_hf.regions.cli import main

from .test_region_cache_scale import build
from .testing_utils import PROJECT_ROOT


@pytest.fixture(scope="module")
def cache_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    build(folder, num_images=8, shard_size=3)  # 3 shards: 3 + 3 + 2 distinct images
    return folder


# ------------------------------------------------------------------------------------------------ settings

SETTINGS = [
    ("shard_size", 0, "shard_size must be a positive integer, got 0"),
    ("shard_size", -5, "shard_size must be a positive integer, got -5"),
    ("shard_size", 2.5, "shard_size must be a positive integer, got 2.5"),
    ("shard_size", "5", "shard_size must be a positive integer, got '5'"),
    ("shard_size", True, "shard_size must be a positive integer, got True"),
    ("num_proc", 0, "num_proc must be a positive integer, got 0"),
    ("num_shards", 0, "num_shards must be a positive integer, got 0"),
    ("batch_size", 0, "batch_size must be a positive integer or None, got 0"),
    ("max_shards", 0, "max_shards must be a positive integer or None, got 0"),
    ("box_format", "xy", "box_format must be 'xyxy' or 'xywh', got 'xy'"),
    ("storage_dtype", "int8", "storage_dtype must be one of"),
]


@pytest.mark.parametrize(("name", "value", "message"), SETTINGS, ids=[f"{n}={v!r}" for n, v, _ in SETTINGS])
def test_a_setting_out_of_range_is_named_before_anything_is_written(tmp_path, name, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(tmp_path / "out", **{name: value})
    assert not (tmp_path / "out").exists()


def test_a_missing_manifest_is_named(tmp_path):
    from imagebert_hf.regions.cache_writer import extract_regions

    with pytest.raises(FileNotFoundError, match=r"source .*nope.jsonl does not exist"):
        extract_regions(tmp_path / "nope.jsonl", tmp_path / "out", progress=False)


def test_an_output_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"output_dir .*file exists and is not a folder"):
        build(tmp_path / "file")


# ------------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("dtype", ["int8", "int64", "bool", "uint8", np.int32, 3, "bfloat16"])
def test_a_read_dtype_that_is_not_a_float_is_refused(cache_folder, dtype):
    with pytest.raises(ValueError, match=r"dtype must be one of \(None, 'float16', 'float32', 'float64'\)"):
        load_region_cache(cache_folder, dtype=dtype)


@pytest.mark.parametrize("dtype", [None, "float16", "float32", "float64"])
def test_float_read_dtypes_work(cache_folder, dtype):
    cache = load_region_cache(cache_folder, dtype=dtype)
    features = cache[cache.keys()[0]]["region_features"]
    assert features.dtype == np.dtype(dtype or "float16") and np.isfinite(features).all()


@pytest.mark.parametrize("key", [3, None, b"000000000139.jpg"])
def test_a_key_that_is_not_a_string_is_named(cache_folder, key):
    cache = load_region_cache(cache_folder)
    with pytest.raises(TypeError, match=rf"region cache keys are strings .*got {re.escape(repr(key))}"):
        cache[key]
    assert cache.get(cache.keys()[0]) is not None


DAMAGED_INFO = [
    ("not JSON", "{", r"Expecting property name.*rerun imagebert-extract-regions"),
    ("not UTF-8", b"\xff\xfe\x00", r"codec can.t decode byte 0xff"),
    ("a list", "[1, 2]", r"expected a JSON object, got list"),
    ("empty object", "{}", r"field 'fingerprint' should be str, got None"),
    ("num_shards a string", {"num_shards": "3"}, r"field 'num_shards' should be int, got '3'"),
    ("num_shards negative", {"num_shards": -1}, r"num_shards=-1.*out of range"),
    ("feature size zero", {"region_feature_size": 0}, r"region_feature_size=0.*out of range"),
    ("feature dtype int8", {"feature_dtype": "int8"}, r"feature_dtype 'int8' is not one of"),
    ("num_shards a bool", {"num_shards": True}, r"field 'num_shards' should be int, got True"),
]


@pytest.mark.parametrize(("change", "message"), [c[1:] for c in DAMAGED_INFO], ids=[c[0] for c in DAMAGED_INFO])
def test_a_damaged_cache_info_is_named(cache_copy, change, message):
    info_path = cache_copy / "cache_info.json"
    if isinstance(change, dict):
        info_path.write_text(json.dumps({**json.loads(info_path.read_text()), **change}))
    elif isinstance(change, bytes):
        info_path.write_bytes(change)
    else:
        info_path.write_text(change)
    with pytest.raises(RegionCacheError, match=rf"cache_info.json is damaged.*{message}"):
        load_region_cache(cache_copy)


def test_swapped_shard_folders_are_refused(cache_copy):
    shards = cache_copy / "shards"
    (shards / "shard-00000").rename(shards / "swap")
    (shards / "shard-00001").rename(shards / "shard-00000")
    (shards / "swap").rename(shards / "shard-00001")
    with pytest.raises(RegionCacheError, match=r"shard-00000 holds shard 1.*renamed or swapped"):
        load_region_cache(cache_copy)


def test_swapped_arrow_files_of_equal_size_never_return_another_images_regions(cache_copy):
    first, second = (next((cache_copy / "shards" / f"shard-0000{i}").glob("data-*.arrow")) for i in (0, 1))
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    report = json.loads((first.parent / "shard_report.json").read_text())
    other = json.loads((second.parent / "shard_report.json").read_text())
    if report["files"][first.name]["size"] != other["files"][second.name]["size"]:
        with pytest.raises(RegionCacheError, match=r"shard-00000/data-.*\.arrow is damaged .*bytes, .* recorded"):
            load_region_cache(cache_copy)
    else:
        with pytest.raises(RegionCacheError, match=r"holds rows .* but shard_report.json recorded.*swapped"):
            load_region_cache(cache_copy)


def test_an_arrow_file_of_another_size_is_named_at_open(cache_copy):
    arrow = next((cache_copy / "shards" / "shard-00002").glob("data-*.arrow"))
    with open(arrow, "ab") as handle:
        handle.write(b"\0" * 8)
    with pytest.raises(RegionCacheError, match=r"shard-00002/data-.*\.arrow is damaged.*recorded when written"):
        load_region_cache(cache_copy)


def test_a_changed_byte_is_found_by_verify_not_by_every_open(cache_copy):
    arrow = next((cache_copy / "shards" / "shard-00001").glob("data-*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[-100] ^= 0xFF  # inside the feature buffer: same size, same keys
    arrow.write_bytes(bytes(data))
    load_region_cache(cache_copy)  # cheap checks at open: sizes, places, key ranges
    with pytest.raises(RegionCacheError, match=r"shard-00001/data-.*\.arrow is damaged.*sha256 differs"):
        verify_region_cache(cache_copy)
    with pytest.raises(RegionCacheError, match="sha256 differs"):
        load_region_cache(cache_copy).verify()


def test_the_verify_flag_exits_0_on_an_intact_cache_and_1_naming_a_damaged_shard_file(cache_copy, capsys):
    assert main(["--output_dir", str(cache_copy), "--verify"]) == 0
    assert f"{cache_copy}: intact (4 files match their recorded checksums)" in capsys.readouterr().out
    arrow = next((cache_copy / "shards" / "shard-00002").glob("data-*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[-100] ^= 0xFF  # same size, same keys: only the full read finds it
    arrow.write_bytes(bytes(data))
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "imagebert_hf.regions", "--output_dir", str(cache_copy), "--verify"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.fullmatch(
        rf"imagebert-extract-regions: error: region cache file {re.escape(str(arrow))} is damaged "
        r"\(ValueError: its sha256 differs from the one recorded when written\)\. .*",
        lines[0],
    ), lines[0]


def test_the_verify_flag_is_refused_with_a_source_to_extract(cache_copy):
    with pytest.raises(SystemExit, match=r"--verify checks the cache in --output_dir; give it without --manifest"):
        main(["--output_dir", str(cache_copy), "--verify", "--manifest", "captions.jsonl"])


def test_an_edited_key_table_is_refused_when_the_lookup_is_rebuilt(cache_copy):
    index = cache_copy / "index.jsonl"
    lines = index.read_text().splitlines()
    first, second = json.loads(lines[0]), json.loads(lines[1])
    first["cache_key"], second["cache_key"] = second["cache_key"], first["cache_key"]
    index.write_text("\n".join([json.dumps(first), json.dumps(second), *lines[2:]]) + "\n")
    (cache_copy / "lookup.arrow").unlink()
    with pytest.raises(RegionCacheError, match=r"index.jsonl does not match the checksum.*other images' regions"):
        load_region_cache(cache_copy)
    with pytest.raises(RegionCacheError, match=r"index.jsonl does not match the checksum"):
        verify_region_cache(cache_copy)


def test_a_key_table_of_another_cache_is_not_used(cache_copy, tmp_path):
    build(tmp_path / "other", num_images=9, shard_size=3)
    expected = load_region_cache(cache_copy)
    first = expected.keys()[0]
    wanted = expected[first]["region_features"]
    shutil.copy(tmp_path / "other" / "lookup.arrow", cache_copy / "lookup.arrow")
    cache = load_region_cache(cache_copy)  # rebuilt from index.jsonl, with a warning
    np.testing.assert_array_equal(cache[first]["region_features"], wanted)


def test_a_row_that_does_not_hold_the_key_it_should_is_named(cache_copy):
    cache = load_region_cache(cache_copy)
    key = cache.keys()[0]
    position = int(np.flatnonzero(cache._lookup_keys.to_numpy(zero_copy_only=False) == key)[0])
    # A lookup table whose rows point elsewhere (a swapped table of the same cache and size).
    cache._lookup_rows = cache._lookup_rows.copy()
    cache._lookup_rows[position] = (cache._lookup_rows[position] + 1) % len(cache.table)
    with pytest.raises(RegionCacheError, match=rf"key '{key}' should read the regions of .* shard files were swapped"):
        cache[key]


def test_an_unreadable_shard_report_is_named(cache_copy):
    (cache_copy / "shards" / "shard-00001" / "shard_report.json").write_text("[]")
    with pytest.raises(RegionCacheError, match=r"shard-00001/shard_report.json is damaged"):
        load_region_cache(cache_copy)


def test_an_extra_arrow_file_in_a_shard_is_named(cache_copy):
    shard = cache_copy / "shards" / "shard-00000"
    shutil.copy(next(shard.glob("data-*.arrow")), shard / "data-00009-of-00010.arrow")
    with pytest.raises(RegionCacheError, match=r"shard-00000/shard_report.json is damaged.*recorded"):
        load_region_cache(cache_copy)


# ------------------------------------------------------------------------------------------------ galleries


@pytest.mark.parametrize("keys", ["img00001", b"img00001"])
def test_a_gallery_given_one_string_is_refused_not_split_into_letters(cache_folder, keys):
    with pytest.raises(TypeError, match=r"keys must be a list of keys, got the single string .*img00001.*pass \["):
        load_region_cache(cache_folder).gallery(keys)


@pytest.mark.parametrize("max_regions", [0, -1, 2.5, "4"])
def test_a_gallery_max_regions_that_is_not_a_count_is_named(cache_folder, max_regions):
    with pytest.raises(ValueError, match=rf"max_regions must be a positive integer or None, got {max_regions!r}"):
        load_region_cache(cache_folder).gallery(None, max_regions)


def test_a_gallery_key_that_is_not_in_the_cache_is_named(cache_folder):
    with pytest.raises(KeyError, match=r"'nope.jpg' is not in the region cache"):
        load_region_cache(cache_folder).gallery(["img00001", "nope.jpg"])
