"""Fine-tuning (`examples/run_retrieval.py`) and evaluation (`examples/evaluate_retrieval.py`) read their inputs
alike: a Karpathy record finds its regions whatever spelling of its image path the cache was keyed with (and never
the regions of another picture), both take `--allow_outside_root`, both rank the same captions of a split, and
captions the tokenizer reads as one query are counted as shared by their images."""

import dataclasses
import json
import os
import shutil

import pytest
import torch
from PIL import Image
from transformers.testing_utils import CaptureLogger

from imagebert_hf import ImageBERTForImageTextRetrieval
from imagebert_hf.data.retrieval_corpus import load_karpathy_split, region_cache_key
from imagebert_hf.evaluation import full_ranking, zero_shot
from imagebert_hf.evaluation.full_ranking import EvaluationArguments, load_evaluation_corpus, run_retrieval_evaluation
from imagebert_hf.evaluation.zero_shot import manifest_retrieval_inputs
from imagebert_hf.regions import extract_regions, load_region_cache
from imagebert_hf.training.arguments import RetrievalArguments
from imagebert_hf.training.retrieval_finetuning import (
    RUN_ARGS_FILE,
    WORKING_DIR_KEY,
    build_corpora,
    check_resumed_flags,
)

from .test_run_level_inputs import run_script


# Tiny models gain nothing from threads, and extra threads crawl when the CI cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "yellow": (200, 200, 30)}
SHAPES = ["circle", "square", "triangle", "cross"]


def _captions(image: int, count: int) -> list[str]:
    """`count` captions of picture `image`, none of them a caption of another picture."""
    colour = list(COLOURS)[image]
    return [("there is " if n >= len(SHAPES) else "") + f"a {colour} {SHAPES[n % len(SHAPES)]}" for n in range(count)]


EXTRACTION = {"store_class_probs": False, "progress": False}
OUTSIDE = {**EXTRACTION, "allow_outside_root": True}


def _picture(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)


def _write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _karpathy(path, captions_per_image, filepath="val2014"):
    images = [
        {
            "filepath": filepath,
            "filename": f"img{i}.png",
            "split": "test",
            "cocoid": i,
            "sentences": [{"raw": caption} for caption in _captions(i, count)],
        }
        for i, count in enumerate(captions_per_image)
    ]
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory, make_tiny_extractor, make_tiny_config, tokenizer):
    """Four pictures under `coco/val2014/`, a region cache keyed by their paths relative to `coco/` and one keyed by
    their absolute paths, a Karpathy file of them, and a retrieval checkpoint that takes the caches' regions."""
    root = tmp_path_factory.mktemp("consistency")
    for i, colour in enumerate(COLOURS.values()):
        _picture(root / "coco" / "val2014" / f"img{i}.png", colour)
    relative = [{"image": f"val2014/img{i}.png", "captions": ["x"]} for i in range(4)]
    absolute = [{"image": str(root / "coco" / line["image"]), "captions": ["x"]} for line in relative]
    extractor = make_tiny_extractor()
    extract_regions(
        _write_lines(root / "coco" / "regions.jsonl", relative), root / "relative", extractor, **EXTRACTION
    )
    extract_regions(_write_lines(root / "absolute.jsonl", absolute), root / "absolute", extractor, **OUTSIDE)
    torch.manual_seed(0)
    config = make_tiny_config(vocab_size=len(tokenizer), region_feature_size=extractor.region_feature_size)
    ImageBERTForImageTextRetrieval(config).save_pretrained(root / "checkpoint")
    tokenizer.save_pretrained(root / "checkpoint")
    os.symlink(root / "coco", root / "link")
    return root


# ------------------------------------------------------------------------------------------ path spellings


