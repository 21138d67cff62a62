"""Which image a gallery item is, and when two scores tie: a corpus cache is not reused once a manifest line points
at another image file, a result is named after a standard protocol only for a gallery of that size, ties within
float32 noise count against the query whatever the batch size, and one image file under two ids is one gallery item
in full-ranking and zero-shot evaluation alike."""

import json

import numpy as np
import pytest
import torch
from transformers.testing_utils import CaptureLogger

from imagebert_hf import ImageBERTForImageTextRetrieval
from imagebert_hf.data import retrieval_corpus
from imagebert_hf.data.retrieval_corpus import RetrievalCorpus, merge_duplicate_images, region_cache_lookup
from imagebert_hf.evaluation import relation_swaps
from imagebert_hf.evaluation.full_ranking import (
    CorpusCacheError,
    EvaluationArguments,
    load_evaluation_corpus,
    protocols,
    run_retrieval_evaluation,
)
from imagebert_hf.evaluation.recall import TIE_ATOL, TIE_RTOL, retrieval_metrics, retrieval_ranks
from imagebert_hf.evaluation.zero_shot import manifest_retrieval_inputs
from imagebert_hf.models.imagebert.retrieval_index import score_all_pairs
from imagebert_hf.regions.cache_reader import load_region_cache

from .test_region_cache_scale import FEATURES, build


CAPTIONS = ["a red circle", "a blue square", "a green cross", "an orange circle", "two yellow triangles"]
CAPTIONS += ["a blue circle", "a red square", "a green circle"]


@pytest.fixture(scope="module")
def region_folder(tmp_path_factory):
    """A region cache of 8 images `img00000`..`img00007`, each with its own regions."""
    folder = tmp_path_factory.mktemp("regions")
    build(folder, num_images=8)
    return folder


@pytest.fixture(scope="module")
def config(make_tiny_config, tokenizer):
    return make_tiny_config(vocab_size=len(tokenizer), region_feature_size=FEATURES)


def _write_manifest(path, lines):
    path.write_text("".join(json.dumps({"split": "test", **line}) + "\n" for line in lines))
    return path


def test_a_corpus_cache_is_not_reused_once_a_line_points_at_another_image(tmp_path, region_folder, tokenizer, config):
    manifest = tmp_path / "captions.jsonl"
    flags = {
        "output_dir": str(tmp_path / "out"),
        "manifest": str(manifest),
        "region_cache": str(region_folder),
        "corpus_cache": str(tmp_path / "corpus.safetensors"),
    }
    lines = [{"image": f"img{i:05d}", "image_id": f"id{i}", "captions": [CAPTIONS[i]]} for i in range(3)]
    _write_manifest(manifest, lines)
    load_evaluation_corpus(EvaluationArguments(**flags), tokenizer, config)

    # The same ids and captions; the first line now names another image, whose regions differ.
    _write_manifest(manifest, [{**lines[0], "image": "img00003"}, *lines[1:]])
    with pytest.raises(CorpusCacheError, match=r"built from other data or settings \(images_sha256: cache '"):
        load_evaluation_corpus(EvaluationArguments(**flags), tokenizer, config)
    (tmp_path / "corpus.safetensors").unlink()
    rebuilt = load_evaluation_corpus(EvaluationArguments(**flags), tokenizer, config)
    fresh = load_evaluation_corpus(EvaluationArguments(**{**flags, "corpus_cache": None}), tokenizer, config)
    assert torch.equal(rebuilt.region_inputs["region_features"], fresh.region_inputs["region_features"])
    # And the rebuilt cache is reused by the next run.
    reused = load_evaluation_corpus(EvaluationArguments(**flags), tokenizer, config)
    assert torch.equal(reused.region_inputs["region_features"], fresh.region_inputs["region_features"])


