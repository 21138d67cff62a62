"""Hostile flags at `imagebert-extract-regions`, `imagebert-convert-uniter` and the evaluation examples: an empty
output folder (the current one to the OS), a shard index outside the split, a file given where a model, tokenizer
or extractor folder is expected, a missing tokenizer or detector, a card that cannot be named. Each is refused with
one line naming the flag, before anything is written."""

import json
import os
import runpy
from pathlib import Path

import pytest
import torch

from imagebert_hf.app.cli import parse_args as parse_app_args
from imagebert_hf.evaluation import full_ranking
from imagebert_hf.evaluation.full_ranking import EvaluationArguments, run_retrieval_evaluation
from imagebert_hf.formats.files import check_folder_or_hub_id
from imagebert_hf.models.imagebert.convert_uniter_checkpoint import convert_uniter_checkpoint
from imagebert_hf.models.imagebert.convert_uniter_checkpoint import main as convert_main

from .test_evaluate_retrieval import checkpoint  # noqa: F401  (a fixture)
from .test_extract_regions_cli_inputs import extractor_dir, jpeg_bytes, run_main, write_manifest  # noqa: F401
from .test_region_cache_scale import build
from .test_uniter_conversion import HEADS, uniter_state_dict
from .testing_utils import PROJECT_ROOT


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a model")
    return path