@pytest.mark.parametrize("keyed", ["relative", "absolute"])
def test_a_karpathy_record_finds_its_regions_under_any_spelling_of_its_image_root(data, keyed, monkeypatch):
    monkeypatch.chdir(data)
    cache = load_region_cache(data / keyed)
    written = {"relative": "val2014/img{}.png", "absolute": f"{data}/coco/val2014/img{{}}.png"}[keyed]
    karpathy = _karpathy(data / "dataset_coco.json", [1, 1, 1, 1])
    roots = [str(data / "coco"), "coco", "./coco", "coco/../coco", f"{data}/coco/", str(data / "link"), "link"]
    for root in roots:
        records = load_karpathy_split(karpathy, "test", image_root=root)
        keys = [region_cache_key(cache, record) for record in records]
        assert keys == [written.format(i) for i in range(4)], root


def test_another_picture_under_the_same_folder_and_file_name_never_takes_the_regions(data, tmp_path):
    # The same folder and file names, other pictures: in neither cache, whatever it is keyed by. (A record whose
    # `filepath/filename` is a key as written takes it, as a manifest line does: here the relative keys are only
    # the trailing part of the records' paths.)
    karpathy = _karpathy(tmp_path / "dataset_coco.json", [1, 1, 1, 1], filepath="other/val2014")
    for i, colour in enumerate(reversed(COLOURS.values())):
        _picture(tmp_path / "other" / "val2014" / f"img{i}.png", colour)
    for keyed in ("relative", "absolute"):
        cache = load_region_cache(data / keyed)
        for record in load_karpathy_split(karpathy, "test", image_root=tmp_path):
            with pytest.raises(KeyError, match=rf"image '{record['image_id']}' is not in the region cache"):
                region_cache_key(cache, record)
    # A byte-identical copy under another folder is the picture a cache keyed by relative paths holds.
    shutil.copytree(data / "coco", tmp_path / "copy")
    cache = load_region_cache(data / "relative")
    karpathy = _karpathy(tmp_path / "dataset_coco.json", [1, 1, 1, 1], filepath="copy/val2014")
    records = load_karpathy_split(karpathy, "test", image_root=tmp_path)
    assert [region_cache_key(cache, record) for record in records] == [f"val2014/img{i}.png" for i in range(4)]


def test_a_key_through_a_symlink_retargeted_since_the_extraction_never_gives_the_other_pictures(
    data, make_tiny_extractor, tmp_path
):
    os.symlink(data / "coco", tmp_path / "current")
    lines = [{"image": str(tmp_path / "current" / "val2014" / f"img{i}.png"), "captions": ["x"]} for i in range(4)]
    extract_regions(_write_lines(tmp_path / "m.jsonl", lines), tmp_path / "cache", make_tiny_extractor(), **OUTSIDE)
    cache = load_region_cache(tmp_path / "cache")
    karpathy = _karpathy(tmp_path / "dataset_coco.json", [1, 1, 1, 1])
    records = load_karpathy_split(karpathy, "test", image_root=data / "coco")
    assert [region_cache_key(cache, record) for record in records] == [line["image"] for line in lines]
    # The link now names other pictures: the cache's keys name them too, but its regions are of the earlier ones.
    for i, colour in enumerate(reversed(COLOURS.values())):
        _picture(tmp_path / "other" / "val2014" / f"img{i}.png", colour)
    (tmp_path / "current").unlink()
    os.symlink(tmp_path / "other", tmp_path / "current")
    cache = load_region_cache(tmp_path / "cache")
    for record in load_karpathy_split(karpathy, "test", image_root=tmp_path / "other"):
        with pytest.raises(KeyError, match=rf"image '{record['image_id']}' is not in the region cache"):
            region_cache_key(cache, record)


class _CountedHashes:
    """Counts the image files `region_cache_key` reads to compare a picture with the one a cache key holds."""

    def __init__(self, monkeypatch):
        from imagebert_hf.data import retrieval_corpus

        self.count, hashing = 0, retrieval_corpus.image_content_hash

        def counted(*args, **kwargs):
            self.count += 1
            return hashing(*args, **kwargs)

        monkeypatch.setattr(retrieval_corpus, "image_content_hash", counted)


