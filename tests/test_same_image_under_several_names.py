"""One picture under several names is one image: in pretraining (its lines pooled, never an ITM negative of itself)
and in the retrieval gallery (one item). Names are manifest keys, ids, path spellings (`./images/a.png`) and
byte-identical copies of a file, which the region cache stores as one row (it deduplicates by content)."""

import itertools
import json
import shutil

import pytest
from transformers.testing_utils import CaptureLogger

from imagebert_hf.data import pair_sources, retrieval_corpus
from imagebert_hf.data.pair_sources import (
    ManifestPairSource,
    PretrainingPairDataset,
    StreamingPairSource,
    StreamingPretrainingDataset,
    open_region_store,
)
from imagebert_hf.data.retrieval_corpus import (
    RetrievalCorpus,
    load_manifest_records,
    merge_duplicate_images,
    region_cache_lookup,
)
from imagebert_hf.data.synthetic import write_synthetic_manifest
from imagebert_hf.formats.manifest import ManifestError
from imagebert_hf.regions import extract_regions, load_region_cache


def _write_lines(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def copied_picture(tmp_path_factory, make_tiny_extractor):
    """Four synthetic pictures and a region cache of them, the first listed a second time as a byte-identical copy
    under another file name and id, the second a second time through `./`."""
    root = tmp_path_factory.mktemp("copied_picture")
    manifest = write_synthetic_manifest(root / "shapes", 4, seed=0, image_size=64)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    shutil.copy(manifest.parent / lines[0]["image"], manifest.parent / "images" / "copy_of_0.png")
    lines.append(
        {
            **lines[0],
            "image": "images/copy_of_0.png",
            "image_id": "copy-0",
            "captions": ["a red cross below a blue cross"],
        }
    )
    lines.append(
        {
            **lines[1],
            "image": "./" + lines[1]["image"],
            "image_id": "dot-1",
            "captions": ["a red cross to the left of a blue cross"],
        }
    )
    _write_lines(manifest, lines)
    extract_regions(manifest, root / "cache", make_tiny_extractor(), store_class_probs=False, progress=False)
    return manifest, root / "cache"


def test_a_copied_picture_is_never_an_itm_negative_of_itself(copied_picture, tokenizer):
    manifest, cache_folder = copied_picture
    store = open_region_store(cache_folder)
    source = ManifestPairSource(manifest)
    row = {key: store[key]["cache_key"] for key in source.image_keys()}
    assert len(set(row.values())) == 4 < len(row)  # the copy has a name of its own, and the original's row
    with CaptureLogger(pair_sources.logger) as captured:
        dataset = PretrainingPairDataset([source], [store], tokenizer, 16, 5, itm_negative_probability=1.0)
    negatives = same = 0
    for seed in range(1500):
        _, pair, text, region_key, label = dataset._plan(seed % len(dataset), seed)
        if label == 0 and not isinstance(text, str):
            negatives += 1
            same += row[source[text][0]] == row[region_key]
    assert negatives == 1500 and same == 0
    assert "1 image key(s) name the picture of another key (first: 'images/copy_of_0.png' is" in captured.out


def test_a_copied_picture_is_never_a_streamed_itm_negative_of_itself(copied_picture, tokenizer):
    manifest, cache_folder = copied_picture
    store = open_region_store(cache_folder)
    pairs = ManifestPairSource(manifest).pairs
    row = {key: store[key]["cache_key"] for key, _ in pairs}

    class Pairs(StreamingPairSource):
        name = "listed"

        def epoch_pairs(self, epoch):
            yield from pairs

    dataset = StreamingPretrainingDataset(
        [Pairs()], [store], [1.0], tokenizer, 16, 5, itm_negative_probability=1.0, negative_buffer=4
    )
    captions = {caption: key for key, caption in pairs}
    samples = list(itertools.islice(iter(dataset), 600))
    decoded = [tokenizer.decode(sample["input_ids"], skip_special_tokens=True) for sample in samples]
    negatives = [
        (captions[text], sample["image_id"]) for text, sample in zip(decoded, samples) if sample["itm_labels"] == 0
    ]
    assert len(negatives) > 400
    assert not [pair for pair in negatives if row[pair[0]] == row[pair[1]]]


def test_without_a_region_cache_negatives_compare_names_as_before(copied_picture, tokenizer):
    """A store that cannot tell pictures apart (a plain mapping) compares keys; where keys and pictures agree, the
    cache's rows give the very same draws, so data without copies trains exactly as it did."""
    manifest, cache_folder = copied_picture
    lines = [json.loads(line) for line in manifest.read_text().splitlines()][:4]
    plain = _write_lines(manifest.parent / "plain.jsonl", lines)
    cache = open_region_store(cache_folder)
    source = ManifestPairSource(plain)
    by_rows = PretrainingPairDataset([source], [cache], tokenizer, 16, 5)
    by_names = PretrainingPairDataset([source], [{key: cache[key] for key in source.image_keys()}], tokenizer, 16, 5)
    seeds = [(seed % len(source), seed) for seed in range(400)]
    assert [by_rows._plan(*s) for s in seeds] == [by_names._plan(*s) for s in seeds]


def test_one_cache_row_is_one_gallery_item_in_both_corpora(copied_picture, tokenizer):
    manifest, cache_folder = copied_picture
    cache = load_region_cache(cache_folder)
    records = load_manifest_records(manifest)
    with CaptureLogger(retrieval_corpus.logger) as captured:
        mapped = RetrievalCorpus.from_region_cache(records, cache, tokenizer, 16)
    assert "1 record(s) show the picture of an earlier record under another id or file (first: 'copy-0'" in (
        captured.out
    )
    assert "merged into 'synthetic-0-000000'" in captured.out
    stacked = RetrievalCorpus.from_records(records, tokenizer, region_cache_lookup(cache), 16)
    for corpus in (mapped, stacked):
        assert corpus.image_ids == [
            "synthetic-0-000000",
            "synthetic-0-000001",
            "synthetic-0-000002",
            "synthetic-0-000003",
        ]
        assert corpus.texts[2] == "a red cross below a blue cross" and corpus.text_to_image.tolist()[:3] == [0, 0, 0]
        assert "a red cross to the left of a blue cross" in corpus.texts
    assert mapped.text_to_image.tolist() == stacked.text_to_image.tolist()
    stacked_regions = stacked.region_inputs
    mapped_regions = mapped.region_inputs.batch(slice(None))
    for name, value in stacked_regions.items():
        assert (mapped_regions[name] == value).all(), name


@pytest.mark.parametrize("memory_mapped", [False, True])
def test_zero_shot_evaluation_ranks_the_gallery_of_full_ranking(copied_picture, tokenizer, memory_mapped):
    """`manifest_retrieval_inputs` (the real-data example, the ablations, the demo) merges a copied picture as the
    full-ranking corpus does: the copy's caption is the original's, not a tie against it."""
    from imagebert_hf.evaluation.zero_shot import manifest_retrieval_inputs

    manifest, cache_folder = copied_picture
    cache = load_region_cache(cache_folder)
    corpus = RetrievalCorpus.from_region_cache(load_manifest_records(manifest), cache, tokenizer, 16)
    text_inputs, regions, text_to_image = manifest_retrieval_inputs(
        manifest, cache, tokenizer, max_text_length=16, memory_mapped=memory_mapped
    )
    assert text_to_image == corpus.text_to_image.tolist()
    assert (len(regions) if memory_mapped else regions["region_features"].shape[0]) == corpus.num_images == 4
    assert text_inputs["input_ids"].shape[0] == corpus.num_texts


def test_lines_of_one_image_are_pooled_before_the_caption_cut(tmp_path):
    lines = [
        {"image": "images/a.jpg", "captions": ["a dog", "a cat"]},
        {"image": "images/b.jpg", "captions": ["x"]},
        {"image": "images/a.jpg", "captions": ["a  dog ", "a brown dog"]},
        {"image": "./images/a.jpg", "captions": ["a dog again"]},
        {"image": "images/c.jpg", "image_id": "c", "captions": ["c one"]},
        {"image": "images/c-small.jpg", "image_id": "c", "captions": ["c two"]},
    ]
    manifest = _write_lines(tmp_path / "captions.jsonl", lines)
    cut = ManifestPairSource(manifest, max_captions_per_image=1)
    assert cut.pairs == [("images/a.jpg", "a dog"), ("images/b.jpg", "x"), ("images/c.jpg", "c one")]
    with CaptureLogger(pair_sources.logger) as captured:
        source = ManifestPairSource(manifest)
    assert [caption for key, caption in source.pairs if key == "images/a.jpg"] == [
        "a dog",
        "a cat",
        "a brown dog",
        "a dog again",
    ]
    assert "3 line(s) repeat an image of an earlier line (first: " in captured.out
    assert f"{manifest}:3, image 'images/a.jpg', pooled with 'images/a.jpg'" in captured.out
    assert "1 repeated caption(s) dropped" in captured.out
    # The images are those evaluation ranks.
    evaluated = merge_duplicate_images(load_manifest_records(manifest))
    assert len(source.image_keys()) == len(evaluated) == 3


def test_a_line_without_the_key_field_names_its_file_and_line(tmp_path):
    lines = [{"image": "a.jpg", "image_id": "a", "captions": ["a"]}, {"image": "b.jpg", "captions": ["b"]}]
    manifest = _write_lines(tmp_path / "captions.jsonl", lines)
    with pytest.raises(ManifestError, match=rf"^{manifest}:2: no 'image_id' \(the source's key_field"):
        ManifestPairSource(manifest, key_field="image_id")
    lines[1]["key"] = {"id": 2}
    lines[0]["key"] = "a"
    _write_lines(manifest, lines)
    with pytest.raises(ManifestError, match=rf"^{manifest}:2: 'key' .* must be a non-empty string or an integer"):
        ManifestPairSource(manifest, key_field="key")


@pytest.mark.parametrize("key_field", ["image_id", "image"])
def test_an_integer_id_and_the_same_id_as_a_string_are_refused(tmp_path, key_field):
    lines = [
        {"image": "a.jpg", "image_id": 1, "captions": ["a"]},
        {"image": "b.jpg", "image_id": 2, "captions": ["b"]},
        {"image": "c.jpg", "image_id": "1", "captions": ["c"]},
    ]
    manifest = _write_lines(tmp_path / "captions.jsonl", lines)
    with pytest.raises(ManifestError, match=rf"^{manifest}:3: 'image_id' is '1' \(a string\), but {manifest}:1 gives"):
        ManifestPairSource(manifest, key_field=key_field)
    lines[2]["image_id"] = "3"
    _write_lines(manifest, lines)
    source = ManifestPairSource(manifest, key_field=key_field)
    assert len(source.image_keys()) == 3
    if key_field == "image_id":
        assert source.image_keys() == ["1", "2", "3"]


def test_evaluation_refuses_an_integer_id_and_the_same_id_as_a_string_within_its_split(tmp_path):
    from imagebert_hf.data.retrieval_corpus import load_manifest_records

    lines = [
        {"image": "a.jpg", "image_id": 1, "captions": ["a"], "split": "test"},
        {"image": "b.jpg", "image_id": "1", "captions": ["b"], "split": "train"},
        {"image": "c.jpg", "coco_id": "1", "captions": ["c"], "split": "test"},
    ]
    manifest = _write_lines(tmp_path / "captions.jsonl", lines)
    # Another split's line is never in the same gallery.
    assert [record["image_id"] for record in load_manifest_records(manifest, split="train")] == ["1"]
    with pytest.raises(ManifestError, match=rf"^{manifest}:3: 'coco_id' is '1' \(a string\), but {manifest}:1 gives"):
        load_manifest_records(manifest, split="test")
