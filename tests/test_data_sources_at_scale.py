"""Pair sources built on every process at every stage start read web-scale data without touching what they do not
need: a `datasets` source keys its rows without copying the image bytes, a manifest source pools the lines of one
image while reading them (its peak memory stays near what it keeps), and merging the records of one picture copies
each caption list once."""

import json
import tracemalloc

import datasets
import numpy as np
import pyarrow as pa
import pytest

from imagebert_hf.data import retrieval_corpus
from imagebert_hf.data.pair_sources import DatasetPairSource, ManifestPairSource
from imagebert_hf.data.retrieval_corpus import SameImageGroups, merge_duplicate_images, same_image_groups


IMAGE_BYTES = 20_000  # per image; 200 images: 4 MB, were they copied


@pytest.fixture(autouse=True)
def quiet_datasets():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def arrow_peak(function):
    """What `function` returns, and the most memory Arrow held for it at once (its allocations only)."""
    pool, default = pa.proxy_memory_pool(pa.default_memory_pool()), pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        result = function()
    finally:
        pa.set_memory_pool(default)
    return result, pool.max_memory()


def saved_dataset(folder, columns, features, num_shards=3):
    """A dataset written with `save_to_disk` in several Arrow files, read back memory-mapped, as training reads it."""
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(folder), num_shards=num_shards)
    return datasets.load_from_disk(str(folder))


@pytest.fixture(scope="module")
def image_dataset(tmp_path_factory):
    blob = np.random.default_rng(0).integers(0, 256, IMAGE_BYTES, dtype=np.uint8).tobytes()
    paths = [f"images/{number}.jpg" if number % 10 else None for number in range(200)]  # a tenth without a path
    return saved_dataset(
        tmp_path_factory.mktemp("saved") / "images",
        {"image": [{"bytes": blob, "path": path} for path in paths], "captions": [f"photo {n}" for n in range(200)]},
        datasets.Features({"image": datasets.Image(), "captions": datasets.Value("string")}),
    )


# ----------------------------------------------------------------------------------------- dataset source keys


@pytest.mark.parametrize("rows", ["all", "shuffled subset"])
def test_a_dataset_source_keys_its_rows_by_image_path_without_copying_the_image_bytes(image_dataset, rows):
    dataset = image_dataset if rows == "all" else image_dataset.shuffle(seed=0).select(range(150))
    undecoded = dataset.cast_column("image", datasets.Image(decode=False))
    expected = list(
        dict.fromkeys(cell["path"] or f"row-{row}" for row, cell in enumerate(undecoded["image"]))
    )  # the region cache's rule (dataset_row_key), read the slow way

    source, peak = arrow_peak(lambda: DatasetPairSource(dataset, text_column="captions"))

    assert source.image_keys() == expected
    assert len(source) == len(dataset)
    # The paths are a few kB; a copy of the image column holds every image's bytes.
    assert peak < IMAGE_BYTES, f"keying {len(dataset)} rows made Arrow hold {peak} bytes at once"


def test_a_column_of_raw_image_bytes_keys_rows_by_index_without_reading_them(tmp_path):
    blob = bytes(IMAGE_BYTES)
    dataset = saved_dataset(
        tmp_path / "raw",
        {"image": [blob] * 200, "captions": [f"photo {n}" for n in range(200)]},
        datasets.Features({"image": datasets.Value("binary"), "captions": datasets.Value("string")}),
    )

    source, peak = arrow_peak(lambda: DatasetPairSource(dataset, text_column="captions"))

    assert source.image_keys() == [f"row-{row}" for row in range(200)]
    assert peak < IMAGE_BYTES, f"keying 200 rows of raw bytes made Arrow hold {peak} bytes at once"


# ------------------------------------------------------------------------------------------ manifest source memory


def write_web_manifest(path, num_lines, repeat_every=0):
    """A CC3M-like manifest: one image per line with url, license and size fields the source does not need;
    with `repeat_every`, every such line lists the image of the line before it again (a re-crawled URL)."""
    with open(path, "w") as handle:
        for number in range(num_lines):
            image = number - 1 if repeat_every and number % repeat_every == repeat_every - 1 else number
            line = {
                "image": f"images/{image // 1000:05d}/{image:09d}.jpg",
                "captions": [f"a photo of thing number {number} on a table"],
                "url": f"https://example.com/some/long/path/to/image/{image:09d}.jpg",
                "license": "cc-by",
                "split": "train",
                "width": 640,
                "height": 480,
            }
            handle.write(json.dumps(line) + "\n")
    return path