@pytest.fixture(scope="module")
def unconfirmed(tmp_path_factory, make_tiny_extractor):
    """A region cache of one manifest in `set_a/`: `images/00001.png` (relative key), `val/images/00001.png` (its
    file missing: the failure is recorded), `<root>/root/x.png` and `<root>/current/y.png` (absolute keys, `current`
    a symlink to `pictures/`); `y.png` is removed after the extraction (a cache-only run), and `root/link` is a
    symlink to `other/deep/`, so that `root/link/../x.png` opens `other/x.png`, another picture."""
    root = tmp_path_factory.mktemp("unconfirmed")
    _picture(root / "set_a" / "images" / "00001.png", COLOURS["red"])
    _picture(root / "root" / "x.png", COLOURS["green"])
    _picture(root / "other" / "x.png", COLOURS["blue"])
    _picture(root / "pictures" / "y.png", COLOURS["yellow"])
    (root / "other" / "deep").mkdir()
    os.symlink(root / "other" / "deep", root / "root" / "link")
    os.symlink(root / "pictures", root / "current")
    lines = ["images/00001.png", "val/images/00001.png", str(root / "root" / "x.png"), str(root / "current" / "y.png")]
    manifest = _write_lines(root / "set_a" / "m.jsonl", [{"image": line, "captions": ["x"]} for line in lines])
    extract_regions(manifest, root / "cache", make_tiny_extractor(), **OUTSIDE)
    (root / "pictures" / "y.png").unlink()
    return root


def test_a_match_on_trailing_folders_or_through_a_symlink_needs_the_picture_read_and_confirmed(unconfirmed):
    cache = load_region_cache(unconfirmed / "cache")
    # Another dataset's `val/images/00001.png`, not on this machine: `images/00001.png` is only the trailing part
    # of its path, and nothing says the cache's picture is that one.
    record = {"image_id": "b1", "image": str(unconfirmed / "set_b" / "val" / "images" / "00001.png")}
    with pytest.raises(KeyError, match=r"image 'b1' is not in the region cache"):
        region_cache_key(cache, record)
    # A file reached through another symlink than the key's, gone since the extraction: the link may have named
    # another picture then.
    os.symlink(unconfirmed / "pictures", unconfirmed / "alias")
    record = {"image_id": "y", "image": str(unconfirmed / "alias" / "y.png")}
    with pytest.raises(KeyError, match=r"image 'y' is not in the region cache"):
        region_cache_key(cache, record)
    # Once the picture there is read and is the cache's, both matches are taken.
    _picture(unconfirmed / "set_b" / "images" / "00001.png", COLOURS["red"])
    record = {"image_id": "b1", "image": str(unconfirmed / "set_b" / "images" / "00001.png")}
    assert region_cache_key(cache, record) == "images/00001.png"
    _picture(unconfirmed / "alias" / "y.png", COLOURS["yellow"])
    record = {"image_id": "y", "image": str(unconfirmed / "alias" / "y.png")}
    assert region_cache_key(cache, record) == str(unconfirmed / "current" / "y.png")
    (unconfirmed / "pictures" / "y.png").unlink()


def test_a_record_whose_extraction_failed_is_told_so_before_any_other_key_is_tried(unconfirmed, tmp_path):
    cache = load_region_cache(unconfirmed / "cache")
    assert "val/images/00001.png" in cache.errors
    failed = r"image 'v1' has no regions: its extraction failed \(.*recorded for 'val/images/00001.png'\)"
    image = tmp_path / "val" / "images" / "00001.png"
    record = {"image_id": "v1", "image": str(image), "manifest_image": "val/images/00001.png"}
    with pytest.raises(KeyError, match=failed):
        region_cache_key(cache, record)
    # Even where its file is now a copy of a picture the cache holds under a key its path ends with.
    _picture(image, COLOURS["red"])
    with pytest.raises(KeyError, match=failed):
        region_cache_key(cache, record)


