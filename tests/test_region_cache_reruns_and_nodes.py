"""Reruns and splits of region extraction: a rerun whose keys changed, machines of one multi-machine launch, machines
sharing one folder, regenerated precomputed files, and worker processes of an extractor subclass."""

import json
import os

import datasets
import numpy as np
import pytest

from imagebert_hf import ImageBERTRoIExtractor
from imagebert_hf.models.imagebert.roi_precomputed import write_npz_regions
from imagebert_hf.regions import extract_regions, load_region_cache
from imagebert_hf.regions.cache_writer import merge_region_caches

from .test_region_cache_writer_edges import _images


class ZeroFeaturesExtractor(ImageBERTRoIExtractor):
    """A subclass whose regions differ from its base class's: every feature is zero."""

    def extract_stream(self, *args, **kwargs):
        for records in super().extract_stream(*args, **kwargs):
            for record in records:
                record["region_features"] = np.zeros_like(record["region_features"])
            yield records


@pytest.fixture(scope="module")
def tiny(make_tiny_extractor):
    return make_tiny_extractor()


def _keyed(paths, keys):
    return datasets.Dataset.from_dict({"id": list(keys), "image": [str(path) for path in paths]})


def _image_paths(folder, count):
    _images(folder, count)
    return [folder / "images" / f"{i:03d}.png" for i in range(count)]


def test_a_rerun_whose_keys_name_other_images_is_refused_naming_the_key(tiny, tmp_path):
    paths = _image_paths(tmp_path, 3)
    out = tmp_path / "cache"
    extract_regions(_keyed(paths, ["cat", "dog", "car"]), out, tiny, key_column="id", progress=False)
    index_before = (out / "index.jsonl").read_bytes()

    with pytest.raises(ValueError, match=r"'cat' there, 'dog' here.*another output_dir"):
        extract_regions(_keyed(paths, ["dog", "cat", "car"]), out, tiny, key_column="id", progress=False)
    # A new key for an image already there: the same images and plan, one more index line.
    with pytest.raises(ValueError, match=r"the key 'tree' \(index line 4\) is new"):
        extract_regions(
            _keyed(paths + paths[:1], ["cat", "dog", "car", "tree"]), out, tiny, key_column="id", progress=False
        )
    assert (out / "index.jsonl").read_bytes() == index_before
    # The same keys resume as before.
    report = extract_regions(_keyed(paths, ["cat", "dog", "car"]), out, tiny, key_column="id", progress=False)
    assert report.num_shards_skipped == 1


