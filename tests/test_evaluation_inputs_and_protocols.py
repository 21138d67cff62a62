"""What an evaluation is given and what it claims: a pretraining checkpoint's untrained heads never rank a shortlist,
a tokenizer saved to pad on the left scores as one padding on the right, a corpus cache is reused only for the same
vocabulary and normalisation, protocol names only for the Karpathy test split, an image without regions ends the
run with one line naming it and why, `--dataset synthetic` evaluates what its flags say, an earlier run's model card
does not outlive its results, and captions shared by several images are counted where the results are."""

import hashlib
import json
import runpy
import sys

import pytest
import torch
from transformers import AutoTokenizer, BertTokenizer
from transformers.testing_utils import CaptureLogger

from imagebert_hf import ImageBERTForImageTextRetrieval
from imagebert_hf.data.retrieval_corpus import RetrievalCorpus, region_cache_key, tokenize_texts
from imagebert_hf.data.synthetic import make_synthetic_examples, make_synthetic_tokenizer, synthetic_vocabulary
from imagebert_hf.evaluation import full_ranking, zero_shot
from imagebert_hf.evaluation.full_ranking import (
    CorpusCacheError,
    CorpusRanking,
    EvaluationArguments,
    load_evaluation_corpus,
    protocols,
    run_retrieval_evaluation,
)
from imagebert_hf.evaluation.recall import retrieval_metrics, shared_caption_count
from imagebert_hf.evaluation.relation_swaps import relation_swap_accuracy, synthetic_swap_probes
from imagebert_hf.evaluation.zero_shot import manifest_retrieval_inputs
from imagebert_hf.models.imagebert import ImageBERTForPreTraining
from imagebert_hf.models.imagebert.region_batching import pad_region_records
from imagebert_hf.regions.cache_reader import load_region_cache

from .test_evaluate_retrieval import checkpoint  # noqa: F401 - fixture
from .test_region_cache_scale import FEATURES, GeneratedExtractor, build
from .testing_utils import PROJECT_ROOT


SCRIPT = PROJECT_ROOT / "examples" / "evaluate_retrieval.py"
CAPTIONS = ["a red circle", "a blue square", "a green cross", "an orange circle", "two yellow triangles"]


def _left_padding(tokenizer):
    """The same tokenizer, saved to pad on the left (`"padding_side": "left"` in its tokenizer_config.json)."""
    left = make_synthetic_tokenizer()
    left.padding_side = "left"
    assert left.get_vocab() == tokenizer.get_vocab()
    return left


