"""Region extraction when processes die or overlap: a worker process killed mid-shard, a damaged `lookup.arrow`, a
merge rerun over what a killed merge left, two processes finishing one folder, and the same run started twice."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from transformers.testing_utils import CaptureLogger

from imagebert_hf import ImageBERTRoIExtractor
from imagebert_hf.regions import cache_reader, cache_writer
from imagebert_hf.regions.cache_layout import RegionCacheError
from imagebert_hf.regions.cache_reader import load_region_cache, verify_region_cache
from imagebert_hf.regions.cache_writer import extract_regions, merge_region_caches

from .conftest import TINY_EXTRACTOR_KWARGS
from .test_extract_regions_cli_inputs import run_main
from .test_region_cache_scale import GeneratedExtractor, assert_same_records, build, records_of
from .testing_utils import PROJECT_ROOT


# ------------------------------------------------------------------------------------------ a worker process dies


class DiesOnOneImage(ImageBERTRoIExtractor):
    """Its process dies, as under the out-of-memory killer, on an image whose path holds `$DIE_ON` (when set)."""

    def extract_stream(self, images, *args, **kwargs):
        poison = os.environ.get("DIE_ON")
        if poison and any(poison in str(image) for image in images):
            os.kill(os.getpid(), signal.SIGKILL)
        yield from super().extract_stream(images, *args, **kwargs)


def _photos(folder, names):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for name in names:
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / "images" / f"{name}.png")
        lines.append(json.dumps({"image": f"images/{name}.png", "captions": [name]}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "captions.jsonl"


def _extract_with_workers(manifest: str, output_dir: str, extractor_dir: str) -> None:
    """What the child process of the test below runs."""
    extractor = DiesOnOneImage.from_pretrained(extractor_dir)
    extract_regions(manifest, output_dir, extractor, shard_size=1, num_proc=2, progress=False)


def test_a_worker_process_killed_mid_shard_ends_the_run_naming_its_shard_and_a_rerun_resumes(tmp_path):
    manifest = _photos(tmp_path, ["a", "b", "poison", "d"])
    out, saved = tmp_path / "cache", tmp_path / "extractor"
    DiesOnOneImage(**TINY_EXTRACTOR_KWARGS).save_pretrained(saved)
    call = f"{_extract_with_workers.__module__}._extract_with_workers({str(manifest)!r}, {str(out)!r}, {str(saved)!r})"
    child = subprocess.Popen(
        [sys.executable, "-c", f"import {_extract_with_workers.__module__}; {call}"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "DIE_ON": "poison"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the pool's workers are stopped with it
    )
    try:
        output, _ = child.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        pytest.fail("extract_regions(num_proc=2) still waits for a worker process that was killed")
    assert child.returncode == 1, output
    assert (
        "ChildProcessError: a worker process died while extracting shard-00002 (killed by SIGKILL, as the "
        "out-of-memory killer kills)" in output
    ), output
    assert "rerun with the same arguments to resume" in output
    assert not (out / "shards" / "shard-00002").exists()

    # The rerun (here without the deadly image's effect) keeps what the workers finished and extracts the rest.
    finished = [folder.name for folder in (out / "shards").iterdir() if ".tmp-" not in folder.name]
    report = extract_regions(manifest, out, DiesOnOneImage.from_pretrained(saved), shard_size=1, progress=False)
    assert (report.num_extracted, report.num_failed, report.num_shards_skipped) == (4, 0, len(finished))
    assert sorted(folder.name for folder in (out / "shards").iterdir()) == [f"shard-0000{i}" for i in range(4)]


# ------------------------------------------------------------------------------------------ lookup.arrow


def _flip_a_bit_of_a_key_hash(folder, key):
    """Changes one bit of `key`'s hash in `lookup.arrow`, in place: the file keeps its size and stays valid Arrow."""
    file = folder / "lookup.arrow"
    with pa.memory_map(str(file)) as source:
        table = pa.ipc.open_file(source).read_all()
    value = int(table.column("hash")[table.column("key").to_pylist().index(key)].as_py()).to_bytes(8, "little")
    data = bytearray(file.read_bytes())
    assert data.count(value) == 1
    data[data.find(value) + 5] ^= 0x01
    file.write_bytes(bytes(data))


