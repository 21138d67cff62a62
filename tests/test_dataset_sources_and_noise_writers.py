"""A `datasets` pair source and the region cache key its rows alike, a saved `DatasetDict` is read by split, and
the noisy manifest writers read manifests as the package's manifest reader does."""

import json

import datasets
import pytest
from PIL import Image

from imagebert_hf.data.pair_sources import DatasetPairSource, PretrainingPairDataset, open_region_store
from imagebert_hf.data.synthetic import make_synthetic_dataset
from imagebert_hf.data.web_noise import corrupted_captions, write_noisy_manifest, write_web_noisy_manifest
from imagebert_hf.formats.manifest import ManifestError, read_manifest
from imagebert_hf.regions.cache_reader import load_region_cache
from imagebert_hf.regions.cache_writer import _dataset_items, dataset_row_key, extract_regions
from imagebert_hf.regions.image_hashes import DatasetImage
from imagebert_hf.training.pretraining import build_source
from imagebert_hf.training.recipe import SourceSpec


def extract(dataset, folder, make_tiny_extractor, **kwargs):
    extractor = make_tiny_extractor(grid_sizes=[1])
    extract_regions(dataset, folder, extractor, store_class_probs=False, progress=False, **kwargs)
    return folder


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for number, colour in enumerate(("red", "green", "blue")):
        path = folder / f"{number}.png"
        Image.new("RGB", (40, 32), colour).save(path)
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------------------------------------ default keys


@pytest.mark.parametrize(
    ("cell", "key"),
    [
        ("images/a.jpg", "images/a.jpg"),
        ({"bytes": b"...", "path": "images/b.jpg"}, "images/b.jpg"),
        ({"bytes": b"...", "path": None}, "row-4"),
        ({"bytes": b"...", "path": ""}, "row-4"),
        (None, "row-4"),
    ],
    ids=["path string", "image with path", "image without path", "blank path", "no image"],
)
def test_a_row_without_a_key_column_is_keyed_by_its_image_path_else_its_index(cell, key):
    assert dataset_row_key(cell, 4) == key


def test_a_dataset_source_with_its_defaults_finds_the_regions_extracted_with_the_defaults(
    tmp_path, make_tiny_extractor, tokenizer
):
    dataset = make_synthetic_dataset(4, seed=0, image_size=64).remove_columns(["image_id"])  # bytes, no paths
    dataset.save_to_disk(tmp_path / "saved")
    cache = extract(dataset, tmp_path / "cache", make_tiny_extractor)
    source = DatasetPairSource(str(tmp_path / "saved"), name="hf")
    assert source.image_keys() == load_region_cache(cache).keys() == ["row-0", "row-1", "row-2", "row-3"]
    source.check_region_store(open_region_store(cache))
    data = PretrainingPairDataset([source], [open_region_store(cache)], tokenizer, 16, 5)
    samples = data.__getitems__([(index, index) for index in range(len(data))])
    assert len(samples) == 8 and all(sample is not None for sample in samples)


def test_a_dataset_of_image_files_is_keyed_by_their_paths_on_both_sides(tmp_path, image_files, make_tiny_extractor):
    dataset = datasets.Dataset.from_dict(
        {"image": image_files, "captions": [["a red box"], ["a green box"], ["a blue box"]]}
    ).cast_column("image", datasets.Image())
    cache = extract(dataset, tmp_path / "cache", make_tiny_extractor)
    source = DatasetPairSource(dataset.select([2, 0, 1]), name="files")
    assert source.image_keys() == [image_files[2], image_files[0], image_files[1]]
    assert set(source.image_keys()) == set(load_region_cache(cache).keys())
    assert source.open_image(image_files[2]).getpixel((0, 0)) == (0, 0, 255)
    # A row without an image: the same index key on both sides.
    plain = datasets.Dataset.from_dict({"image": [image_files[0], None], "captions": ["a red box", "nothing"]})
    items = _dataset_items(plain, "image", None, None, "xyxy")
    assert [item["key"] for item in items] == DatasetPairSource(plain).image_keys() == [image_files[0], "row-1"]
    # Stored in their own files (`save_to_disk` embeds the image, keeping its file name), the rows are listed from
    # the column without reading an image: the file's name keys its row, a row without an image stays one.
    plain.cast_column("image", datasets.Image()).save_to_disk(tmp_path / "plain")
    stored = datasets.load_from_disk(tmp_path / "plain")
    items = _dataset_items(stored, "image", None, None, "xyxy")
    assert [item["key"] for item in items] == DatasetPairSource(stored).image_keys() == ["0.png", "row-1"]
    assert isinstance(items[0]["image"], DatasetImage) and items[1]["image"] is None