def test_a_protocol_name_only_for_a_gallery_of_its_size(tmp_path, region_folder, tokenizer, config):
    assert protocols("flickr30k", 1000) == [("Flickr30k 1k", "1k", 1)]
    assert protocols("flickr30k", 3) == [("Flickr30k", None, 1)]
    assert protocols("coco", 5000) == [("MS-COCO 1k", "1k", 5), ("MS-COCO 5k", "5k", 1)]
    assert protocols("coco", 10000) == protocols("coco", 1000) == [("MS-COCO", None, 1)]

    checkpoint = tmp_path / "checkpoint"
    torch.manual_seed(0)
    ImageBERTForImageTextRetrieval(config).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    images = [
        {
            "filename": f"img{i:05d}",
            "imgid": i,
            "split": "test",
            "sentences": [{"raw": c} for c in CAPTIONS[i : i + 2]],
        }
        for i in range(6)
    ]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    args = EvaluationArguments(
        output_dir=str(tmp_path / "out"),
        model_name_or_path=str(checkpoint),
        dataset="flickr30k",
        karpathy_file=str(tmp_path / "dataset_flickr30k.json"),
        image_root=str(tmp_path),
        region_cache=str(region_folder),
        max_images=3,
        shortlist_k=2,
        model_card=True,
        cpu=True,
    )
    run_retrieval_evaluation(args)
    full, shortlist = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert full["dataset_name"] == "Flickr30k" and full["dataset_config"] == "3 images x 6 texts"
    for result in (full, shortlist):
        assert result["num_images"] == 3 and result["num_texts"] == 6
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Flickr30k" in card and "1k" not in card


def test_scores_within_float32_noise_of_the_positive_tie_against_the_query():
    assert (relation_swaps.TIE_RTOL, relation_swaps.TIE_ATOL) == (TIE_RTOL, TIE_ATOL) == (1e-6, 1e-9)
    # Image 1 is image 0 again, scored a few float32 units lower in another batch.
    noisy = np.float32(0.75) - np.float32(6e-8)
    scores = np.array([[0.75, 0.2, 0.1], [noisy, 0.9, 0.1], [0.1, 0.2, 0.3]], dtype=np.float32)
    tr_ranks, ir_ranks = retrieval_ranks(scores, [0, 1, 2])
    assert ir_ranks.tolist() == [1, 0, 0]  # text 0: image 1 ties with its image
    assert tr_ranks.tolist() == [0, 0, 0]
    exact = scores.copy()
    exact[1, 0] = 0.75
    assert retrieval_ranks(exact, [0, 1, 2])[1].tolist() == [1, 0, 0]
    # A real difference (1e-4 of the score) is no tie; neither is a score just below the tolerance.
    for lower in (0.75 - 1e-4, 0.75 - 2 * (TIE_ATOL + TIE_RTOL * 0.75)):
        apart = scores.astype(np.float64)
        apart[1, 0] = lower
        assert retrieval_ranks(apart, [0, 1, 2])[1].tolist() == [0, 0, 0]
    # Text queries: a caption scored a hair below the image's best one by another image's caption.
    tr_ranks, _ = retrieval_ranks(np.array([[0.5, 0.5 - 1e-8], [0.1, 0.2]]), [0, 1])
    assert tr_ranks.tolist() == [1, 0]
    # The shortlist's matrices (each direction its own) follow the same rule.
    metrics = retrieval_metrics(exact, [0, 1, 2], ir_scores=scores)
    assert metrics["ir_r1"] == pytest.approx(200 / 3)


def test_recall_does_not_change_with_the_batch_size_of_a_duplicate_image(region_folder, tokenizer, config, one_thread):
    # Image 3 twice (kept apart: the regions are aligned with the records): its two rows score within float32
    # noise of each other, bit-equal or not depending on the batches they were scored in.
    records = [{"image_id": f"img{i:05d}", "captions": [CAPTIONS[i]]} for i in range(8)]
    lookup = region_cache_lookup(load_region_cache(region_folder))
    regions = [lookup(record) for record in records] + [lookup(records[3])]
    records.append({"image_id": "img00003-again", "captions": ["a yellow square"]})
    corpus = RetrievalCorpus.from_records(records, tokenizer, regions, 44, config.max_regions)
    torch.manual_seed(2)
    model = ImageBERTForImageTextRetrieval(config).eval()
    ranks = set()
    for batch_size in (1, 2, 3, 4, 5, 6, 7, 8, 32):
        scores = score_all_pairs(model, corpus.text_inputs, corpus.region_inputs, batch_size=batch_size)
        tr_ranks, ir_ranks = retrieval_ranks(scores, corpus.text_to_image)
        ranks.add((tuple(tr_ranks.tolist()), tuple(ir_ranks.tolist())))
    assert len(ranks) == 1, ranks


