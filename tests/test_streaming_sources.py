"""Streaming sources: webdataset shards through the webdataset library (paths, `pipe:`, node and worker
splitting), `datasets` streaming, joined to the region cache by key, and a recipe stage that trains on them."""

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
import yaml

from imagebert_hf.data.pair_sources import (
    DatasetStream,
    StreamingPretrainingDataset,
    WebDatasetPairSource,
    WebDatasetStream,
)
from imagebert_hf.data.synthetic import make_synthetic_examples
from imagebert_hf.regions import extract_regions, load_region_cache
from imagebert_hf.training import RecipeError, recipe_from_dict, run_pretraining

from .test_region_cache_scale import CLASSES, FEATURES, GeneratedExtractor
from .test_sources import write_img2dataset_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    examples = make_synthetic_examples(12, seed=3)
    write_img2dataset_shards(folder, examples, per_shard=3)  # 4 shards of 3
    return folder, examples


def all_pairs(folder):
    return WebDatasetPairSource(str(folder / "{00000..00003}.tar")).pairs


def test_a_stream_reads_every_pair_of_its_shards_and_pipe_urls(shards):
    folder, examples = shards
    expected = all_pairs(folder)
    assert [caption for _, caption in expected] == [example["captions"][0] for example in examples]
    stream = WebDatasetStream(str(folder / "{00000..00003}.tar"), shuffle_shards=False)
    assert list(stream.epoch_pairs(0)) == expected
    piped = WebDatasetStream([f"pipe:cat {folder / f'{i:05d}.tar'}" for i in range(4)], shuffle_shards=False)
    assert list(piped.epoch_pairs(0)) == expected
    shuffled = WebDatasetStream(str(folder / "*.tar"), seed=1)
    first, second = list(shuffled.epoch_pairs(0)), list(shuffled.epoch_pairs(1))
    assert sorted(first) == sorted(second) == sorted(expected) and first != second
    with pytest.raises(FileNotFoundError, match="not found"):
        WebDatasetStream(str(folder / "{00007..00008}.tar"))


