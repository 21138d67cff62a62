"""Hostile input at evaluation: arguments out of range (`max_images=0` would report R@1 100), a corpus cache that is
not one, is damaged or was built for another split, a split listing an image twice, Karpathy files that are not, and
model card metrics that are NaN, out of [0, 100] or a dataset name given as a string of letters."""

import json
import math

import pytest
import torch
from transformers.testing_utils import CaptureLogger

from imagebert_hf.data.retrieval_corpus import (
    RetrievalCorpus,
    load_karpathy_split,
    load_manifest_records,
    merge_duplicate_images,
)
from imagebert_hf.evaluation.full_ranking import (
    CorpusCacheError,
    EvaluationArguments,
    load_corpus_cache,
    load_evaluation_corpus,
    save_corpus_cache,
)
from imagebert_hf.evaluation.hub import build_model_card, eval_results_from_run


# ------------------------------------------------------------------------------------------------ arguments

ARGUMENTS = [
    ({"max_images": 0}, "--max_images must be a positive integer or unset, got 0"),
    ({"max_images": -4}, "--max_images must be a positive integer or unset, got -4"),
    ({"max_images": True}, "--max_images must be a positive integer or unset, got True"),
    ({"max_images": "10"}, "--max_images must be a positive integer or unset, got '10'"),
    ({"shortlist_k": 0}, "--shortlist_k must be a positive integer or unset, got 0"),
    ({"batch_size": 0}, "--batch_size must be a positive integer, got 0"),
    ({"batch_size": 2.5}, "--batch_size must be a positive integer, got 2.5"),
    ({"synthetic_images": 0}, "--synthetic_images must be a positive integer, got 0"),
    ({"dataset": "imagenet"}, "--dataset must be one of"),
    ({"output_dir": ""}, "--output_dir must be a non-empty path"),
]


@pytest.mark.parametrize(("changes", "message"), ARGUMENTS, ids=[m[:45] for _, m in ARGUMENTS])
def test_evaluation_arguments_out_of_range_are_named(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        EvaluationArguments(**{"output_dir": str(tmp_path), **changes})


@pytest.mark.parametrize("max_images", [0, -1, 1.5, "3"])
def test_split_readers_refuse_max_images_that_is_not_a_count(tmp_path, max_images):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "a.jpg", "captions": ["a cat"]}) + "\n")
    with pytest.raises(ValueError, match=r"max_images must be a positive integer or None \(every image\), got"):
        load_manifest_records(manifest, max_images=max_images)
    with pytest.raises(ValueError, match=r"max_images must be a positive integer or None"):
        load_karpathy_split(manifest, max_images=max_images)


# ------------------------------------------------------------------------------------------------ Karpathy files

KARPATHY = [
    ("missing", None, FileNotFoundError, r"karpathy_file .*dataset.json does not exist"),
    ("not json", "{oops", ValueError, r"dataset.json is not a Karpathy split file: not JSON"),
    ("a list", "[]", ValueError, r"is not a Karpathy split file: it has no 'images' list"),
    ("images not a list", '{"images": 3}', ValueError, r"it has no 'images' list"),
    (
        "no filename",
        '{"images": [{"split": "test", "sentences": [{"raw": "a"}]}]}',
        ValueError,
        r"images\[0\] has no 'filename' string",
    ),
    (
        "sentences strings",
        '{"images": [{"split": "test", "filename": "a.jpg", "sentences": ["a cat"]}]}',
        ValueError,
        r"images\[0\] \(a.jpg\): 'sentences' must be a list of \{'raw': str\}",
    ),
    (
        "no test image",
        '{"images": [{"split": "train", "filename": "a.jpg", "sentences": [{"raw": "a"}]}]}',
        ValueError,
        r"has no image in split\(s\) \('test',\)",
    ),
]


@pytest.mark.parametrize(("text", "error", "message"), [c[1:] for c in KARPATHY], ids=[c[0] for c in KARPATHY])
def test_a_karpathy_file_that_is_not_one_is_named(tmp_path, text, error, message):
    path = tmp_path / "dataset.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(error, match=message):
        load_karpathy_split(path, "test")


# ------------------------------------------------------------------------------------------------ duplicate images


