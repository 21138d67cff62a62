"""`examples/evaluate_retrieval.py` end to end on generated data with a tiny saved checkpoint: the printed table,
`results.json`, the plots, the model card and the corpus cache."""

import json
import os
import re
import runpy
import subprocess
import sys

import pytest
import torch

from imagebert_hf import ImageBERTForImageTextRetrieval
from imagebert_hf.evaluation.full_ranking import EvaluationArguments, load_evaluation_corpus, run_retrieval_evaluation
from imagebert_hf.evaluation.recall import retrieval_metrics
from imagebert_hf.models.imagebert.retrieval_index import score_all_pairs

from .testing_utils import PROJECT_ROOT


@pytest.fixture(scope="module")
def checkpoint(make_tiny_config, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    ImageBERTForImageTextRetrieval(make_tiny_config(vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_example_prints_and_writes_the_evaluation(tokenizer, checkpoint, tmp_path, capsys):
    main = runpy.run_path(str(PROJECT_ROOT / "examples" / "evaluate_retrieval.py"))["main"]
    flags = ["--model_name_or_path", str(checkpoint), "--dataset", "synthetic", "--synthetic_images", "12"]
    flags += ["--shortlist_k", "24", "--batch_size", "64", "--model_card", "--corpus_cache", str(tmp_path / "c.pt")]
    returned = main([*flags, "--output_dir", str(tmp_path / "out")])

    captured = capsys.readouterr()
    printed = captured.out.splitlines()
    assert printed[0] == "12 images, 24 texts: 288 pairs"
    assert "scoring pairs: 100%" in captured.err and "288/288" in captured.err  # the full ranking's progress bar
    assert "re-ranking the shortlist: 100%" in captured.err
    assert printed[1].startswith("| split | TR R@1 | TR R@5 | TR R@10 | IR R@1")
    assert printed[3].startswith("| synthetic (full) |") and printed[4].startswith("| synthetic (shortlist k=24) |")

    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["model"] == str(checkpoint)
    assert written["results"] == returned["results"]
    full, shortlist = written["results"]
    assert full["ranking"] == "full" and full["dataset_name"] == "synthetic" and full["dataset_split"] == "test"
    assert shortlist["ranking"] == "shortlist k=24" and shortlist["pairs_scored"] == 288
    assert shortlist["index_type"] == "flat"  # an approximate index's results are told apart

    # The metrics are those of the model on the held-out generated set, computed here on their own.
    model = ImageBERTForImageTextRetrieval.from_pretrained(checkpoint).eval()
    args = EvaluationArguments(output_dir=str(tmp_path), dataset="synthetic", synthetic_images=12)
    corpus = load_evaluation_corpus(args, tokenizer, model.config)
    expected = retrieval_metrics(
        score_all_pairs(model, corpus.text_inputs, corpus.region_inputs), corpus.text_to_image
    )
    for key, value in expected.items():
        assert full["metrics"][key] == pytest.approx(value), key
        # A shortlist as large as the gallery re-scores every pair: the same ranking.
        assert shortlist["metrics"][key] == pytest.approx(value), key
    for name in ("recall_at_k.png", "score_histogram.png", "README.md"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert "imagebert-base" in (tmp_path / "out" / "README.md").read_text()

    # A second run reads the corpus cache and gives the same results.
    again = main([*flags, "--output_dir", str(tmp_path / "again")])
    assert [r["metrics"] for r in again["results"]] == [r["metrics"] for r in returned["results"]]

    # As fine-tuning's evaluation can, fewer captions per image; the corpus cache of all of them is not reused.
    with pytest.raises(ValueError, match=r"built from other data or settings \(captions_per_image: cache None, this"):
        main([*flags, "--output_dir", str(tmp_path / "fewer"), "--captions_per_image", "1"])
    flags[flags.index("--corpus_cache") + 1] = str(tmp_path / "fewer.pt")
    fewer = main([*flags, "--output_dir", str(tmp_path / "fewer"), "--captions_per_image", "1"])
    assert [(r["num_images"], r["num_texts"]) for r in fewer["results"]] == [(12, 12), (12, 12)]


def test_a_gallery_of_one_image_plots_its_histogram_without_a_warning(checkpoint, tmp_path):
    import warnings

    main = runpy.run_path(str(PROJECT_ROOT / "examples" / "evaluate_retrieval.py"))["main"]
    flags = ["--model_name_or_path", str(checkpoint), "--dataset", "synthetic", "--synthetic_images", "4"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's "invalid value encountered in divide"
        main([*flags, "--max_images", "1", "--output_dir", str(tmp_path / "one")])
    assert (tmp_path / "one" / "score_histogram.png").stat().st_size > 0


def test_flags_that_are_missing_are_named(make_tiny_config, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="--model_name_or_path"):
        run_retrieval_evaluation(EvaluationArguments(output_dir=str(tmp_path)))
    args = EvaluationArguments(output_dir=str(tmp_path), dataset="coco", region_cache=str(tmp_path))
    with pytest.raises(ValueError, match="--dataset coco needs --karpathy_file"):
        load_evaluation_corpus(args, tokenizer, make_tiny_config())


def test_two_processes_share_the_pairs_and_give_the_ranking_of_one(checkpoint, tmp_path):
    """`accelerate launch` with two CPU processes: each scores half of the pairs (full ranking and the shortlist's
    re-ranking), the main process alone prints and writes, and the metrics are those of one process."""
    flags = ["--model_name_or_path", str(checkpoint), "--dataset", "synthetic", "--synthetic_images", "12"]
    flags += ["--shortlist_k", "5", "--batch_size", "16"]
    one = run_retrieval_evaluation(
        EvaluationArguments(
            model_name_or_path=str(checkpoint),
            dataset="synthetic",
            synthetic_images=12,
            shortlist_k=5,
            batch_size=16,
            output_dir=str(tmp_path / "one"),
        )  # fmt: skip
    )
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(PROJECT_ROOT / "examples" / "evaluate_retrieval.py"), *flags, "--output_dir", str(tmp_path / "two"), "--cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT / "src")}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"re-ranking the shortlist: 100%\S* (\d+)/\1 ", result.stderr), result.stderr[-2000:]
    printed = result.stdout.splitlines()  # by the main process only
    assert printed.count("12 images, 24 texts: 288 pairs, shared out over 2 processes") == 1, result.stdout
    two = json.loads((tmp_path / "two" / "results.json").read_text())["results"]
    assert [r["ranking"] for r in two] == [r["ranking"] for r in one["results"]]
    for shared, alone in zip(two, one["results"]):
        for key, value in alone["metrics"].items():
            assert shared["metrics"][key] == pytest.approx(value), (shared["ranking"], key)
    assert two[-1]["pairs_scored"] == one["results"][-1]["pairs_scored"]


DIFFERENT_PAIRS = """
import torch
from accelerate import PartialState
from imagebert_hf.evaluation.across_processes import score_pairs_across_processes

processes = PartialState(cpu=True)
images = torch.tensor([0, 1, 2]) + processes.process_index  # each process lists other pairs
try:
    score_pairs_across_processes(None, {}, {}, images, torch.zeros(3, dtype=torch.long))
except ValueError as error:
    print("refused:", error, flush=True)
# Leave together: a process that exits while the other still talks to it can abort gloo's threads at exit.
processes.wait_for_everyone()
torch.distributed.destroy_process_group()
"""


def test_processes_that_hold_different_pairs_are_all_refused(tmp_path):
    script = tmp_path / "different_pairs.py"
    script.write_text(DIFFERENT_PAIRS)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT / "src")}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    # Both processes refuse (their lines may interleave), so neither waits in a collective for the other.
    assert result.stdout.count("refused:") == 2, result.stdout
    assert "the processes hold different pairs to score (3, 3 pairs)" in result.stdout