def _run_script(monkeypatch, *flags) -> str:
    """`python examples/evaluate_retrieval.py FLAGS`, in this process; the line it ends with on a bad input."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *map(str, flags)])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    return str(stop.value.code)


@pytest.fixture(scope="module")
def pretraining_checkpoint(make_tiny_config, tokenizer, tmp_path_factory):
    """A pretraining checkpoint: the ITM head, no unimodal projection heads."""
    folder = tmp_path_factory.mktemp("pretraining")
    torch.manual_seed(0)
    ImageBERTForPreTraining(make_tiny_config(vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def region_folder(tmp_path_factory):
    """A region cache of `img00000`..`img00005`, whose `img00002` failed extraction."""
    folder = tmp_path_factory.mktemp("regions")
    build(folder, num_images=6, extractor=GeneratedExtractor(fail={b"image 2"}))
    return folder


@pytest.fixture(scope="module")
def region_checkpoint(make_tiny_config, tokenizer, tmp_path_factory):
    """A retrieval checkpoint whose regions are those of `region_folder`."""
    folder = tmp_path_factory.mktemp("region_checkpoint")
    torch.manual_seed(0)
    config = make_tiny_config(vocab_size=len(tokenizer), region_feature_size=FEATURES)
    ImageBERTForImageTextRetrieval(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _manifest(path, images, captions=None):
    captions = captions or {}
    lines = [
        {"image": image, "image_id": f"id{image[-1]}", "captions": captions.get(image, [CAPTIONS[int(image[-1]) % 5]])}
        for image in images
    ]
    path.write_text("".join(json.dumps({"split": "test", **line}) + "\n" for line in lines))
    return path


# ------------------------------------------------------------------------------------------------ untrained heads


def test_a_pretraining_checkpoint_refuses_a_shortlist_before_anything_is_written(
    pretraining_checkpoint, tmp_path, monkeypatch
):
    flags = {"model_name_or_path": str(pretraining_checkpoint), "dataset": "synthetic", "synthetic_images": 4}
    with pytest.raises(ValueError, match=r"--shortlist_k 3: .* has no trained projection heads \(cls.text_projection"):
        run_retrieval_evaluation(EvaluationArguments(**flags, shortlist_k=3, output_dir=str(tmp_path / "short")))
    assert not (tmp_path / "short").exists()
    line = _run_script(monkeypatch, *[f"--{k}={v}" for k, v in flags.items()], "--shortlist_k=3", "--output_dir=out")
    assert line.startswith("evaluate_retrieval: error: --shortlist_k 3: ") and "fine-tune it" in line, line

    # Zero-shot full ranking (the ITM head) stays what a pretraining checkpoint is evaluated with, and is named so
    # in results.json and the card.
    done = run_retrieval_evaluation(EvaluationArguments(**flags, output_dir=str(tmp_path / "full"), model_card=True))
    assert [(result["ranking"], result["evaluation"]) for result in done["results"]] == [("full", "zero-shot")]
    card = (tmp_path / "full" / "README.md").read_text()
    assert "evaluated zero-shot" in card and "retrieval losses" not in card


def test_a_fine_tuned_checkpoint_still_ranks_a_shortlist(checkpoint, tmp_path):  # noqa: F811
    model = full_ranking.load_retrieval_model(str(checkpoint))
    full_ranking.check_shortlist_heads(model, 3, str(checkpoint))  # its heads are in the checkpoint


# ------------------------------------------------------------------------------------------------ padding side


def test_texts_are_padded_on_the_right_whatever_the_tokenizer_says(tokenizer, make_tiny_config, tmp_path):
    left = _left_padding(tokenizer)
    texts = ["a red circle to the left of a blue square", "a cross"]
    assert left(texts, padding="max_length", max_length=12)["input_ids"][1][0] == left.pad_token_id
    right = tokenize_texts(tokenizer, texts, 12)
    for name, value in tokenize_texts(left, texts, 12).items():
        assert torch.equal(value, right[name]), name
    assert right["input_ids"][:, 0].tolist() == [tokenizer.cls_token_id] * 2

    # The evaluation corpus, and so every score, is the same with either tokenizer.
    config = make_tiny_config(vocab_size=len(tokenizer))
    args = EvaluationArguments(output_dir=str(tmp_path), dataset="synthetic", synthetic_images=4)
    corpora = [load_evaluation_corpus(args, side, config) for side in (tokenizer, left)]
    for name, value in corpora[0].text_inputs.items():
        assert torch.equal(value, corpora[1].text_inputs[name]), name


def test_zero_shot_and_relation_swaps_pad_on_the_right_too(tokenizer, region_folder, tmp_path):
    left = _left_padding(tokenizer)
    manifest = _manifest(tmp_path / "captions.jsonl", ["img00000", "img00001"], {"img00001": ["a very long caption"]})
    inputs = [manifest_retrieval_inputs(manifest, region_folder, side, "test")[0] for side in (tokenizer, left)]
    for name, value in inputs[0].items():
        assert torch.equal(value, inputs[1][name]), name

    seen = []

    def spy(model, text_inputs, region_inputs, images, captions, batch_size):
        seen.append(text_inputs)
        return torch.arange(len(images), dtype=torch.float32)

    examples = make_synthetic_examples(6, seed=0)
    probes = synthetic_swap_probes(examples)
    regions = pad_region_records([{"region_features": torch.ones(1, 4), "region_locations": torch.zeros(1, 5)}] * 6)
    for side in (tokenizer, left):
        relation_swap_accuracy(None, probes, side, regions, {"spy": spy}, max_text_length=20)
    for name, value in seen[0].items():
        assert torch.equal(value, seen[1][name]), name
    assert (seen[1]["input_ids"][:, 0] == tokenizer.cls_token_id).all()


# ------------------------------------------------------------------------------------------------ corpus cache


def test_a_corpus_cache_is_reused_only_for_the_same_vocabulary_and_normalisation(
    tokenizer, make_tiny_config, tmp_path
):
    words = synthetic_vocabulary()
    special, plain = [w for w in words if w.startswith("[")], [w for w in words if not w.startswith("[")]
    reordered = BertTokenizer(vocab={w: i for i, w in enumerate(special + plain[::-1])})
    cased = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=False)
    assert type(reordered) is type(cased) is type(tokenizer) and len(reordered) == len(cased) == len(tokenizer)

    config = make_tiny_config(vocab_size=len(tokenizer))
    args = EvaluationArguments(
        output_dir=str(tmp_path), dataset="synthetic", synthetic_images=4, corpus_cache=str(tmp_path / "c.st")
    )
    built = load_evaluation_corpus(args, tokenizer, config)
    for other in (reordered, cased):
        with pytest.raises(CorpusCacheError, match=r"built from other data or settings \(tokenizer_sha256: cache '"):
            load_evaluation_corpus(args, other, config)

    # The same tokenizer saved and read again is the same tokenizer: the cache is reused.
    tokenizer.save_pretrained(tmp_path / "tok")
    reused = load_evaluation_corpus(args, AutoTokenizer.from_pretrained(tmp_path / "tok"), config)
    assert torch.equal(reused.text_inputs["input_ids"], built.text_inputs["input_ids"])


# ------------------------------------------------------------------------------------------------ protocols


def test_protocol_names_only_for_the_karpathy_test_split():
    assert protocols("flickr30k", 1000, "test") == [("Flickr30k 1k", "1k", 1)]
    assert protocols("coco", 5000, "test") == [("MS-COCO 1k", "1k", 5), ("MS-COCO 5k", "5k", 1)]
    assert protocols("flickr30k", 1000, "val") == protocols("flickr30k", 1000, "train") == [("Flickr30k", None, 1)]
    assert protocols("coco", 5000, "val") == protocols("coco", 5000, "restval") == [("MS-COCO", None, 1)]
    assert protocols("manifest", 1000, "test") == [("manifest", None, 1)]
    # Fewer captions than the protocol's 5 make another gallery: no protocol's name for it.
    assert protocols("coco", 5000, "test", captions_per_image=1) == [("MS-COCO", None, 1)]
    assert protocols("flickr30k", 1000, "test", captions_per_image=4) == [("Flickr30k", None, 1)]
    assert protocols("flickr30k", 1000, "test", captions_per_image=5) == [("Flickr30k 1k", "1k", 1)]


@pytest.mark.parametrize("split", ["val", "train"])
def test_a_thousand_images_of_another_split_are_not_flickr30k_1k(checkpoint, tmp_path, monkeypatch, split):  # noqa: F811
    def thousand_images(args, tokenizer, config):
        return RetrievalCorpus([str(i) for i in range(1000)], [f"t{i}" for i in range(1000)], torch.arange(1000))

    def scored(model, corpus, *args, **kwargs):
        return CorpusRanking(torch.eye(corpus.num_images), corpus.text_to_image, 0.0)

    monkeypatch.setattr(full_ranking, "load_evaluation_corpus", thousand_images)
    monkeypatch.setattr(full_ranking, "rank_corpus", scored)
    monkeypatch.setattr(CorpusRanking, "plot", lambda self, *args, **kwargs: None)
    (tmp_path / "dataset_flickr30k.json").write_text('{"images": []}')
    args = EvaluationArguments(
        output_dir=str(tmp_path / "out"),
        model_name_or_path=str(checkpoint),
        dataset="flickr30k",
        karpathy_file=str(tmp_path / "dataset_flickr30k.json"),
        region_cache=str(tmp_path),
        split=split,
        model_card=True,
    )
    run_retrieval_evaluation(args)
    (result,) = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    named = (result["dataset_name"], result["dataset_config"], result["dataset_split"], result["evaluation"])
    assert named == ("Flickr30k", "1000 images x 1000 texts", split, "fine-tuned")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "1k" not in card and "Flickr30k (1000 images x 1000 texts," in card


def test_a_karpathy_file_of_another_dataset_is_refused_before_its_results_get_a_benchmark_name(tmp_path):
    # Karpathy's dataset_flickr8k.json has a 1,000-image test split: as --dataset flickr30k it would be "Flickr30k 1k".
    images = [{"filename": f"{i}.jpg", "split": "test", "sentences": [{"raw": "a dog"}]} for i in range(3)]
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps({"dataset": "flickr8k", "images": images}))
    with pytest.raises(ValueError, match=r"dataset_flickr8k.json is the Karpathy split file of 'flickr8k', not of "):
        full_ranking._split_records(
            EvaluationArguments(output_dir=str(tmp_path / "out"), dataset="flickr30k", karpathy_file=str(path)), None
        )
    from imagebert_hf.data.retrieval_corpus import load_karpathy_split

    assert len(load_karpathy_split(path, "test", dataset="flickr8k")) == len(load_karpathy_split(path, "test")) == 3


# ------------------------------------------------------------------------------------------------ missing regions


MISSING_REGIONS = [
    ("img00002", "has no regions: its extraction failed (generated failure, recorded for 'img00002')"),
    ("img00009", "is not in the region cache"),
]


def test_an_image_without_regions_is_named_with_the_reason_the_cache_records(
    tokenizer, make_tiny_config, region_folder, tmp_path
):
    cache = load_region_cache(region_folder)
    with pytest.raises(KeyError, match=r"image 'id2' has no regions: its extraction failed \(generated failure"):
        region_cache_key(cache, {"image_id": "id2", "manifest_image": "img00002", "captions": ["a"]})
    with pytest.raises(KeyError, match=r"image 'id9' is not in the region cache \(looked up as \['img00009'"):
        region_cache_key(cache, {"image_id": "id9", "manifest_image": "img00009", "captions": ["a"]})

    config = make_tiny_config(vocab_size=len(tokenizer), region_feature_size=FEATURES)
    for image, said in MISSING_REGIONS:
        manifest = _manifest(tmp_path / f"{image}.jsonl", ["img00000", image, "img00001"])
        for mapped in (False, True):
            args = EvaluationArguments(
                output_dir=str(tmp_path / "out"),
                manifest=str(manifest),
                region_cache=str(region_folder),
                memory_mapped=mapped,
            )
            with pytest.raises(ValueError) as refused:
                load_evaluation_corpus(args, tokenizer, config)
            message = str(refused.value)
            assert message.startswith(f"--region_cache {region_folder}: image 'id{image[-1]}' {said}"), message


def test_an_image_without_regions_ends_the_script_with_one_line(
    region_checkpoint, region_folder, tmp_path, monkeypatch
):
    manifest = _manifest(tmp_path / "captions.jsonl", ["img00000", "img00002"])
    line = _run_script(
        monkeypatch,
        *("--model_name_or_path", region_checkpoint, "--manifest", manifest, "--region_cache", region_folder),
        *("--output_dir", tmp_path / "out"),
    )
    assert line.startswith("evaluate_retrieval: error: --region_cache ") and "'id2' has no regions" in line, line
    assert "generated failure" in line and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ synthetic data


def test_synthetic_data_takes_max_images_and_refuses_another_split(tokenizer, make_tiny_config, tmp_path, monkeypatch):
    config = make_tiny_config(vocab_size=len(tokenizer))
    flags = {"output_dir": str(tmp_path), "dataset": "synthetic", "synthetic_images": 12}
    every = load_evaluation_corpus(EvaluationArguments(**flags), tokenizer, config)
    first = load_evaluation_corpus(EvaluationArguments(**flags, max_images=3), tokenizer, config)
    assert first.num_images == 3 and first.image_ids == every.image_ids[:3]
    assert first.texts == [text for text, image in zip(every.texts, every.text_to_image.tolist()) if image < 3]

    # results.json records the split, and this set is no other split than the one it is recorded as.
    model, out = tmp_path / "no-model", tmp_path / "out"
    with pytest.raises(ValueError, match=r"--split 'val': --dataset synthetic has one split, .* recorded as 'test'"):
        run_retrieval_evaluation(
            EvaluationArguments(**{**flags, "output_dir": str(out)}, model_name_or_path=str(model), split="val")
        )
    line = _run_script(
        monkeypatch, f"--model_name_or_path={model}", "--dataset=synthetic", "--split=train", f"--output_dir={out}"
    )
    assert line.startswith("evaluate_retrieval: error: --split 'train': --dataset synthetic has one split"), line
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ model card


def test_an_earlier_run_s_card_does_not_stay_beside_new_results(checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    flags = {"model_name_or_path": str(checkpoint), "dataset": "synthetic", "output_dir": str(out)}
    run_retrieval_evaluation(EvaluationArguments(**flags, synthetic_images=4, model_card=True))
    card = (out / "README.md").read_bytes()
    recorded = json.loads((out / "results.json").read_text())["model_card"]
    assert recorded == {"file": "README.md", "sha256": hashlib.sha256(card).hexdigest()}

    with CaptureLogger(full_ranking.logger) as captured:
        run_retrieval_evaluation(EvaluationArguments(**flags, synthetic_images=6))
    assert not (out / "README.md").exists() and "the model card of the earlier evaluation" in captured.out
    written = json.loads((out / "results.json").read_text())
    assert "model_card" not in written and written["results"][0]["num_images"] == 6

    # A README.md the script did not write, or a card edited since, is not the script's to delete.
    for text in ("# my notes on this folder\n", None):
        run_retrieval_evaluation(EvaluationArguments(**flags, synthetic_images=4, model_card=True))
        edited = text or (out / "README.md").read_text() + "\nEdited by hand.\n"
        (out / "README.md").write_text(edited)
        run_retrieval_evaluation(EvaluationArguments(**flags, synthetic_images=6))
        assert (out / "README.md").read_text() == edited


# ------------------------------------------------------------------------------------------------ shared captions


def test_shared_caption_count():
    texts = ["a cat", "a dog", "a cat", "a bird", "a dog", "a cow"]
    assert shared_caption_count(texts, [0, 0, 1, 1, 2, 3]) == 4  # "a cat" of 0 and 1, "a dog" of 0 and 2
    assert shared_caption_count(texts[:4], [0, 1, 0, 1]) == 0  # one image's caption twice is no tie
    # With folds, only images of one fold rank against each other (COCO 1k).
    assert shared_caption_count(texts, [0, 0, 1, 1, 2, 3], num_folds=2) == 2
    with pytest.raises(ValueError, match="texts has 6 entries and text_to_image 2"):
        shared_caption_count(texts, [0, 1])


def test_captions_shared_by_images_are_counted_in_the_results(region_checkpoint, region_folder, tokenizer, tmp_path):
    captions = {"img00000": ["a red circle", "a blue square"], "img00001": ["a red circle"], "img00003": ["a cow"]}
    manifest = _manifest(tmp_path / "captions.jsonl", ["img00000", "img00001", "img00003"], captions)
    # A perfect scorer, which scores a pair by whether the caption is one of the image's: still below 100.
    texts = [c for image in ("img00000", "img00001", "img00003") for c in captions[image]]
    owners = [[c in captions[image] for c in texts] for image in ("img00000", "img00001", "img00003")]
    assert retrieval_metrics(torch.tensor(owners, dtype=torch.float), [0, 0, 1, 2])["tr_r1"] < 100

    args = EvaluationArguments(
        output_dir=str(tmp_path / "out"),
        model_name_or_path=str(region_checkpoint),
        manifest=str(manifest),
        region_cache=str(region_folder),
        shortlist_k=2,
    )
    with CaptureLogger(full_ranking.logger) as captured:
        run_retrieval_evaluation(args)
    assert "2 of the 4 texts are, as the tokens the model reads, a caption of more than one image" in captured.out
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert [result["num_captions_shared_by_images"] for result in results] == [2, 2]

    with CaptureLogger(zero_shot.logger) as captured:
        manifest_retrieval_inputs(manifest, region_folder, tokenizer, "test")
    assert "2 of the 4 captions are also, as the tokens the model reads, a caption of another image" in captured.out


def test_split_all_keeps_every_line_of_a_manifest_whose_lines_name_none(tmp_path):
    """The bundled COCO manifest names no split: `--split all` evaluates it (or trains on it); another split is
    refused naming what the manifest holds."""
    from imagebert_hf.data.retrieval_corpus import ALL_SPLITS, load_manifest_records

    manifest = tmp_path / "captions.jsonl"
    lines = [{"image": "a.jpg", "captions": ["a dog"]}, {"image": "b.jpg", "captions": ["a cat"], "split": "dev"}]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [r["manifest_image"] for r in load_manifest_records(manifest, ALL_SPLITS)] == ["a.jpg", "b.jpg"]
    with pytest.raises(ValueError, match=r"has no record with split 'test': its lines' splits are \['dev'\] \(some "):
        load_manifest_records(manifest, "test")
    manifest.write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(ValueError, match=r"split 'test': its lines name no split; split 'all' keeps every line\.$"):
        load_manifest_records(manifest, "test")