def test_an_image_listed_twice_is_one_gallery_item_with_a_warning():
    from imagebert_hf.data import retrieval_corpus

    records = [
        {"image_id": "1", "captions": ["a cat"]},
        {"image_id": "2", "captions": ["a dog"]},
        {"image_id": "1", "captions": ["a cat on a mat"]},
    ]
    with CaptureLogger(retrieval_corpus.logger) as captured:
        corpus = RetrievalCorpus.from_records(records)
    assert "1 record(s) repeat an image listed earlier (first: '1'); their captions were merged" in captured.out
    assert corpus.image_ids == ["1", "2"] and corpus.texts == ["a cat", "a cat on a mat", "a dog"]
    assert corpus.text_to_image.tolist() == [0, 0, 1]
    assert records[0]["captions"] == ["a cat"]  # the caller's records are left as they were


def test_an_image_listed_twice_with_aligned_regions_is_refused():
    records = [{"image_id": "1", "captions": ["a"]}, {"image_id": "1", "captions": ["b"]}]
    regions = [{"region_features": torch.ones(1, 4), "region_locations": torch.zeros(1, 5)}] * 2
    with pytest.raises(ValueError, match=r"image_id '1' is listed more than once.*merge_duplicate_images"):
        RetrievalCorpus.from_records(records, regions=regions)


@pytest.mark.parametrize("record", ["a.jpg", {"image_id": "1"}, {"captions": ["a"]}], ids=["str", "no caps", "no id"])
def test_a_record_that_is_not_one_is_named(record):
    with pytest.raises(ValueError, match=r"record 0 must be a dict with 'image_id' and 'captions'"):
        merge_duplicate_images([record])


# ------------------------------------------------------------------------------------------------ corpus cache


@pytest.fixture(scope="module")
def config(make_tiny_config, tokenizer):
    return make_tiny_config(vocab_size=len(tokenizer))


def _args(tmp_path, **changes):
    arguments = {"output_dir": str(tmp_path), "dataset": "synthetic", "synthetic_images": 4}
    return EvaluationArguments(**{**arguments, "corpus_cache": str(tmp_path / "c.st"), **changes})


def test_a_corpus_cache_round_trips_and_is_reused(tmp_path, tokenizer, config):
    built = load_evaluation_corpus(_args(tmp_path), tokenizer, config)
    reused = load_evaluation_corpus(_args(tmp_path), tokenizer, config)
    assert reused.image_ids == built.image_ids and reused.texts == built.texts
    for key, value in built.region_inputs.items():
        assert torch.equal(reused.region_inputs[key], value), key
    assert torch.equal(reused.text_inputs["input_ids"], built.text_inputs["input_ids"])


def test_a_corpus_cache_of_another_split_is_refused(tmp_path, tokenizer, config):
    load_evaluation_corpus(_args(tmp_path), tokenizer, config)
    with pytest.raises(CorpusCacheError, match=r"was built from other data or settings \(num_images: cache 4, this"):
        load_evaluation_corpus(_args(tmp_path, synthetic_images=5), tokenizer, config)
    with pytest.raises(CorpusCacheError, match=r"split: cache 'test', this run 'val'.*another --corpus_cache"):
        load_evaluation_corpus(_args(tmp_path, split="val"), tokenizer, config)


def test_a_corpus_cache_built_with_other_limits_is_refused(tmp_path, tokenizer, config, make_tiny_config):
    load_evaluation_corpus(_args(tmp_path), tokenizer, config)
    other = make_tiny_config(vocab_size=len(tokenizer), max_regions=config.max_regions + 1)
    with pytest.raises(CorpusCacheError, match=r"max_regions: cache \d+, this run \d+"):
        load_evaluation_corpus(_args(tmp_path), tokenizer, other)


CACHE_FILES = [
    ("empty", b"", r"not a corpus cache written by this version.*got 0 bytes"),
    ("text", b"tokenized texts and regions\n", r"not a corpus cache written by this version"),
    ("zip", b"PK\x03\x04" + bytes(60), r"not a corpus cache.*Older .pt caches were pickles"),
    ("huge header", (10**12).to_bytes(8, "little") + b"{}", r"not a corpus cache written by this version"),
    ("bad header json", (5).to_bytes(8, "little") + b"{oops", r"is damaged \((JSONDecodeError|SafetensorError)"),
]