def test_verify_finds_a_changed_lookup_table_and_a_rerun_builds_it_again(tmp_path):
    build(tmp_path, num_images=8, shard_size=3)
    _flip_a_bit_of_a_key_hash(tmp_path, "img00001")
    assert "img00001" not in load_region_cache(tmp_path)  # what the damage does to lookups

    with pytest.raises(RegionCacheError, match=r"lookup.arrow is damaged \(its sha256 or size differs.*Rerun"):
        verify_region_cache(tmp_path)
    assert "lookup.arrow is damaged" in run_main("--output_dir", tmp_path, "--verify")

    with CaptureLogger(cache_writer.logger) as captured:
        build(tmp_path, num_images=8, shard_size=3)
    assert "lookup.arrow: its sha256 or size differs from the one recorded in cache_info.json; building it" in (
        captured.out
    )
    assert "img00001" in load_region_cache(tmp_path)
    assert verify_region_cache(tmp_path) == 4  # index.jsonl and one data file per shard (lookup.arrow uncounted)


def test_a_cache_completed_before_the_lookup_checksum_verifies_saying_so_and_a_rerun_records_it(tmp_path):
    build(tmp_path, num_images=8, shard_size=3)
    info = json.loads((tmp_path / "cache_info.json").read_text())
    info.pop("lookup", None)
    (tmp_path / "cache_info.json").write_text(json.dumps(info))
    with CaptureLogger(cache_reader.logger) as captured:
        assert verify_region_cache(tmp_path) == 4
    assert "no checksum of lookup.arrow was recorded (a cache completed by an earlier version)" in captured.out

    build(tmp_path, num_images=8, shard_size=3)
    assert set(json.loads((tmp_path / "cache_info.json").read_text())["lookup"]) == {"size", "sha256"}
    with CaptureLogger(cache_reader.logger) as captured:
        assert verify_region_cache(tmp_path) == 4
    assert not captured.out


# ------------------------------------------------------------------------------------------ merge reruns


def test_a_merge_rerun_over_what_a_killed_merge_left_in_a_process_of_the_same_pid(tmp_path, monkeypatch):
    for index in (0, 1):
        build(tmp_path / f"part{index}", num_images=8, shard_size=3, num_shards=2, shard_index=index)
    parts, out = [tmp_path / "part0", tmp_path / "part1"], tmp_path / "merged"
    real = cache_writer._link_or_copy

    def copy_then_stop(source, target):
        real(source, target)
        if "shard-00001" in target:
            raise KeyboardInterrupt  # the merge is killed while it copies that shard

    monkeypatch.setattr(cache_writer, "_link_or_copy", copy_then_stop)
    with pytest.raises(KeyboardInterrupt):
        merge_region_caches(parts, out)
    monkeypatch.undo()
    # What an earlier version left, named by the pid alone, which a container's rerun gets again.
    shutil.copytree(tmp_path / "part1" / "shards" / "shard-00001", out / "shards" / f"shard-00001.tmp-{os.getpid()}")
    assert len(list((out / "shards").glob("shard-00001.tmp-*"))) == 2

    merge_region_caches(parts, out)
    assert sorted(path.name for path in (out / "shards").iterdir()) == ["shard-00000", "shard-00001", "shard-00002"]
    build(tmp_path / "whole", num_images=8, shard_size=3)
    assert_same_records(records_of(load_region_cache(out)), records_of(load_region_cache(tmp_path / "whole")))


# ------------------------------------------------------------------------------------------ processes overlapping


