"""The example scripts on bad input: one line `<script>: error: <message>` naming the flag or file and a non-zero exit
status, never a traceback; and the checks that refuse such input before anything is loaded or written."""

import os
import re
import runpy
import subprocess
import sys

import pytest
import yaml

from imagebert_hf.evaluation import full_ranking
from imagebert_hf.evaluation.full_ranking import (
    EvaluationArguments,
    load_evaluation_corpus,
    load_retrieval_model,
    run_retrieval_evaluation,
)
from imagebert_hf.formats.files import check_folder_or_hub_id
from imagebert_hf.training import RetrievalArguments, recipe_from_dict, run_pretraining, run_retrieval_finetuning
from imagebert_hf.training.pretraining import check_run_folder
from imagebert_hf.training.retrieval_finetuning import parse_loss_weights

from .test_evaluate_retrieval import checkpoint  # noqa: F401 - fixture
from .testing_utils import PROJECT_ROOT


EXAMPLES = PROJECT_ROOT / "examples"
TINY_RECIPE = EXAMPLES / "configs" / "pretrain_tiny_synthetic.yaml"


@pytest.fixture(scope="module")
def script_runs(checkpoint, tmp_path_factory):  # noqa: F811
    """A few bad inputs, one per script, run at once as `python examples/<script>.py ...` (each run spends most of
    its time importing): {case: (script, the name the line must hold, completed process)}."""
    tmp = tmp_path_factory.mktemp("runs")
    damaged = tmp / "damaged"
    damaged.mkdir()
    for item in checkpoint.iterdir():
        (damaged / item.name).write_bytes(item.read_bytes())
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    corpus_cache = tmp / "corpus.safetensors"
    corpus_cache.write_bytes(b"\x00\x14" + b"\x00" * 98)
    cases = {
        "missing recipe": ("run_pretraining", str(tmp / "nope.yaml"), ["--config", str(tmp / "nope.yaml")]),
        "damaged weights": (
            "run_retrieval",
            str(damaged),
            ["--model_name_or_path", str(damaged), "--synthetic_images", "4", "--output_dir", str(tmp / "rt")],
        ),
        "damaged corpus cache": (
            "evaluate_retrieval",
            str(corpus_cache),
            ["--model_name_or_path", str(checkpoint), "--dataset", "synthetic", "--synthetic_images", "2"]
            + ["--corpus_cache", str(corpus_cache), "--output_dir", str(tmp / "ev")],
        ),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    running = {
        case: subprocess.Popen(
            [sys.executable, str(EXAMPLES / f"{script}.py"), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case, (script, _, args) in cases.items()
    }
    results = {}
    for case, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        results[case] = (
            cases[case][0],
            cases[case][1],
            subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr),
        )
    return results


@pytest.mark.parametrize("case", ["missing recipe", "damaged weights", "damaged corpus cache"])
def test_a_bad_input_ends_the_script_with_one_line_naming_it(script_runs, case):
    script, named, result = script_runs[case]
    assert result.returncode != 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(f"{script}: error: ") and named in last, last


@pytest.mark.parametrize(
    ("script", "flags"),
    [
        ("run_pretraining", ["--config", str(TINY_RECIPE)]),
        ("extract_regions", ["--output_dir", "out", "--manifest", "m"]),
        ("curate_lait", ["--output_dir", "out"]),
    ],
)
def test_an_unknown_flag_is_refused_as_argparse_refuses_one(script, flags, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *flags, "--bogus", "1"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(EXAMPLES / f"{script}.py"), run_name="__main__")
    assert stop.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line == f"{script}.py: error: unrecognized arguments: --bogus 1", last_line


def test_an_evaluation_refuses_a_corpus_cache_folder_before_loading_anything(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(full_ranking, "load_retrieval_model", never)
    args = EvaluationArguments(
        output_dir=str(tmp_path / "out"),
        model_name_or_path="unused",
        dataset="synthetic",
        synthetic_images=2,
        corpus_cache=str(tmp_path),
    )
    with pytest.raises(IsADirectoryError, match=r"--corpus_cache .* is a folder; expected a file path"):
        run_retrieval_evaluation(args)
    assert not (tmp_path / "out").exists()


def _retrieval_args(tmp_path, **changes) -> RetrievalArguments:
    flags = {"output_dir": str(tmp_path / "run"), "synthetic_images": 4, "report_to": "none", "cpu": True}
    return RetrievalArguments(**{**flags, **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_epochs": -1.0}, r"--num_epochs must be positive, got -1\.0"),
        ({"warmup_ratio": 5.0}, r"--warmup_ratio must be in \[0, 1\), got 5\.0"),
        ({"num_negatives": -2}, r"--num_negatives must be >= 1, got -2"),
        ({"learning_rate": float("nan")}, r"--learning_rate must be a finite number, got nan"),
        ({"lr_scheduler_type": "bogus"}, r"--lr_scheduler_type must be one of \[.*'linear'.*\], got 'bogus'"),
    ],
)
def test_fine_tuning_refuses_flags_out_of_range_before_training(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        run_retrieval_finetuning(_retrieval_args(tmp_path, **changes))
    assert not (tmp_path / "run").exists()


def test_a_missing_split_file_is_named_before_the_region_cache(tmp_path, tokenizer, make_tiny_config):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"--train_file .*nope\.jsonl does not exist"):
        run_retrieval_finetuning(_retrieval_args(tmp_path, synthetic_images=None, train_file=str(missing)))
    args = EvaluationArguments(output_dir=str(tmp_path), dataset="coco", karpathy_file=str(tmp_path / "k.json"))
    with pytest.raises(FileNotFoundError, match=r"--karpathy_file .*k\.json does not exist"):
        load_evaluation_corpus(args, tokenizer, make_tiny_config())


def test_a_model_config_the_model_refuses_leaves_no_run_folder(tmp_path):
    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    recipe.update(output_dir=str(tmp_path / "run"), report_to="none")
    recipe["model"]["config"]["num_attention_heads"] = 5
    with pytest.raises(ValueError, match=r"hidden_size \(32\) must be a multiple of num_attention_heads \(5\)"):
        run_pretraining(recipe_from_dict(recipe))
    assert not (tmp_path / "run").exists()


def test_paths_and_values_the_scripts_name(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match=r"output_dir .*a_file exists and is not a folder"):
        check_run_folder(a_file, resume=False)
    with pytest.raises(
        FileNotFoundError, match=r"--model_name_or_path .*nope: no such folder \(expected a checkpoint"
    ):
        load_retrieval_model(str(tmp_path / "nope"))
    # a name the Hub could hold is left to from_pretrained
    check_folder_or_hub_id("google-bert/bert-base-uncased", "--model_name_or_path", "a checkpoint folder")
    with pytest.raises(ValueError, match=r"--loss_weights: the weight of 'binary=abc' must be a number"):
        parse_loss_weights("binary=abc")


def test_an_error_in_a_data_worker_ends_the_run_with_one_line_and_no_hang(tmp_path):
    # The workers ignore SIGTERM (a scheduler's signal must not cost the step's checkpoint). Kept alive by the error's
    # traceback, they once blocked the interpreter's exit forever after the error was printed, with torch's worker
    # traceback as the "one line". Here the collator refuses a record in the worker (class labels beyond the model's).
    recipe = {
        "output_dir": str(tmp_path / "run"),
        "report_to": "none",
        "num_workers": 1,
        "model": {
            "tokenizer": "synthetic",
            "config": {
                "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64,
                "region_feature_size": 16, "num_object_classes": 5, "max_regions": 8, "max_text_length": 20,
            },
        },
        "stages": [{
            "name": "s", "max_steps": 20, "per_device_train_batch_size": 4,
            "sources": [{"name": "s", "type": "synthetic", "num_images": 8, "regions": "annotations"}],
        }],
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "run_pretraining.py"), "--config", str(path), "--cpu"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert errors == [
        "run_pretraining: error: ValueError: sample 'synthetic-0-000003': region_class_labels [20] are outside [0, 5) "
        "(num_object_classes; -100 for none), and are never clamped. (in DataLoader worker process 0)"
    ]
    assert "Original Traceback" not in done.stderr


def test_error_line_keeps_a_workers_own_message_and_leaves_others_as_they_are():
    from imagebert_hf.models.imagebert.script_errors import error_line

    wrapped = ValueError(
        "Caught KeyError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
        "  File \"x.py\", line 1, in f\n    g()\nKeyError: 'img7'\n"
    )
    assert error_line(wrapped) == "KeyError: 'img7' (in DataLoader worker process 3)"
    assert error_line(ValueError("--output_dir x is a file")) == "--output_dir x is a file"


def test_curate_lait_passes_a_url_output_dir_to_the_runner_as_written(monkeypatch, tmp_path):
    # A Path made `s3://bucket/lait` the local folder `s3:/bucket/lait/pairs` on each Spark executor, without a word.
    module = runpy.run_path(str(EXAMPLES / "curate_lait.py"))
    received = []

    class Stop(Exception):
        pass

    def fake_runner(inputs, output_dir, config, **kwargs):
        received.append(output_dir)
        raise Stop

    module["main"].__globals__["run_spark"] = fake_runner
    monkeypatch.setattr(sys, "argv", ["curate_lait.py", "--inputs", str(tmp_path), "--runner", "spark",
                                      "--output_dir", "s3://bucket/lait"])  # fmt: skip
    with pytest.raises(Stop):
        module["main"]()
    assert received == ["s3://bucket/lait"]
    monkeypatch.setattr(sys, "argv", ["curate_lait.py", "--output_dir", "s3://bucket/lait"])
    with pytest.raises(ValueError, match=r"is a URL; the demo crawl is written locally: give --inputs"):
        module["main"]()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"output_dir": "out"}, r"args\.json: CacheArguments\.__init__\(\) missing 1 required positional argument"),
        (
            {"manifest": "m.jsonl", "output_dir": "out", "max_regions": "ten"},
            r"max_regions must be an integer, got 'ten'",
        ),
        (["manifest", "m.jsonl"], r"args\.json holds a JSON list; expected an object of argument names and values"),
        ({"manifest": "m.jsonl", "output_dir": "out", "colour": 1}, r"args\.json: Some keys are not used"),
        # Not converted as a flag's text is: "false" would be a true string, and boxes used where a grid was meant.
        ({"manifest": "m.jsonl", "output_dir": "out", "use_boxes": "false"}, r"use_boxes must be true or false, got"),
        ({"manifest": "m.jsonl", "output_dir": "out", "num_proc": 2.5}, r"num_proc must be an integer, got 2\.5"),
        ({"manifest": "m.jsonl", "output_dir": 3}, r"output_dir must be a string, got 3"),
    ],
)
def test_extract_regions_arguments_from_a_json_file_end_in_one_line(arguments, message, tmp_path, monkeypatch):
    # These ended in tracebacks (a TypeError, an AttributeError) where the script promises one line.
    import json

    monkeypatch.chdir(tmp_path)
    (tmp_path / "args.json").write_text(json.dumps(arguments))
    monkeypatch.setattr(sys, "argv", ["extract_regions.py", str(tmp_path / "args.json")])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(EXAMPLES / "extract_regions.py"), run_name="__main__")
    assert str(stop.value.code).startswith("extract_regions: error: ")
    assert re.search(message, str(stop.value.code)), stop.value.code
    assert "\n" not in str(stop.value.code)