def test_one_image_file_under_two_ids_is_one_gallery_item_in_both_evaluations(
    tmp_path, region_folder, tokenizer, config
):
    lines = [
        {"image": "img00000", "image_id": "A", "captions": ["a red circle", "a red circle and a blue square"]},
        {"image": "img00001", "image_id": "B", "captions": ["a green cross"]},
        {"image": "img00000", "image_id": "C", "captions": ["two yellow triangles"]},
        {"image": "img00002", "image_id": "D", "captions": ["an orange circle"]},
    ]
    manifest = _write_manifest(tmp_path / "captions.jsonl", lines)
    args = EvaluationArguments(
        output_dir=str(tmp_path / "out"), manifest=str(manifest), region_cache=str(region_folder)
    )
    with CaptureLogger(retrieval_corpus.logger) as captured:
        corpus = load_evaluation_corpus(args, tokenizer, config)
    assert "1 record(s) repeat an image listed earlier (first: 'C' (image " in captured.out
    assert "img00000, merged into 'A'))" in captured.out
    assert corpus.image_ids == ["A", "B", "D"] and corpus.text_to_image.tolist() == [0, 0, 0, 1, 2]

    text_inputs, region_inputs, text_to_image = manifest_retrieval_inputs(
        manifest, region_folder, tokenizer, "test", max_regions=config.max_regions
    )
    assert text_to_image == corpus.text_to_image.tolist()
    for name, value in region_inputs.items():
        assert torch.equal(value, corpus.region_inputs[name][:, : value.shape[1]]), name

    # The rule itself: by id or by file, into the first record; a record without a file merges by id only.
    merged = merge_duplicate_images(
        [
            {"image_id": "1", "image": "x/a.jpg", "captions": ["a"]},
            {"image_id": "2", "manifest_image": "b.jpg", "captions": ["b"]},
            {"image_id": "3", "image": "x/a.jpg", "captions": ["c"]},
            {"image_id": "2", "captions": ["d"]},
            {"image_id": "4", "captions": ["e"]},
        ]
    )
    assert [(r["image_id"], r["captions"]) for r in merged] == [("1", ["a", "c"]), ("2", ["b", "d"]), ("4", ["e"])]


def test_a_repeated_line_adds_no_caption_its_image_holds_already(caplog):
    """A manifest that lists a line twice (a concatenation, a re-export) pools that image's captions: the repeats
    are kept once (spacing aside), or each would count as two texts and split its credit between identical ones.
    The first record's own captions stay as they are: they are a protocol's texts."""
    import logging

    records = [
        {"image_id": "1", "image": "a.jpg", "captions": ["a dog", "a dog", "a brown dog"]},
        {"image_id": "2", "image": "b.jpg", "captions": ["a cat"]},
        {"image_id": "1", "image": "a.jpg", "captions": ["a  brown dog", "a dog on grass", "a dog"]},
        {"image_id": "3", "image": "b.jpg", "captions": ["a cat", "a cat  "]},
    ]
    with caplog.at_level(logging.WARNING):
        merged = merge_duplicate_images(records)
    assert [(r["image_id"], r["captions"]) for r in merged] == [
        ("1", ["a dog", "a dog", "a brown dog", "a dog on grass"]),
        ("2", ["a cat"]),
    ]
    assert "2 record(s) repeat an image" in caplog.text and "(4 caption(s) the image held already" in caplog.text
    assert records[0]["captions"] == ["a dog", "a dog", "a brown dog"]  # the input is left as it was