def test_report_json_keeps_every_shard_when_a_process_that_counted_fewer_writes_it_last(tmp_path, monkeypatch):
    failing = {b"image 1", b"image 7"}  # in the first and the last of 3 shards
    real = cache_writer.atomic_write_json
    other_ran = []

    def the_other_process_finishes_first(path, *args, **kwargs):
        # This process has counted its one shard; the other finishes the cache and writes its report meanwhile.
        if os.path.basename(str(path)) == "report.json" and not other_ran:
            other_ran.append(None)  # the other process's own writes go straight through
            other_ran[0] = build(tmp_path, num_images=8, shard_size=3, extractor=GeneratedExtractor(failing))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cache_writer, "atomic_write_json", the_other_process_finishes_first)
    mine = build(tmp_path, num_images=8, shard_size=3, extractor=GeneratedExtractor(failing), max_shards=1)
    (other,) = other_ran
    assert (other.num_extracted, other.num_failed) == (6, 2)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert (saved["num_extracted"], saved["num_failed"]) == (6, 2)
    assert sorted(failure["key"] for failure in saved["failures"]) == ["img00001", "img00007"]
    assert (mine.num_extracted, mine.num_failed) == (6, 2)


@pytest.mark.parametrize("published", ["same plan", "another plan"])
def test_a_shard_another_run_published_first_counts_as_done_when_of_the_same_plan(tmp_path, monkeypatch, published):
    reference = tmp_path / "reference"
    build(reference, num_images=8, shard_size=3, storage_dtype="float16" if published == "same plan" else "float32")
    out = tmp_path / "cache"
    real = cache_writer.publish_folder

    def the_other_run_publishes_first(tmp, final, *args, **kwargs):
        # The same run, started twice on one folder, finished this shard a moment earlier.
        if os.path.basename(final).startswith("shard-") and not os.path.exists(final):
            shutil.copytree(reference / "shards" / os.path.basename(final), final)
        return real(tmp, final, *args, **kwargs)

    monkeypatch.setattr(cache_writer, "publish_folder", the_other_run_publishes_first)
    if published == "another plan":
        with pytest.raises(FileExistsError, match="shard-00000 exists"):
            build(out, num_images=8, shard_size=3)
        return
    report = build(out, num_images=8, shard_size=3)
    assert (report.num_extracted, report.num_failed, report.num_shards) == (8, 0, 3)
    assert not list((out / "shards").glob("*.tmp-*"))
    assert_same_records(records_of(load_region_cache(out)), records_of(load_region_cache(reference)))
    assert verify_region_cache(out) == 4


def test_a_dataset_in_its_own_files_is_planned_without_holding_its_images(tmp_path):
    """Planning hashes every image; held whole, a dataset of image bytes took twice its size in memory in every
    process. The cache is the one an in-memory copy of the same dataset gives."""
    import tracemalloc

    import datasets

    rng = np.random.default_rng(0)
    rows = {"key": [f"img{i:03d}" for i in range(40)], "image": []}
    for _ in range(40):
        rows["image"].append({"bytes": rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes(), "path": None})
    in_memory = datasets.Dataset.from_dict(
        rows, features=datasets.Features({"key": datasets.Value("string"), "image": datasets.Image()})
    )
    in_memory.save_to_disk(tmp_path / "saved")
    on_disk = datasets.load_from_disk(tmp_path / "saved")
    extractor = GeneratedExtractor()
    extractor.max_file_bytes = 1 << 20

    tracemalloc.start()
    items = cache_writer._dataset_items(on_disk, "image", "key", None, "xyxy")
    listing_peak = tracemalloc.get_traced_memory()[1]
    units, _ = cache_writer._plan(items, extractor.max_file_bytes)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(units) == 40 and held < 1_000_000, f"planning holds {held} bytes of a 4,000,000-byte dataset"
    # Listed from the column's paths and byte lengths: not one image's bytes were read into memory.
    assert listing_peak < 100_000, f"listing 40 rows of 100,000-byte images peaked at {listing_peak} bytes"

    kept = extract_regions(on_disk, tmp_path / "from_disk", extractor, key_column="key", shard_size=16, progress=False)
    whole = extract_regions(
        in_memory, tmp_path / "in_memory", extractor, key_column="key", shard_size=16, progress=False
    )
    assert kept.num_extracted == whole.num_extracted == 40
    assert_same_records(load_region_cache(tmp_path / "from_disk"), load_region_cache(tmp_path / "in_memory"))