@pytest.mark.parametrize(("data", "message"), [c[1:] for c in CACHE_FILES], ids=[c[0] for c in CACHE_FILES])
def test_a_corpus_cache_that_is_not_one_is_named(tmp_path, data, message):
    (tmp_path / "c.st").write_bytes(data)
    with pytest.raises(CorpusCacheError, match=message):
        load_corpus_cache(tmp_path / "c.st", {"dataset": "synthetic"})


def _tiny_corpus():
    corpus = RetrievalCorpus.from_records([{"image_id": "1", "captions": ["a"]}])
    corpus.region_inputs = {"region_features": torch.ones(1, 2, 4)}
    return corpus


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"format": "something-else/9"}, r"has format 'something-else/9', expected 'imagebert-corpus-cache/1'"),
        ({"fingerprint": "{oops"}, r"is damaged \(JSONDecodeError"),
        ({"texts": None}, r"is damaged \((KeyError|TypeError)"),
    ],
    ids=["format", "fingerprint", "texts"],
)
def test_a_corpus_cache_with_damaged_metadata_is_named(tmp_path, metadata, message):
    from safetensors.torch import load, save

    fingerprint = {"num_images": 1}
    save_corpus_cache(tmp_path / "c.st", _tiny_corpus(), fingerprint)
    data = (tmp_path / "c.st").read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    header.update(metadata)
    header = {k: v for k, v in header.items() if v is not None}
    (tmp_path / "c.st").write_bytes(save(load(data), metadata=header))
    with pytest.raises(CorpusCacheError, match=message):
        load_corpus_cache(tmp_path / "c.st", fingerprint)


def test_a_corpus_cache_written_before_a_setting_was_recorded_is_read_at_that_settings_old_value(tmp_path):
    # A cache of the previous version records no `captions_per_image`: it was built with all the captions, as a run
    # without the flag asks, and was refused with an empty list of differences.
    from safetensors.torch import load, save

    fingerprint = {"num_images": 1, "captions_per_image": None, "max_regions": 2, "region_feature_size": 4}
    corpus = RetrievalCorpus.from_records([{"image_id": "1", "captions": ["a"]}])
    corpus.region_inputs = {"region_features": torch.ones(1, 2, 4), "region_locations": torch.full((1, 2, 5), 0.5)}
    save_corpus_cache(tmp_path / "c.st", corpus, fingerprint)
    data = (tmp_path / "c.st").read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    header["fingerprint"] = json.dumps(
        {key: value for key, value in fingerprint.items() if key != "captions_per_image"}
    )
    (tmp_path / "c.st").write_bytes(save(load(data), metadata=header))
    assert load_corpus_cache(tmp_path / "c.st", fingerprint).num_images == 1
    with pytest.raises(CorpusCacheError, match=r"\(captions_per_image: cache None, this run 2\)"):
        load_corpus_cache(tmp_path / "c.st", {**fingerprint, "captions_per_image": 2})


def test_a_corpus_cache_whose_ids_disagree_with_its_tensors_is_named(tmp_path):
    corpus = _tiny_corpus()
    corpus.texts = ["a", "b"]  # two captions, one text_to_image entry
    save_corpus_cache(tmp_path / "c.st", corpus, {"num_images": 1})
    with pytest.raises(CorpusCacheError, match=r"is damaged \(its ids, captions and tensors disagree\)"):
        load_corpus_cache(tmp_path / "c.st", {"num_images": 1})


# ------------------------------------------------------------------------------------------------ model cards


def _result(**changes):
    result = {"dataset_name": "MS-COCO 5k", "dataset_type": "coco", "metrics": {"tr_r1": 50.0, "rsum": 400.0}}
    result.update(changes)
    return result