def test_a_path_normalised_across_a_symlink_is_not_the_file_the_key_names(unconfirmed):
    cache = load_region_cache(unconfirmed / "cache")
    # `root/link/../x.png` opens `other/x.png` (`link` is `other/deep`): the text normalises to `root/x.png`.
    path = f"{unconfirmed}/root/link/../x.png"
    assert os.path.realpath(path) == str(unconfirmed / "other" / "x.png")
    with pytest.raises(KeyError, match=r"image 'x' is not in the region cache"):
        region_cache_key(cache, {"image_id": "x", "image": path})
    # Where no symlink is crossed, the spelling is still the key's file.
    path = f"{unconfirmed}/root/./sub/../x.png"
    assert region_cache_key(cache, {"image_id": "x", "image": path}) == str(unconfirmed / "root" / "x.png")


def test_a_karpathy_record_finds_a_cache_keyed_by_a_manifest_of_its_layout_without_reading_its_image(
    data, tmp_path, monkeypatch
):
    hashes = _CountedHashes(monkeypatch)
    cache = load_region_cache(data / "relative")
    records = load_karpathy_split(_karpathy(tmp_path / "dataset_coco.json", [1, 1, 1, 1]), "test", data / "coco")
    assert [record["manifest_image"] for record in records] == [f"val2014/img{i}.png" for i in range(4)]
    assert [region_cache_key(cache, record) for record in records] == [f"val2014/img{i}.png" for i in range(4)]
    assert hashes.count == 0
    # An entry without `filepath` (Flickr30k) is written as its file name.
    flickr = tmp_path / "dataset_flickr30k.json"
    flickr.write_text(json.dumps({"images": [{"filename": "1.jpg", "split": "test", "sentences": [{"raw": "x"}]}]}))
    assert load_karpathy_split(flickr, "test")[0]["manifest_image"] == "1.jpg"

    # A cache keyed from another folder (only the trailing part of the paths): each picture is read once, the
    # second lookup of a record (evaluation's corpus fingerprint, then its corpus) reuses the comparison.
    records = load_karpathy_split(_karpathy(tmp_path / "up.json", [1, 1, 1, 1], "coco/val2014"), "test", data)
    for expected in (4, 4):
        assert [region_cache_key(cache, record) for record in records] == [f"val2014/img{i}.png" for i in range(4)]
        assert hashes.count == expected


def test_a_karpathy_file_nested_too_deep_or_with_a_key_twice_is_refused_in_one_line(tmp_path):
    path = tmp_path / "dataset_coco.json"
    entry = '{"filename": "a.jpg", "split": "test", "sentences": [{"raw": "x"}], "extra": '
    path.write_text('{"images": [' + entry + "[" * 100_000 + "]" * 100_000 + "}]}")
    with pytest.raises(ValueError, match=r"dataset_coco.json is not a Karpathy split file: not JSON \(.*too deep"):
        load_karpathy_split(path, "test")
    path.write_text('{"images": [' + entry + '1, "split": "val"}]}')
    with pytest.raises(ValueError, match=r"dataset_coco.json gives the key 'split' twice in one object"):
        load_karpathy_split(path, "test")


# ------------------------------------------------------------------------------------------ --allow_outside_root


@pytest.fixture(scope="module")
def outside_root(data, make_tiny_extractor):
    """A manifest in `lists/` whose image paths leave its folder (`../coco/...`), and a region cache of it."""
    lines = [
        {"image": f"../coco/val2014/img{i}.png", "captions": _captions(i, 2), "split": "train" if i < 3 else "test"}
        for i in range(4)
    ]
    manifest = _write_lines(data / "lists" / "captions.jsonl", lines)
    extract_regions(manifest, data / "outside", make_tiny_extractor(), **OUTSIDE)
    return manifest