def test_parts_whose_keys_differ_are_not_merged(tiny, tmp_path):
    paths = _image_paths(tmp_path, 2)
    for part, keys in (("part0", ["a", "b"]), ("part1", ["b", "a"])):
        extract_regions(
            _keyed(paths, keys), tmp_path / part, tiny, key_column="id", shard_size=1, num_shards=2,
            shard_index=int(part[-1]), progress=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"key their images differently: index line 1 is the key 'a' there"):
        merge_region_caches([tmp_path / "part0", tmp_path / "part1"], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_two_machines_of_one_torchrun_with_num_shards_extract_every_shard_once(tiny, tmp_path, monkeypatch):
    manifest = _images(tmp_path, 6)
    out = tmp_path / "cache"
    # `torchrun --nnodes 2 --nproc_per_node 2` sets global RANK / WORLD_SIZE; each machine also gets
    # --num_shards 2 --shard_index NODE.
    computed = []
    for node in (0, 1):
        for local in (0, 1):
            for name, value in (("RANK", 2 * node + local), ("WORLD_SIZE", 4), ("LOCAL_RANK", local)):
                monkeypatch.setenv(name, str(value))
            monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
            before = set(os.listdir(out / "shards")) if (out / "shards").is_dir() else set()
            extract_regions(manifest, out, tiny, shard_size=1, num_shards=2, shard_index=node, progress=False)
            computed += sorted(set(os.listdir(out / "shards")) - before)
    assert computed == [f"shard-{s:05d}" for s in (0, 4, 2, 1, 5, 3)]
    assert json.loads((out / "cache_info.json").read_text())["complete"] is True
    assert len(load_region_cache(out)) == 6


def test_a_starting_machine_keeps_the_temporary_folders_of_other_machines_shards(tiny, tmp_path):
    manifest = _images(tmp_path, 4)
    out = tmp_path / "cache"
    extract_regions(manifest, out, tiny, shard_size=1, num_shards=2, shard_index=0, max_shards=1, progress=False)
    # Machine 1 is writing shard 1; a killed run of machine 0 left shard 2 half written.
    theirs, stale = out / "shards" / "shard-00001.tmp-4242", out / "shards" / "shard-00002.tmp-4243"
    for folder in (theirs, stale):
        folder.mkdir()
        (folder / "data-00000-of-00001.arrow").write_bytes(b"partial")

    extract_regions(manifest, out, tiny, shard_size=1, num_shards=2, shard_index=0, progress=False)

    assert theirs.is_dir() and not stale.exists()
    assert (out / "shards" / "shard-00002").is_dir()


def test_a_resume_after_the_precomputed_files_were_regenerated_is_refused(tiny, tmp_path):
    manifest = _images(tmp_path, 4)
    npz = tmp_path / "npz"
    npz.mkdir()

    def write(scale):
        for i in range(4):
            record = dict(tiny.extract(str(tmp_path / "images" / f"{i:03d}.png"))[0])
            record["region_features"] = record["region_features"] * scale
            write_npz_regions(npz / f"{i:03d}.npz", record)
            os.utime(npz / f"{i:03d}.npz", ns=(10**18 * scale, 10**18 * scale))

    def precomputed():
        return ImageBERTRoIExtractor(backend="precomputed", precomputed_path=str(npz))

    write(1)
    out = tmp_path / "cache"
    extract_regions(manifest, out, precomputed(), shard_size=2, max_shards=1, progress=False)
    write(2)
    with pytest.raises(ValueError, match=r"other precomputed files: the files under .*npz changed"):
        extract_regions(manifest, out, precomputed(), shard_size=2, progress=False)
    write(1)  # the files it started from: resumed
    report = extract_regions(manifest, out, precomputed(), shard_size=2, progress=False)
    assert (report.num_shards_skipped, report.num_extracted) == (1, 4)


def test_precomputed_files_copied_to_each_machine_and_a_cache_inside_their_folder_are_the_same_files(tiny, tmp_path):
    """What the fingerprint of precomputed regions reads: the `.npz` files and their bytes, not their modification
    times (each machine of a sharded run copies the files), nor the cache being written inside their folder."""
    import shutil

    manifest = _images(tmp_path, 4)
    master = tmp_path / "master"
    master.mkdir()
    for i in range(4):
        write_npz_regions(master / f"{i:03d}.npz", dict(tiny.extract(str(tmp_path / "images" / f"{i:03d}.png"))[0]))
    local = tmp_path / "local"  # the same path on every machine, a plain copy there
    for machine in (0, 1):
        shutil.rmtree(local, ignore_errors=True)
        shutil.copytree(master, local, copy_function=shutil.copyfile)
        os.utime(local / "000.npz", ns=(10**18 + machine, 10**18 + machine))
        precomputed = ImageBERTRoIExtractor(backend="precomputed", precomputed_path=str(local))
        extract_regions(
            manifest, tmp_path / f"part{machine}", precomputed, shard_size=1, num_shards=2, shard_index=machine,
            progress=False,
        )  # fmt: skip
    merge_region_caches([tmp_path / "part0", tmp_path / "part1"], tmp_path / "merged")
    assert len(load_region_cache(tmp_path / "merged")) == 4

    # The cache written inside the folder of the files it reads: its own files do not change them, so it resumes.
    precomputed = ImageBERTRoIExtractor(backend="precomputed", precomputed_path=str(master))
    extract_regions(manifest, master / "cache", precomputed, shard_size=2, max_shards=1, progress=False)
    report = extract_regions(manifest, master / "cache", precomputed, shard_size=2, progress=False)
    assert (report.num_shards_skipped, report.num_extracted) == (1, 4)


def test_worker_processes_run_the_extractor_subclass(tmp_path):
    manifest = _images(tmp_path, 4)
    extractor = ZeroFeaturesExtractor(**{**tiny_kwargs(), "batch_size": 2})
    extract_regions(manifest, tmp_path / "cache", extractor, shard_size=2, num_proc=2, progress=False)
    cache = load_region_cache(tmp_path / "cache")
    assert len(cache) == 4
    assert all(not np.any(cache[key]["region_features"]) for key in cache)


def test_num_proc_with_a_class_the_workers_cannot_import_is_refused(make_tiny_extractor, tmp_path):
    class LocalExtractor(ImageBERTRoIExtractor):
        pass

    manifest = _images(tmp_path, 2)
    extractor = LocalExtractor(**tiny_kwargs())
    with pytest.raises(ValueError, match=r"num_proc=2 .*LocalExtractor is not .*or pass num_proc=1"):
        extract_regions(manifest, tmp_path / "cache", extractor, num_proc=2, progress=False)
    assert not (tmp_path / "cache").exists()


def tiny_kwargs():
    from .conftest import TINY_EXTRACTOR_KWARGS

    return dict(TINY_EXTRACTOR_KWARGS)