def test_a_stream_is_split_between_processes_and_workers(shards, monkeypatch):
    folder, _ = shards
    expected = all_pairs(folder)
    parts = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        parts.append(list(WebDatasetStream(str(folder / "*.tar"), seed=5).epoch_pairs(0)))
    assert len(parts[0]) == len(parts[1]) == 6 and sorted(parts[0] + parts[1]) == sorted(expected)

    class Pairs(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from WebDatasetStream(str(folder / "*.tar"), seed=5).epoch_pairs(0)

    monkeypatch.setenv("RANK", "1")  # process 1 of 2, two DataLoader workers: one shard each
    loader = torch.utils.data.DataLoader(Pairs(), batch_size=None, num_workers=2, collate_fn=lambda pair: pair)
    seen = list(loader)
    assert sorted(seen) == sorted(parts[1])


def test_a_datasets_stream_from_files_split_between_processes(tmp_path, monkeypatch):
    rows = [{"key": f"img{i}", "captions": [f"caption {i}a", f"caption {i}b"]} for i in range(6)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    stream = DatasetStream(str(path), shuffle_buffer=0)
    pairs = list(stream.epoch_pairs(0))
    assert pairs == [(row["key"], text) for row in rows for text in row["captions"]]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    half = list(stream.epoch_pairs(0))
    assert 0 < len(half) < len(pairs) and set(half) <= set(pairs)
    with pytest.raises(ValueError, match="rows need columns 'text'"):
        next(DatasetStream(str(path), text_column="text").epoch_pairs(0))


def test_a_datasets_stream_is_shuffled_anew_each_epoch_and_parts_a_row_s_captions(tmp_path):
    """Read in file order, every epoch would repeat one order and a row's captions would share batches."""
    rows = [{"key": f"img{i}", "captions": [f"caption {i}{part}" for part in "abcde"]} for i in range(200)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    in_order = [(row["key"], text) for row in rows for text in row["captions"]]
    stream = DatasetStream(str(path), seed=3, shuffle_buffer=64)
    first, second = list(stream.epoch_pairs(0)), list(stream.epoch_pairs(1))
    assert sorted(first) == sorted(second) == sorted(in_order)  # every pair once
    assert first != second and first != in_order
    assert first == list(DatasetStream(str(path), seed=3, shuffle_buffer=64).epoch_pairs(0))  # replayed from its seed
    neighbours = sum(a[0] == b[0] for a, b in zip(first, first[1:]))
    assert neighbours < len(first) * 0.1, neighbours  # in file order: 4 of every 5


@pytest.fixture(scope="module")
def region_cache(shards, tmp_path_factory):
    folder, _ = shards
    cache_dir = tmp_path_factory.mktemp("cache") / "regions"
    table = WebDatasetPairSource(str(folder / "*.tar")).image_table()
    extract_regions(table, cache_dir, GeneratedExtractor(), key_column="key", progress=False)
    return cache_dir


def test_the_streaming_dataset_joins_regions_by_key_mixes_and_groups(tokenizer, shards, region_cache):
    folder, _ = shards
    cache = load_region_cache(region_cache)
    missing = {key: cache[key] for key in cache}
    dropped = sorted(missing)[0]
    del missing[dropped]  # one image without regions: its samples come as None
    dataset = StreamingPretrainingDataset(
        [WebDatasetStream(str(folder / "*.tar"), seed=0), WebDatasetStream(str(folder / "0000[01].tar"), seed=1)],
        [cache, missing],
        [3.0, 1.0],
        tokenizer,
        max_text_length=16,
        max_regions=6,
        group_size=4,
        pool_groups=5,
    )
    iterator = iter(dataset)
    samples = [next(iterator) for _ in range(400)]
    loaded = [sample for sample in samples if sample is not None]
    assert 0 < len(samples) - len(loaded) < 40
    for sample in loaded[:50]:
        stored = cache[sample["image_id"]]
        np.testing.assert_array_equal(sample["region_features"], stored["region_features"][:6])
    negatives = sum(sample["itm_labels"] == 0 for sample in loaded) / len(loaded)
    assert 0.35 < negatives < 0.65
    # Within each pool of 20, groups of 4 share their lengths' order: sorted within a group, longest first.
    first_group = [len(sample["region_features"]) for sample in samples[:4] if sample is not None]
    assert first_group == sorted(first_group, reverse=True)
    counts = Counter(sample["image_id"] for sample in loaded)
    assert len(counts) == 12


def test_a_recipe_trains_on_streaming_sources(shards, region_cache, tmp_path):
    folder, _ = shards
    stream = {"name": "web", "type": "webdataset", "streaming": True, "path": str(folder / "{00000..00003}.tar"),
              "region_cache": str(region_cache)}  # fmt: skip
    recipe = {
        "output_dir": str(tmp_path / "run"),
        "report_to": "none",
        "checkpointing_steps": 2,
        "model": {
            "tokenizer": "synthetic",
            "config": {
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "intermediate_size": 64,
                "region_feature_size": FEATURES,
                "num_object_classes": CLASSES,
                "max_regions": 8,
                "max_text_length": 20,
            },
        },  # fmt: skip
        "stages": [{"name": "stream", "sources": [stream], "max_steps": 3, "per_device_train_batch_size": 4}],
    }
    result = run_pretraining(recipe_from_dict(recipe))
    assert result["steps_per_stage"] == [3]
    final = tmp_path / "run" / "stage1-stream" / "final"
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["records_failed"] == 0 and state["records_seen"] == 12
    assert all(np.isfinite(entry["loss"]) for entry in state["history"])
    bad = yaml.safe_load(yaml.safe_dump(recipe))
    bad["stages"][0].update(max_steps=None, num_epochs=1)
    with pytest.raises(RecipeError, match="streaming sources needs max_steps"):
        recipe_from_dict(bad)
    bad["stages"][0]["sources"][0]["type"] = "manifest"
    with pytest.raises(RecipeError, match="streaming must be"):
        recipe_from_dict(bad)


def test_a_datasets_stream_reads_compressed_files_and_names_an_empty_or_unmatched_one(tmp_path):
    import gzip

    rows = [{"key": f"img{i}", "captions": [f"caption {i}"]} for i in range(3)]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    (tmp_path / "pairs.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    pairs = list(DatasetStream(str(tmp_path / "pairs.jsonl.gz"), shuffle_buffer=0).epoch_pairs(0))
    assert pairs == [(row["key"], row["captions"][0]) for row in rows]
    (tmp_path / "empty.jsonl").write_text("")
    # These escaped as datasets' "generator raised StopIteration", naming no file.
    for path in (tmp_path / "empty.jsonl", tmp_path / "none*.jsonl"):
        with pytest.raises(
            ValueError, match=rf"streaming source 'dataset': cannot open {re.escape(str(path))} \(.*no data"
        ):
            next(DatasetStream(str(path)).epoch_pairs(0))


def test_the_local_data_of_a_streamed_source_is_checked_when_the_recipe_is_read(shards, tmp_path):
    # Found only when its stage started, after the stages before it had trained.
    from imagebert_hf.training.recipe import check_source_paths

    folder, _ = shards
    warm = {"name": "warm", "type": "synthetic", "num_images": 8, "regions": "annotations"}
    regions = {"region_cache": str(tmp_path)}
    for source, message in (
        ({"type": "webdataset", "path": str(folder / "{00000..00003}.tarz")}, "webdataset shards not found"),
        ({"type": "hf_dataset", "path": str(tmp_path / "none*.jsonl")}, r"no file matches .*none\*\.jsonl"),
    ):
        recipe = recipe_from_dict({
            "output_dir": str(tmp_path / "run"),
            "model": {"tokenizer": "synthetic"},
            "stages": [
                {"name": "one", "max_steps": 1, "sources": [warm]},
                {"name": "two", "max_steps": 1, "sources": [{"name": "s", "streaming": True, **regions, **source}]},
            ],
        })  # fmt: skip
        with pytest.raises(RecipeError, match=rf"stages\[1\]\.sources\[0\]\.path: {message}"):
            check_source_paths(recipe)
    # A Hub id and a remote URL are left to the stream.
    hub = {"name": "s", "streaming": True, "type": "hf_dataset", "path": "org/captions", **regions}
    remote = {"name": "w", "streaming": True, "type": "webdataset", "path": "https://host/{000..009}.tar", **regions}
    check_source_paths(recipe_from_dict({
        "output_dir": str(tmp_path / "run"), "model": {"tokenizer": "synthetic"},
        "stages": [{"name": "one", "max_steps": 1, "sources": [hub, remote]}],
    }))  # fmt: skip


def test_a_recursive_glob_of_a_streams_data_files_is_resolved_as_the_stream_resolves_it(tmp_path):
    from imagebert_hf.training.recipe import check_source_paths

    nested = tmp_path / "data" / "part-a" / "2024"
    nested.mkdir(parents=True)
    (nested / "x.jsonl").write_text(json.dumps({"key": "img0", "captions": ["a cat"]}) + "\n")
    source = {"name": "s", "type": "hf_dataset", "streaming": True, "path": str(tmp_path / "data" / "**" / "*.jsonl"),
              "region_cache": str(tmp_path)}  # fmt: skip
    check_source_paths(recipe_from_dict({
        "output_dir": str(tmp_path / "run"), "model": {"tokenizer": "synthetic"},
        "stages": [{"name": "one", "max_steps": 1, "sources": [source]}],
    }))  # fmt: skip
    assert list(DatasetStream(source["path"], shuffle_buffer=0).epoch_pairs(0)) == [("img0", "a cat")]