@pytest.mark.parametrize("repeat_every", [0, 5], ids=["distinct images", "a fifth repeat an image"])
def test_a_manifest_source_peaks_near_what_it_keeps(tmp_path, repeat_every):
    manifest = write_web_manifest(tmp_path / "captions.jsonl", 4_000, repeat_every)

    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        source = ManifestPairSource(manifest)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    expected_images = 4_000 - (4_000 // repeat_every if repeat_every else 0)
    assert len(source.image_keys()) == expected_images
    assert len(source) == 4_000  # pooled lines bring their own (different) captions
    kept, peak = kept - start, peak - start
    # Keeping every parsed line (its extra fields included) until all are read costs about three times what the
    # source keeps; pooling while reading needs only the names of each image on top of it.
    assert peak < 1.6 * kept, f"building the source peaked at {peak / 1e6:.1f} MB to keep {kept / 1e6:.1f} MB"


def test_pooling_one_item_at_a_time_numbers_groups_as_the_whole_list_does():
    names = [
        [("key", "a"), ("file", "x")],
        [("key", "b"), None],
        [("id", "1"), ("file", "x")],  # the first image, by file
        [("key", "c"), ("id", "2")],
        [("id", "2"), ("key", "b")],  # shares names with the second and the fourth: joins the second
        [],
    ]
    grouping = SameImageGroups()

    assert [grouping.add(item) for item in names] == same_image_groups(names) == [0, 1, 0, 2, 1, 3]
    assert grouping.count == 4


# ------------------------------------------------------------------------------------- merging one picture's records


def test_merging_the_records_of_one_picture_copies_each_caption_list_once(monkeypatch):
    copied = []

    def counting_list(items=()):
        items = [*items]
        copied.append(len(items))
        return items

    # The module's lists are made by this counting copy; a copy of the growing list at each merge is quadratic.
    monkeypatch.setattr(retrieval_corpus, "list", counting_list, raising=False)
    records = [{"image_id": f"id{n}", "image": "placeholder.jpg", "captions": [f"caption {n}"]} for n in range(2_000)]
    originals = [dict(record, captions=[*record["captions"]]) for record in records]

    merged = merge_duplicate_images(records)

    assert len(merged) == 1
    assert merged[0]["captions"] == [f"caption {n}" for n in range(2_000)]
    assert records == originals  # the records given are left as they were
    assert sum(copied) <= 2 * len(records), f"merging 2,000 records copied {sum(copied):,} captions"


def _bytes_read() -> int | None:
    """Bytes this process has read through system calls so far (Linux), cached or not."""
    try:
        with open("/proc/self/io") as stats:
            return next(int(line.split()[1]) for line in stats if line.startswith("rchar"))
    except (OSError, StopIteration):
        return None


def test_local_webdataset_shards_are_listed_without_reading_their_images(tmp_path):
    """Pretraining reads regions from the cache: listing a corpus's captions must not read its image bytes (about
    0.5 TB for 10M web images, in every process, at every stage start and resume)."""
    import io
    import tarfile

    from imagebert_hf.data.pair_sources import WebDatasetPairSource, WebDatasetStream

    rng = np.random.default_rng(0)
    images = {}
    for shard in range(2):
        with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as tar:
            for item in range(20):
                key = f"{shard}{item:03d}"
                images[key] = rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()
                for extension, data in (("jpg", images[key]), ("txt", f"caption {key}".encode())):
                    member = tarfile.TarInfo(f"{key}.{extension}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    total = sum(path.stat().st_size for path in tmp_path.glob("*.tar"))
    before = _bytes_read()
    if before is None:
        pytest.skip("needs /proc/self/io (Linux) to count the bytes read")
    source = WebDatasetPairSource(str(tmp_path / "*.tar"))
    listed = _bytes_read() - before
    assert sorted(source.pairs) == sorted((key, f"caption {key}") for key in images)
    before = _bytes_read()
    streamed = sorted(WebDatasetStream(str(tmp_path / "*.tar"), shuffle_shards=False).epoch_pairs(0))
    assert streamed == sorted(source.pairs) and _bytes_read() - before < total / 10
    assert listed < total / 10, f"listing read {listed} of the shards' {total} bytes"
    assert source.image_bytes("1007") == images["1007"]  # the images are there when asked for


def test_a_dataset_source_builds_its_row_index_only_for_open_image():
    """Training reads regions, never images: the index from each key to its rows (about 110 MB per million rows, in
    every process and DataLoader worker) is built by the first `open_image`, and finds pooled rows as before."""
    import contextlib

    from PIL import Image

    keys = [f"img{row // 2:06d}" for row in range(200_000)]  # two rows (two captions) per image
    dataset = datasets.Dataset.from_dict(
        {"key": keys, "image": [None] * len(keys), "captions": [f"caption {row}" for row in range(len(keys))]}
    )
    tracemalloc.start()
    source = DatasetPairSource(dataset, text_column="captions", id_column="key")
    made = tracemalloc.get_traced_memory()[0]
    with contextlib.suppress(AttributeError):  # the image cell is null: the index is built, the image not read
        source.open_image("img000000")
    opened = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(source) == 200_000
    assert opened - made > 5_000_000, f"the first open_image added {opened - made} bytes: the index was built before"

    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    small = datasets.Dataset.from_dict(
        {"key": ["a", "a", "b"], "image": [Image.fromarray(pixels)] * 3, "captions": ["x", "y", "z"]}
    )
    assert DatasetPairSource(small, text_column="captions", id_column="key").open_image("a").size == (4, 4)