def test_fine_tuning_follows_image_paths_outside_the_root_only_with_the_flag(
    data, outside_root, tmp_path, monkeypatch
):
    output_dir = tmp_path / "run"
    flags = ["--model_name_or_path", str(data / "checkpoint"), "--train_file", str(outside_root)]
    flags += ["--region_cache", str(data / "outside"), "--output_dir", str(output_dir), "--report_to", "none"]
    flags += ["--max_steps", "1", "--per_device_train_batch_size", "2", "--num_negatives", "1"]
    refused = run_script("run_retrieval", flags, monkeypatch)
    assert isinstance(refused, SystemExit)
    line = str(refused.code)
    assert line.startswith("run_retrieval: error: ") and "\n" not in line, line
    assert "'../coco/val2014/img0.png' points outside the image root" in line and "allow_outside_root" in line, line
    assert not output_dir.exists()

    finished = run_script("run_retrieval", [*flags, "--allow_outside_root"], monkeypatch)
    assert not isinstance(finished, SystemExit), finished.code
    assert (output_dir / "final" / "config.json").is_file()
    assert json.loads((output_dir / RUN_ARGS_FILE).read_text())["allow_outside_root"] is True


def test_evaluation_follows_image_paths_outside_the_root_only_with_the_flag(data, outside_root, tmp_path, monkeypatch):
    output_dir = tmp_path / "eval"
    flags = ["--model_name_or_path", str(data / "checkpoint"), "--dataset", "manifest"]
    flags += [
        "--manifest",
        str(outside_root),
        "--split",
        "all",
        "--region_cache",
        str(data / "outside"),
        "--output_dir",
        str(output_dir),
    ]
    refused = run_script("evaluate_retrieval", flags, monkeypatch)
    assert isinstance(refused, SystemExit)
    line = str(refused.code)
    assert line.startswith("evaluate_retrieval: error: ") and "\n" not in line, line
    assert "'../coco/val2014/img0.png' points outside the image root" in line and "allow_outside_root" in line, line
    assert not output_dir.exists()

    evaluated = run_script("evaluate_retrieval", [*flags, "--allow_outside_root"], monkeypatch)
    assert not isinstance(evaluated, SystemExit), evaluated.code
    (result,) = json.loads((output_dir / "results.json").read_text())["results"]
    assert (result["num_images"], result["num_texts"]) == (4, 8)


def test_a_resumed_fine_tuning_compares_allow_outside_root(tmp_path):
    args = RetrievalArguments(output_dir=str(tmp_path), train_file="captions.jsonl", resume=True)
    recorded = {**json.loads(json.dumps(dataclasses.asdict(args))), WORKING_DIR_KEY: os.getcwd()}
    (tmp_path / RUN_ARGS_FILE).write_text(json.dumps(recorded))
    check_resumed_flags(args)
    with pytest.raises(ValueError, match="allow_outside_root is False there, True now"):
        check_resumed_flags(dataclasses.replace(args, allow_outside_root=True))
    # A run recorded before the flag existed read no path outside its root: it resumes without the flag.
    del recorded["allow_outside_root"]
    (tmp_path / RUN_ARGS_FILE).write_text(json.dumps(recorded))
    check_resumed_flags(args)
    with pytest.raises(ValueError, match="allow_outside_root is False there, True now"):
        check_resumed_flags(dataclasses.replace(args, allow_outside_root=True))


# ------------------------------------------------------------------------------------------ the captions ranked


def test_fine_tuning_and_evaluation_rank_the_same_captions_of_a_karpathy_split(data, tmp_path, monkeypatch):
    # COCO has images with 6 or 7 captions; the protocol ranks the first 5 of each.
    karpathy = _karpathy(tmp_path / "dataset_coco.json", [7, 6, 5, 3])
    root = str(data / "coco")
    output_dir = tmp_path / "run"
    flags = ["--model_name_or_path", str(data / "checkpoint"), "--train_file", str(karpathy), "--image_root", root]
    flags += ["--region_cache", str(data / "absolute"), "--train_split", "test", "--eval_split", "test"]
    flags += ["--max_steps", "1", "--per_device_train_batch_size", "2", "--num_negatives", "1", "--report_to", "none"]
    finished = run_script("run_retrieval", [*flags, "--output_dir", str(output_dir)], monkeypatch)
    assert not isinstance(finished, SystemExit), finished.code
    fine_tuning = json.loads((output_dir / "eval_results.json").read_text())

    flags = ["--model_name_or_path", str(data / "checkpoint"), "--dataset", "coco", "--karpathy_file", str(karpathy)]
    flags += ["--image_root", root, "--region_cache", str(data / "absolute"), "--output_dir", str(tmp_path / "eval")]
    evaluated = run_script("evaluate_retrieval", flags, monkeypatch)
    assert not isinstance(evaluated, SystemExit), evaluated.code
    (evaluation,) = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]

    assert (fine_tuning["num_images"], fine_tuning["num_texts"]) == (4, 5 + 5 + 5 + 3)
    assert (evaluation["num_images"], evaluation["num_texts"]) == (4, 5 + 5 + 5 + 3)


