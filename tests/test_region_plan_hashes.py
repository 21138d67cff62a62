"""Planning a region cache reads each image once: the processes of a launch share out the content hashes through the
cache's `plan/` folder, a rerun hashes only files that changed, and a missing, damaged or lying share costs time,
never a hang or a wrong hash."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagebert_hf.regions import extract_regions, image_hashes, load_region_cache

from .test_region_cache_scale import GeneratedExtractor
from .testing_utils import PROJECT_ROOT


NUM_IMAGES = 12


def write_manifest(folder: Path, count: int = NUM_IMAGES) -> Path:
    """`count` distinct 8x8 PNGs (the last one a copy of the first, under another name) and their manifest."""
    (folder / "images").mkdir(parents=True)
    lines = []
    for index in range(count):
        shade = index if index < count - 1 else 0
        Image.new("RGB", (8, 8), (shade * 10, 40, 200 - shade)).save(folder / "images" / f"{index:03d}.png")
        lines.append(json.dumps({"image": f"images/{index:03d}.png", "captions": [f"photo {index}"]}))
    manifest = folder / "captions.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture
def counted_hashes(monkeypatch):
    """The images hashed in this process: each call of `image_content_hash` through the planning module."""
    hashed = []
    original = image_hashes.image_content_hash
    monkeypatch.setattr(
        image_hashes, "image_content_hash", lambda image, *args: hashed.append(str(image)) or original(image, *args)
    )
    return hashed


RANK_SCRIPT = """
import json, sys
from imagebert_hf.regions import extract_regions, image_hashes
from tests.test_region_cache_scale import GeneratedExtractor
hashed = []
original = image_hashes.image_content_hash
image_hashes.image_content_hash = lambda image, *args: hashed.append(str(image)) or original(image, *args)
report = extract_regions(sys.argv[1], sys.argv[2], GeneratedExtractor(), shard_size=3, progress=False)
print(json.dumps({"hashed": hashed, "shards": report.num_shards}))
"""


def launch_two_ranks(manifest: Path, output_dir: Path) -> list[dict]:
    """Two processes of one launch (the environment `torchrun --nproc_per_node 2` gives), started together."""
    running = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), str(PROJECT_ROOT / "src")]),
        }
        running.append(
            subprocess.Popen(
                [sys.executable, "-c", RANK_SCRIPT, str(manifest), str(output_dir)],
                env=env,
                cwd=PROJECT_ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for process in running:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_the_processes_of_a_launch_hash_each_image_once_and_plan_the_same_cache(tmp_path):
    manifest = write_manifest(tmp_path / "data")
    ranks = launch_two_ranks(manifest, tmp_path / "shared")
    hashed = [set(rank["hashed"]) for rank in ranks]
    images = sorted(str(path) for path in (tmp_path / "data" / "images").iterdir())
    # Each hashed its own half, every other image of the listing; none was read twice.
    assert sorted(hashed[0] | hashed[1]) == images and not hashed[0] & hashed[1]
    assert [len(rank["hashed"]) for rank in ranks] == [NUM_IMAGES // 2] * 2
    assert sorted((tmp_path / "shared" / "plan").glob("*/part-*.arrow")) and len(ranks[0]) == 2

    extract_regions(manifest, tmp_path / "alone", GeneratedExtractor(), shard_size=3, progress=False)
    shared, alone = load_region_cache(tmp_path / "shared"), load_region_cache(tmp_path / "alone")
    assert shared.info["complete"] and shared.info["fingerprint"] == alone.info["fingerprint"]
    assert (tmp_path / "shared" / "index.jsonl").read_text() == (tmp_path / "alone" / "index.jsonl").read_text()
    for key in alone:
        np.testing.assert_array_equal(shared[key]["region_features"], alone[key]["region_features"])
    assert shared.info["num_shards"] == ranks[0]["shards"] == 4  # 11 distinct pictures in shards of 3


def test_a_rerun_hashes_only_the_files_that_changed(tmp_path, counted_hashes):
    manifest = write_manifest(tmp_path / "data")
    extract_regions(manifest, tmp_path / "cache", GeneratedExtractor(), shard_size=3, progress=False)
    assert len(counted_hashes) == NUM_IMAGES
    counted_hashes.clear()

    report = extract_regions(manifest, tmp_path / "cache", GeneratedExtractor(), shard_size=3, progress=False)
    assert counted_hashes == [] and report.num_shards_skipped == 4
    # A photo replaced by another: its file's size or time changed, so it is read again, and the cache still tells
    # that it was started with other images.
    replaced = tmp_path / "data" / "images" / "004.png"
    Image.new("RGB", (9, 9), (1, 2, 3)).save(replaced)
    with pytest.raises(ValueError, match="holds a region cache of another source: .*images/004.png"):
        extract_regions(manifest, tmp_path / "cache", GeneratedExtractor(), shard_size=3, progress=False)
    assert counted_hashes == [str(replaced)]


def test_a_share_no_process_publishes_is_hashed_here_after_a_bounded_wait(tmp_path, monkeypatch, counted_hashes):
    """Process 0 of 2 alone (its peer died before planning, or plans another folder): it waits its bounded time,
    then hashes the missing share itself, and plans what a lone process plans."""
    manifest = write_manifest(tmp_path / "data")
    monkeypatch.setattr(image_hashes, "MIN_PEER_WAIT_SECONDS", 0.3)
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    report = extract_regions(manifest, tmp_path / "cache", GeneratedExtractor(), shard_size=3, progress=False)
    assert sorted(counted_hashes) == sorted(str(p) for p in (tmp_path / "data" / "images").iterdir())
    assert report.num_shards == 4 and len(list((tmp_path / "cache" / "shards").iterdir())) == 2  # its half


@pytest.mark.parametrize("damage", ["garbage", "lying_hash", "other_size"])
def test_a_damaged_or_lying_plan_part_is_not_believed(tmp_path, counted_hashes, damage):
    import pyarrow as pa

    manifest = write_manifest(tmp_path / "data")
    extract_regions(manifest, tmp_path / "alone", GeneratedExtractor(), shard_size=3, progress=False)
    (part,) = (tmp_path / "alone" / "plan").glob("*/part-*.arrow")
    if damage == "garbage":
        part.write_bytes(b"not an arrow file")
    else:
        table = pa.ipc.open_file(pa.BufferReader(part.read_bytes())).read_all()
        column = "content" if damage == "lying_hash" else "size"
        values = table.column(column).to_pylist()
        values[0] = "not a sha1; DROP TABLE" if damage == "lying_hash" else values[0] + 1
        table = table.set_column(
            table.schema.get_field_index(column), column, pa.array(values, table.schema.field(column).type)
        )
        with pa.OSFile(str(part), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    counted_hashes.clear()
    report = extract_regions(manifest, tmp_path / "alone", GeneratedExtractor(), shard_size=3, progress=False)
    assert report.num_shards_skipped == 4  # the same plan: the hashes it did not believe were computed again
    assert len(counted_hashes) == (NUM_IMAGES if damage == "garbage" else 1)


def test_a_refused_source_leaves_no_plan_behind_in_a_cache_of_another_one(tmp_path):
    first, second = write_manifest(tmp_path / "one"), write_manifest(tmp_path / "two", count=5)
    extract_regions(first, tmp_path / "cache", GeneratedExtractor(), shard_size=3, progress=False)
    plans = sorted((tmp_path / "cache" / "plan").iterdir())
    with pytest.raises(ValueError, match="holds a region cache of another source"):
        extract_regions(second, tmp_path / "cache", GeneratedExtractor(), shard_size=3, progress=False)
    assert sorted((tmp_path / "cache" / "plan").iterdir()) == plans
    with pytest.raises(ValueError, match="holds a region cache of another source"):
        extract_regions(second, tmp_path / "cache", GeneratedExtractor(), shard_size=4, progress=False)