CARD_RESULTS = [
    ("nan", _result(metrics={"tr_r1": math.nan}), r"metric tr_r1 must be a finite number, got nan"),
    ("inf", _result(metrics={"ir_r5": math.inf}), r"metric ir_r5 must be a finite number, got inf"),
    ("250", _result(metrics={"tr_r1": 250.0}), r"metric tr_r1 is 250.0, outside \[0, 100\]"),
    ("negative", _result(metrics={"ir_r10": -1}), r"metric ir_r10 is -1, outside \[0, 100\]"),
    ("rsum 700", _result(metrics={"rsum": 700}), r"metric rsum is 700, outside \[0, 600\]"),
    ("string metric", _result(metrics={"tr_r1": "50"}), r"metric tr_r1 must be a finite number, got '50'"),
    ("bool metric", _result(metrics={"tr_r1": True}), r"metric tr_r1 must be a finite number, got True"),
    ("unknown metric", _result(metrics={"r@1": 50}), r"has unknown metrics \['r@1'\]"),
    ("empty metrics", _result(metrics={}), r"metrics must be a non-empty dict"),
    ("metrics list", _result(metrics=[50.0]), r"metrics must be a non-empty dict"),
    ("empty name", _result(dataset_name=""), r"dataset_name must be a non-empty string, got ''"),
    ("name a number", _result(dataset_name=5), r"dataset_name must be a non-empty string, got 5"),
    ("type a list", _result(dataset_type=["coco"]), r"dataset_type must be a non-empty string, got \['coco'\]"),
    ("split blank", _result(dataset_split="  "), r"dataset_split must be a non-empty string"),
    ("no metrics", {"dataset_name": "x", "dataset_type": "y"}, r"has no 'metrics'"),
    ("a string", "MS-COCO R@1 50", r"evaluation result 0 must be a dict, got str"),
]


@pytest.mark.parametrize(("result", "message"), [c[1:] for c in CARD_RESULTS], ids=[c[0] for c in CARD_RESULTS])
def test_a_model_card_refuses_a_result_it_would_misreport(result, message):
    with pytest.raises((ValueError, TypeError), match=rf"evaluation result 0.*{message}|{message}"):
        build_model_card([result])


@pytest.mark.parametrize("results", ["results.json", {"results": []}, 3], ids=["a string", "a dict", "a number"])
def test_model_card_results_must_be_a_list(results):
    with pytest.raises(TypeError, match=r"results must be a list of evaluation results \(dicts\), got"):
        eval_results_from_run(results)


def test_a_dataset_name_given_as_a_string_is_one_dataset_not_letters():
    card = build_model_card([_result()], datasets="coco")
    assert card.data.datasets == ["coco"]


@pytest.mark.parametrize(
    ("datasets", "message"),
    [
        ([""], r"datasets must hold non-empty strings, got ''"),
        (["coco", 3], r"got 3 in \['coco', 3\]"),
        ([], "non-empty"),
    ],
    ids=["empty name", "a number", "empty list"],
)
def test_bad_dataset_names_are_named(datasets, message):
    with pytest.raises(ValueError, match=message):
        build_model_card([_result()], datasets=datasets)


@pytest.mark.parametrize("model_id", ["", "   ", None, 5])
def test_a_model_id_that_is_not_a_name_is_refused(model_id):
    with pytest.raises(ValueError, match=r"model_id must be a non-empty name on one line, got"):
        build_model_card([_result()], model_id=model_id)


def test_zero_shot_inputs_merge_an_image_listed_twice(tmp_path, tokenizer):
    from imagebert_hf.data import retrieval_corpus
    from imagebert_hf.evaluation.zero_shot import manifest_retrieval_inputs

    lines = [("a.jpg", "a cat"), ("b.jpg", "a dog"), ("a.jpg", "a cat on a mat")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"image": i, "captions": [c]}) + "\n" for i, c in lines))
    regions = {
        name: {"region_features": torch.ones(2, 4).numpy(), "region_locations": torch.zeros(2, 5).numpy()}
        for name in ("a.jpg", "b.jpg")
    }
    with CaptureLogger(retrieval_corpus.logger) as captured:
        text_inputs, region_inputs, text_to_image = manifest_retrieval_inputs(tmp_path / "m.jsonl", regions, tokenizer)
    assert "repeat an image listed earlier (first: 'a.jpg')" in captured.out
    assert text_to_image == [0, 0, 1] and region_inputs["region_features"].shape[0] == 2
    assert text_inputs["input_ids"].shape[0] == 3