def test_fine_tuning_and_evaluation_rank_every_caption_of_a_manifest_and_5_of_a_karpathy_split(
    data, tokenizer, make_tiny_config, tmp_path
):
    features = load_region_cache(data / "absolute").info["region_feature_size"]
    config = make_tiny_config(vocab_size=len(tokenizer), region_feature_size=features)
    karpathy = _karpathy(tmp_path / "dataset_coco.json", [7, 6, 5, 3])
    tuning = RetrievalArguments(
        output_dir=str(tmp_path / "run"), train_file=str(karpathy), image_root=str(data / "coco"),
        region_cache=str(data / "absolute"), train_split="test", eval_split="test",
    )  # fmt: skip
    training, fine_tuning = build_corpora(tuning, tokenizer, config)
    evaluation = EvaluationArguments(
        output_dir=str(tmp_path / "eval"), dataset="coco", karpathy_file=str(karpathy), image_root=str(data / "coco"),
        region_cache=str(data / "absolute"),
    )  # fmt: skip
    evaluated = load_evaluation_corpus(evaluation, tokenizer, config)
    assert fine_tuning.texts == evaluated.texts == [c for i, n in enumerate([5, 5, 5, 3]) for c in _captions(i, n)]
    assert training.num_texts == 7 + 6 + 5 + 3  # training learns from every caption

    lines = [{"image": f"val2014/img{i}.png", "captions": _captions(i, 7 - i), "split": "test"} for i in range(4)]
    manifest = _write_lines(data / "coco" / f"{tmp_path.name}.jsonl", lines)
    tuning = RetrievalArguments(
        output_dir=str(tmp_path / "run"), train_file=str(manifest), region_cache=str(data / "relative"),
        train_split="test", eval_split="test",
    )  # fmt: skip
    _, fine_tuning = build_corpora(tuning, tokenizer, config)
    evaluation = EvaluationArguments(
        output_dir=str(tmp_path / "eval"), manifest=str(manifest), region_cache=str(data / "relative")
    )
    evaluated = load_evaluation_corpus(evaluation, tokenizer, config)
    assert fine_tuning.texts == evaluated.texts == [c for line in lines for c in line["captions"]]


# ------------------------------------------------------------------------------------------ shared captions


def test_captions_the_tokenizer_reads_alike_are_counted_as_shared(data, tokenizer, tmp_path):
    # The uncased tokenizer gives these the same ids: one query, which ties between images 0 and 1.
    captions = [["a red circle"], ["A  Red circle "], ["a blue cross"]]
    assert tokenizer(captions[0])["input_ids"] == tokenizer(captions[1])["input_ids"]
    lines = [{"image": f"val2014/img{i}.png", "captions": texts} for i, texts in enumerate(captions)]
    manifest = _write_lines(data / "coco" / f"{tmp_path.name}.jsonl", lines)
    args = EvaluationArguments(
        output_dir=str(tmp_path / "out"),
        model_name_or_path=str(data / "checkpoint"),
        manifest=str(manifest),
        split="all",
        region_cache=str(data / "relative"),
        shortlist_k=2,
    )
    with CaptureLogger(full_ranking.logger) as captured:
        run_retrieval_evaluation(args)
    assert "2 of the 3 texts are, as the tokens the model reads, a caption of more than one image" in captured.out
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert [result["num_captions_shared_by_images"] for result in results] == [2, 2]

    # Zero-shot evaluation of the same manifest counts them the same way.
    with CaptureLogger(zero_shot.logger) as captured:
        manifest_retrieval_inputs(manifest, str(data / "relative"), tokenizer)
    assert "2 of the 3 captions are also, as the tokens the model reads, a caption of another image" in captured.out