@pytest.fixture(scope="module")
def keyed_cache(tmp_path_factory, make_tiny_extractor):
    """A dataset with a `key` column and two caches of it: keyed by that column, and with the default keys."""
    folder = tmp_path_factory.mktemp("keyed")
    dataset = make_synthetic_dataset(3, seed=1, image_size=64).rename_column("image_id", "key")
    dataset.save_to_disk(folder / "saved")
    extract(dataset, folder / "by_key", make_tiny_extractor, key_column="key")
    extract(dataset, folder / "by_default", make_tiny_extractor)
    return folder, dataset["key"]


def test_a_source_keyed_otherwise_than_its_cache_is_refused_naming_id_column(keyed_cache):
    folder, keys = keyed_cache
    source = DatasetPairSource(str(folder / "saved"), name="hf")
    with pytest.raises(
        ValueError,
        match=r"dataset source 'hf' \(.*saved\): none of its first 3 image keys \['row-0', 'row-1', 'row-2'\] is in "
        rf"the region cache .*by_key, whose keys look like \[{keys[0]!r}, .*; the source is keyed by image path, "
        r"else row-<index> \(no id_column\); if the cache was built with a key_column, set id_column to that column",
    ):
        source.check_region_store(open_region_store(folder / "by_key"))
    keyed = DatasetPairSource(str(folder / "saved"), id_column="key", name="hf")
    keyed.check_region_store(open_region_store(folder / "by_key"))
    with pytest.raises(
        ValueError,
        match=r"whose keys look like \['row-0', .*keyed by its column 'key' \(id_column\); set id_column to the "
        r"column the cache was built with \(extract_regions' key_column\), or leave it unset",
    ):
        keyed.check_region_store(open_region_store(folder / "by_default"))


def test_one_known_key_is_enough_and_failed_images_count_as_known():
    source = DatasetPairSource(datasets.Dataset.from_dict({"captions": ["a", "b", "c"]}), name="plain")
    source.check_region_store({"row-2": {}})

    class FailedStore(dict):
        errors = {"row-0": "unreadable image"}

    source.check_region_store(FailedStore())
    with pytest.raises(
        ValueError, match=r"none of its first 3 image keys .* is in its region store, whose keys look "
    ):
        source.check_region_store({"0": {}, "1": {}})


def test_a_recipe_source_is_checked_against_its_region_cache(keyed_cache):
    folder, _ = keyed_cache
    spec = SourceSpec(name="hf", type="hf_dataset", path=str(folder / "saved"), region_cache=str(folder / "by_key"))
    with pytest.raises(ValueError, match=r"dataset source 'hf' .* set id_column to that column"):
        build_source(spec, 256)
    spec.id_column = "key"
    source, store = build_source(spec, 256)
    assert all(key in store for key in source.image_keys())


# ------------------------------------------------------------------------------------------------ DatasetDict


@pytest.fixture
def saved_splits(tmp_path):
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"key": ["a", "b"], "captions": [["a dog"], ["a cat"]]}),
            "test": datasets.Dataset.from_dict({"key": ["c"], "captions": [["a cow"]]}),
        }
    )
    splits.save_to_disk(tmp_path / "splits")
    return tmp_path / "splits"


def test_a_saved_dataset_dict_is_read_by_split(saved_splits):
    assert DatasetPairSource(saved_splits, id_column="key", split="train").pairs == [("a", "a dog"), ("b", "a cat")]
    assert DatasetPairSource(saved_splits, split="test").pairs == [("row-0", "a cow")]
    in_memory = datasets.load_from_disk(str(saved_splits))
    assert DatasetPairSource(in_memory, id_column="key", split="test").pairs == [("c", "a cow")]