@pytest.fixture
def manifest(tmp_path):
    return write_manifest(tmp_path / "data", {f"{i}.jpg": jpeg_bytes(i) for i in range(3)})


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    """An empty current folder: what a command given the empty path would write into."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


# ------------------------------------------------------------------------------------------------ the shared check


def test_a_file_where_a_model_folder_is_expected_is_named(tmp_path, a_file):
    with pytest.raises(NotADirectoryError, match=r"^--model .*a_file is a file; expected a saved model folder"):
        check_folder_or_hub_id(a_file, "--model", "a saved model folder")
    with pytest.raises(ValueError, match=r"^--model must name a saved model folder or a Hub id, got ''"):
        check_folder_or_hub_id("", "--model", "a saved model folder")
    check_folder_or_hub_id(tmp_path, "--model", "a saved model folder")
    check_folder_or_hub_id("owner/name", "--model", "a saved model folder")


def test_the_app_names_a_model_that_is_a_file(a_file, manifest):
    with pytest.raises(SystemExit, match=r"^imagebert-app: error: --model .*a_file is a file; expected a saved"):
        parse_app_args(["--model", str(a_file), "--gallery", str(manifest)])


# ------------------------------------------------------------------------------------------------ extract regions


def test_extract_refuses_an_empty_output_dir_and_writes_nothing_here(empty_cwd, manifest, extractor_dir):  # noqa: F811
    message = run_main("--output_dir", "", "--manifest", manifest, "--extractor", extractor_dir)
    assert message == "--output_dir must be a non-empty path, got ''."
    assert not list(empty_cwd.iterdir())


def test_merge_refuses_an_empty_output_dir_and_writes_nothing_here(empty_cwd, tmp_path):
    part = tmp_path / "part0"
    build(part, num_images=4)
    message = run_main("--output_dir", "", "--merge", part)
    assert message == "--output_dir must be a non-empty path, got ''."
    assert not list(empty_cwd.iterdir())


@pytest.mark.parametrize("shard_index", [2, -1])
def test_a_shard_index_outside_the_split_is_refused_before_anything_is_written(
    tmp_path,
    manifest,
    extractor_dir,  # noqa: F811
    shard_index,
):
    out = tmp_path / "out"
    argv = ["--output_dir", out, "--manifest", manifest, "--extractor", extractor_dir, "--num_shards", "2"]
    message = run_main(*argv, "--shard_index", shard_index)
    assert message == f"shard_index must be an integer from 0 to num_shards - 1 = 1, got {shard_index}."
    assert not out.exists()
    with pytest.raises(ValueError, match=r"shard_index must be an integer from 0 to num_shards - 1 = 0, got True"):
        build(out, shard_index=True)
    assert not out.exists()


def test_extract_names_an_extractor_that_is_a_file(tmp_path, manifest, a_file):
    out = tmp_path / "out"
    message = run_main("--output_dir", out, "--manifest", manifest, "--extractor", a_file)
    assert message.startswith(f"--extractor {a_file} is a file; expected a folder saved with ImageBERTRoIExtractor")
    assert not out.exists()


def test_the_example_refuses_an_empty_output_dir_and_a_missing_tokenizer(empty_cwd, tmp_path, manifest):
    main = runpy.run_path(str(PROJECT_ROOT / "examples" / "extract_regions.py"))["main"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["extract_regions.py", "--manifest", str(manifest), "--output_dir", ""])
        with pytest.raises(ValueError, match=r"^--output_dir must be a non-empty path, got ''"):
            main()
        argv = ["extract_regions.py", "--manifest", str(manifest), "--output_dir", str(tmp_path / "out")]
        patch.setattr("sys.argv", [*argv, "--tokenizer", str(tmp_path / "nope")])
        with pytest.raises(FileNotFoundError, match=r"^--tokenizer .*nope: no such folder"):
            main()
    assert not list(empty_cwd.iterdir()) and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ UNITER converter


@pytest.fixture(scope="module")
def uniter_files(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("uniter")
    torch.save(uniter_state_dict("retrieval", seed=3), folder / "uniter.pt")
    (folder / "uniter.json").write_text(json.dumps({"num_attention_heads": HEADS}))
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder


def convert(uniter_files, output, *flags):
    """The line `imagebert-convert-uniter` ends with (after its program name)."""
    argv = ["--checkpoint", str(uniter_files / "uniter.pt"), "--output", str(output)]
    with pytest.raises(SystemExit) as stop:
        convert_main([*argv, "--uniter_config", str(uniter_files / "uniter.json"), *map(str, flags)])
    message = stop.value.code
    assert isinstance(message, str) and message.startswith("imagebert-convert-uniter: error: "), message
    return message.removeprefix("imagebert-convert-uniter: error: ")


def test_the_converter_refuses_an_empty_output_and_writes_nothing_here(empty_cwd, uniter_files):
    assert convert(uniter_files, "") == "--output must be a non-empty path, got ''."
    # The function refuses it too, naming its parameter, before the checkpoint is read.
    with pytest.raises(ValueError, match=r"^output_dir must be a non-empty path, got ''\.$"):
        convert_uniter_checkpoint(uniter_files / "uniter.pt", "")
    assert not list(empty_cwd.iterdir())


def test_the_converter_refuses_detector_weights_without_a_tokenizer(tmp_path, uniter_files, a_file):
    message = convert(uniter_files, tmp_path / "out", "--detector_weights", tmp_path / "nope")
    assert message.startswith("--detector_weights goes into the processor, which is saved only with --tokenizer")
    with pytest.raises(ValueError, match=r"^detector_weights goes into the processor, which is saved only with tok"):
        convert_uniter_checkpoint(uniter_files / "uniter.pt", tmp_path / "out", detector_weights=str(a_file))
    assert not (tmp_path / "out").exists()


def test_the_converter_names_a_tokenizer_or_detector_that_is_not_there(tmp_path, uniter_files, a_file):
    out = tmp_path / "out"
    assert convert(uniter_files, out, "--tokenizer", tmp_path / "nope").startswith(
        f"--tokenizer {tmp_path / 'nope'}: no such folder"
    )
    assert convert(uniter_files, out, "--tokenizer", a_file).startswith(f"--tokenizer {a_file} is a file; expected")
    flags = ["--tokenizer", uniter_files / "tokenizer", "--detector_weights", tmp_path / "nope"]
    assert convert(uniter_files, out, *flags).startswith(
        f"--detector_weights {tmp_path / 'nope'}: no such file or folder"
    )
    with pytest.raises(NotADirectoryError, match=r"^tokenizer .* is a file; expected a tokenizer folder"):
        convert_uniter_checkpoint(uniter_files / "uniter.pt", out, tokenizer=str(a_file))
    with pytest.raises(NotADirectoryError, match=r"^output_dir .* is a file; expected a folder"):
        convert_uniter_checkpoint(uniter_files / "uniter.pt", a_file)
    assert not out.exists()


def test_the_converter_says_a_checkpoint_folder_is_not_a_file(tmp_path, uniter_files):
    argv = ["--checkpoint", str(tmp_path), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"error: checkpoint .* is a folder; expected a file, UNITER's \.pt"):
        convert_main(argv)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate_retrieval_main():
    return runpy.run_path(str(PROJECT_ROOT / "examples" / "evaluate_retrieval.py"))["main"]


def test_an_empty_model_id_for_the_card_is_refused_before_anything_is_written(checkpoint, tmp_path):  # noqa: F811
    flags = ["--model_name_or_path", str(checkpoint), "--dataset", "synthetic", "--synthetic_images", "4"]
    for model_id in ("", "my\nmodel"):
        with pytest.raises(ValueError, match=r"^--model_id must be a non-empty name on one line for --model_card"):
            evaluate_retrieval_main()(
                [*flags, "--output_dir", str(tmp_path / "out"), "--model_card", "--model_id", model_id]
            )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["under_a_file", "unwritable"])
def test_an_output_dir_that_cannot_be_made_is_refused_before_any_pair_is_scored(
    checkpoint,  # noqa: F811
    tmp_path,
    where,
    monkeypatch,
):
    # Found only when results were written, it cost every score of the run (hours at COCO 5k).
    (tmp_path / "a_file").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    output_dir = tmp_path / "a_file" / "out" if where == "under_a_file" else locked / "out"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: real_access(path, mode) and Path(path) != locked)
    scored = []
    monkeypatch.setattr(full_ranking, "rank_corpus", lambda *args, **kwargs: scored.append(1))
    flags = ["--model_name_or_path", str(checkpoint), "--dataset", "synthetic", "--synthetic_images", "4"]
    message = r"is a file, not a folder" if where == "under_a_file" else r"is not a folder this user may write in"
    with pytest.raises(ValueError, match=rf"^--output_dir .*out cannot be .*{message}"):
        evaluate_retrieval_main()([*flags, "--output_dir", str(output_dir)])
    assert not scored


def test_a_card_that_cannot_be_built_leaves_no_results_behind(checkpoint, tmp_path, monkeypatch):  # noqa: F811
    def refuse(*args, **kwargs):
        raise ValueError("no card")

    monkeypatch.setattr(full_ranking, "build_model_card", refuse)
    args = EvaluationArguments(
        output_dir=str(tmp_path / "out"),
        model_name_or_path=str(checkpoint),
        dataset="synthetic",
        synthetic_images=4,
        model_card=True,
    )
    with pytest.raises(ValueError, match="no card"):
        run_retrieval_evaluation(args)
    assert not (tmp_path / "out").exists()


def test_a_missing_split_file_is_named_before_the_region_cache(checkpoint, tmp_path):  # noqa: F811
    args = EvaluationArguments(output_dir=str(tmp_path / "out"), model_name_or_path=str(checkpoint), dataset="coco")
    with pytest.raises(ValueError, match=r"^--dataset coco needs --karpathy_file \(a Karpathy split file"):
        run_retrieval_evaluation(args)
    args = EvaluationArguments(
        output_dir=str(tmp_path / "out"), model_name_or_path=str(tmp_path / "nope"), dataset="flickr30k"
    )
    with pytest.raises(ValueError, match=r"^--dataset flickr30k needs --karpathy_file"):
        run_retrieval_evaluation(args)  # refused before the model is looked for
    args = EvaluationArguments(
        output_dir=str(tmp_path / "out"), model_name_or_path=str(tmp_path / "nope"), dataset="manifest"
    )
    args.manifest = str(tmp_path / "nope.jsonl")
    (tmp_path / "nope.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"^--dataset manifest needs --region_cache"):
        run_retrieval_evaluation(args)
    assert not (tmp_path / "out").exists()


def test_evaluate_retrieval_names_a_model_that_is_a_file(tmp_path, a_file):
    flags = ["--model_name_or_path", str(a_file), "--dataset", "synthetic", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(NotADirectoryError, match=r"^--model_name_or_path .*a_file is a file; expected a checkpoint"):
        evaluate_retrieval_main()(flags)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model", ["nope", "a_file"])
def test_evaluate_relation_swaps_names_a_model_that_is_missing_or_a_file(tmp_path, a_file, capsys, model):
    main = runpy.run_path(str(PROJECT_ROOT / "examples" / "evaluate_relation_swaps.py"))["main"]
    with pytest.raises(SystemExit) as stop:
        main(["--model_name_or_path", str(tmp_path / model)])
    assert stop.value.code == 1
    said = {"nope": ": no such folder (expected an ImageBERT model folder", "a_file": " is a file; expected an"}
    assert capsys.readouterr().err.startswith(
        f"evaluate_relation_swaps: error: --model_name_or_path {tmp_path / model}{said[model]}"
    )


def test_the_evaluation_functions_name_a_file_given_as_the_model(tmp_path):
    from imagebert_hf.evaluation.relation_swaps import load_retrieval_model
    from imagebert_hf.evaluation.zero_shot import zero_shot_scores

    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("x")
    with pytest.raises(NotADirectoryError, match=r"model_name_or_path .*notes.txt is a file; expected a checkpoint"):
        load_retrieval_model(str(not_a_model))
    with pytest.raises(NotADirectoryError, match=r"model .*notes.txt is a file; expected a checkpoint"):
        zero_shot_scores(not_a_model, {}, {}, [0])