def test_a_plain_dict_of_regions_builds_its_key_tables_once_for_all_records(monkeypatch):
    from imagebert_hf.data import retrieval_corpus

    regions = {f"/data/images/./{i}.jpg": {"index": i} for i in range(50)}  # keys spelled otherwise than the records
    built = []
    build = retrieval_corpus._PathKeys.__init__
    monkeypatch.setattr(retrieval_corpus._PathKeys, "__init__", lambda self, keys: built.append(build(self, keys)))
    lookup = retrieval_corpus.region_cache_lookup(regions)
    for i in range(50):
        assert lookup({"image": f"/data/images/{i}.jpg", "image_id": str(i)})["index"] == i
    assert len(built) == 1


@pytest.mark.parametrize("memory_mapped", [False, True])
def test_zero_shot_inputs_find_regions_under_another_spelling_of_the_path_as_evaluation_does(
    data, tokenizer, tmp_path, memory_mapped
):
    # The zero-shot inputs once looked regions up by the manifest's literal path: `./val2014/img0.png` was "not in
    # the region cache" that `evaluate_retrieval` read it from.
    captions = [["a red circle"], ["a blue cross"]]
    plain = [{"image": f"val2014/img{i}.png", "captions": texts} for i, texts in enumerate(captions)]
    dotted = [{**line, "image": "./" + line["image"]} for line in plain]
    inputs = [
        manifest_retrieval_inputs(
            _write_lines(data / "coco" / f"{tmp_path.name}-{name}.jsonl", lines),
            str(data / "relative"),
            tokenizer,
            memory_mapped=memory_mapped,
        )
        for name, lines in (("plain", plain), ("dotted", dotted))
    ]
    (texts, regions, text_to_image), (dotted_texts, dotted_regions, dotted_text_to_image) = inputs
    assert dotted_text_to_image == text_to_image == [0, 1]
    assert torch.equal(dotted_texts["input_ids"], texts["input_ids"])
    if memory_mapped:
        regions, dotted_regions = regions.batch([0, 1]), dotted_regions.batch([0, 1])
    for key in ("region_features", "region_locations", "region_attention_mask"):
        assert torch.equal(dotted_regions[key], regions[key]), key


def test_generated_images_follow_the_cuts_and_never_the_held_out_seed(tokenizer, make_tiny_config, tmp_path):
    """`--max_images` and `--captions_per_image` cut the generated splits as they cut a file's (both were ignored,
    while `run_args.json` recorded them), and `--seed 1234` would generate, as training images, the held-out set
    `evaluate_retrieval --dataset synthetic` ranks: refused in one line."""
    from imagebert_hf.data.synthetic import HELD_OUT_SEED
    from imagebert_hf.training.retrieval_finetuning import check_flags

    config = make_tiny_config(vocab_size=len(tokenizer))
    args = RetrievalArguments(
        output_dir=str(tmp_path / "run"), synthetic_images=12, eval_images=4, max_images=6, captions_per_image=1
    )
    training, evaluation = build_corpora(args, tokenizer, config)
    assert (training.num_images, training.num_texts) == (6, 6)
    assert (evaluation.num_images, evaluation.num_texts) == (4, 4)
    whole, held_out = build_corpora(
        dataclasses.replace(args, max_images=None, captions_per_image=None), tokenizer, config
    )
    assert (whole.num_images, whole.num_texts, held_out.num_texts) == (12, 24, 8)
    assert training.image_ids == whole.image_ids[:6] and evaluation.image_ids == held_out.image_ids

    check_flags(dataclasses.replace(args, seed=HELD_OUT_SEED + 1))
    with pytest.raises(
        ValueError, match=rf"^--seed {HELD_OUT_SEED} with --synthetic_images would train on the held-out"
    ):
        check_flags(dataclasses.replace(args, seed=HELD_OUT_SEED))