@pytest.mark.parametrize(
    ("split", "given"), [(None, "no split was given"), ("validation", "split 'validation' is not one of them")]
)
def test_a_dataset_dict_without_a_known_split_names_its_splits(saved_splits, split, given):
    with pytest.raises(
        ValueError,
        match=rf"dataset source 'dd' \(.*splits\) is a DatasetDict of the splits \['train', 'test'\] and {given}; "
        "set split to the one to read",
    ):
        DatasetPairSource(saved_splits, id_column="key", name="dd", split=split)


def test_a_missing_column_is_named_with_the_split(saved_splits):
    with pytest.raises(ValueError, match=r"split 'train': the dataset has no column 'text'; its columns are \['key'"):
        DatasetPairSource(saved_splits, text_column="text", split="train")


def test_the_recipe_split_picks_the_split_of_a_saved_dataset_dict(saved_splits):
    spec = SourceSpec(name="hf", type="hf_dataset", path=str(saved_splits), id_column="key", region_cache="missing")
    with pytest.raises(FileNotFoundError, match="region cache missing of source 'hf' does not exist"):
        build_source(spec, 256)  # the default split, train, was read
    spec.split = "dev"
    with pytest.raises(ValueError, match=r"split 'dev' is not one of them"):
        build_source(spec, 256)


# ------------------------------------------------------------------------------------------------ noisy manifests


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


LINES = [
    {
        "image": "images/a.jpg",
        "caption": "a dog runs on the grass",
        "split": "train",
        "width": 64,
        "objects": [{"label": "dog", "class_id": 3, "bbox_xywh": [1, 2, 10, 20]}],
        "image_id": 7,
    },
    {"image": "images/b.jpg", "captions": ["a cat sleeps", "a cat on a mat"], "split": "train"},
    {"image": "images/c.jpg", "caption": "a cow", "split": "test"},
]


@pytest.mark.parametrize("writer", ["web", "corrupted"])
def test_a_manifest_with_one_caption_per_line_gets_a_noisy_copy_that_keeps_its_fields(tmp_path, writer):
    manifest = write_lines(tmp_path / "captions.jsonl", LINES)
    output = tmp_path / "noisy.jsonl"
    if writer == "web":
        counts = write_web_noisy_manifest(manifest, output, seed=1, splits=["train"])
        assert sum(counts.values()) == 3
    else:
        write_noisy_manifest(manifest, output, corrupted_captions(0.5, seed=1), splits=["train"])
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [sorted(line) for line in written] == [
        ["captions", "image", "image_id", "objects", "split", "width"],
        ["captions", "image", "split"],
    ]
    for line, clean in zip(written, LINES):
        assert {k: v for k, v in line.items() if k != "captions"} == {
            k: v for k, v in clean.items() if k not in ("caption", "captions")
        }
    assert [len(line["captions"]) for line in written] == [1, 2]
    assert [record.image for record in read_manifest(output)] == ["images/a.jpg", "images/b.jpg"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", r"captions\.jsonl:2: invalid JSON"),
        (json.dumps({"image": "images/x.jpg", "captions": []}), r"captions\.jsonl:2: 'captions' must be a non-empty"),
        (json.dumps({"image": "images/x.jpg"}), r"captions\.jsonl:2: no 'captions' \(or 'caption'\) key"),
    ],
    ids=["not json", "empty captions", "no captions"],
)
def test_a_malformed_manifest_line_is_named_before_anything_is_written(tmp_path, bad, message):
    manifest = write_lines(tmp_path / "captions.jsonl", [LINES[0], bad, LINES[1]])
    output = write_lines(tmp_path / "noisy.jsonl", ["earlier output"])
    with pytest.raises(ManifestError, match=message):
        write_web_noisy_manifest(manifest, output)
    with pytest.raises(ManifestError, match=message):
        write_noisy_manifest(manifest, output, corrupted_captions(0.5))
    assert output.read_text() == "earlier output\n"
