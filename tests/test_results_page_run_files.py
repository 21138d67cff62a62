"""The run files behind the results page: a study's runs are averaged only when scored on one protocol (the runner
refuses to add another protocol's run beside them, the page maker refuses a table that mixes two), a damaged or
edited run file ends the page maker with one line naming the file and the field before the page is written, and a
run killed while its result is written leaves no part of the file."""

import json
import os
import runpy
import subprocess
import sys
from dataclasses import asdict

import pytest

from .test_ablations import _load, _run_file
from .testing_utils import PROJECT_ROOT


PAGE_MAKER = PROJECT_ROOT / "examples" / "ablations" / "make_results_page.py"
RUNNER = PROJECT_ROOT / "examples" / "ablations" / "run_ablations.py"
PAGE = (
    "# Results\n<!-- results:rerank -->\nold table\n<!-- /results:rerank -->\n"
    "<!-- results:shipped -->\n<!-- /results:shipped -->\n"
)
GALLERY_50 = "Flickr8k dev, first 50 images x 250 captions (5 per image), every pair scored"
GALLERY_113 = "Flickr8k dev, first 113 images x 113 captions (1 per image), every pair scored"


def _result(seed: int, shift: float = 0.0, protocol: str = GALLERY_50, **flags) -> dict:
    """A rerank run file as `run_ablations.py` writes it: its figures, protocol and the flags it ran with."""
    runner = _load("run_ablations")
    arguments = asdict(runner.AblationArguments(study="rerank", seeds=[seed], variants=["random negatives"], **flags))
    return {**_run_file("rerank", "random negatives", seed, shift), "protocol": protocol, "arguments": arguments}


def _write(path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))


def _make_page(tmp_path) -> subprocess.CompletedProcess:
    flags = ["--results_dir", str(tmp_path / "results"), "--page", str(tmp_path / "page.md")]
    return subprocess.run(
        [sys.executable, str(PAGE_MAKER), *flags], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )


def _assert_one_line_refusal(completed: subprocess.CompletedProcess, tmp_path, *named: str) -> str:
    assert completed.returncode == 1, completed.stdout + completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("make_results_page: error: "), completed.stderr
    for text in named:
        assert text in lines[0], lines[0]
    assert (tmp_path / "page.md").read_text() == PAGE, "the page was written before the refusal"
    return lines[0]


# ------------------------------------------------------------------------------ one protocol per study


def test_the_runner_refuses_a_seed_on_another_gallery_beside_the_study_s_results(tmp_path, monkeypatch):
    """Seed 0 was scored on 50 images x 5 captions; a seed 1 on 113 images x 1 caption would be averaged with it."""
    seed0 = tmp_path / "results" / "rerank" / "random-negatives_seed0.json"
    _write(seed0, _result(0))
    (tmp_path / "pretrained").mkdir()
    before = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*"))
    flags = ["--study", "rerank", "--variants", "random negatives", "--pretrained", str(tmp_path / "pretrained"),
             "--data_dir", str(tmp_path / "data"), "--cache_dir", str(tmp_path / "regions"),
             "--output_dir", str(tmp_path / "runs"), "--results_dir", str(tmp_path / "results")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["run_ablations.py", *flags, "--seeds", "1", "--eval_images", "113",
                                      "--eval_captions_per_image", "1"])  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(RUNNER), run_name="__main__")
    line = str(stopped.value.code)
    assert line == (
        f"run_ablations: error: --results_dir: {seed0} was scored on {GALLERY_50!r} with --eval_images 50, "
        "--eval_captions_per_image 5; this run would be scored with --eval_images 113, --eval_captions_per_image 1, "
        "and the results page averages a study's runs as one protocol. Give another --results_dir, or that file's "
        "flags."
    )
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*")) == before

    # Another variant fine-tuned with another step count is refused too; the study's own flags are accepted.
    runner = _load("run_ablations")
    common = {"study": "rerank", "pretrained": str(tmp_path / "pretrained"), "output_dir": str(tmp_path / "runs"),
              "results_dir": str(tmp_path / "results"), "seeds": [1]}  # fmt: skip
    other = runner.AblationArguments(**common, variants=["contrastive-mined negatives"], finetune_steps=300)
    with pytest.raises(
        ValueError, match=r"with --finetune_steps 150; this run would be scored with --finetune_steps 300"
    ):
        runner.check_arguments(other)
    runner.check_arguments(runner.AblationArguments(**common, variants=["contrastive-mined negatives"]))


def test_the_page_refuses_a_study_whose_seeds_were_scored_on_different_galleries(tmp_path):
    seed0, seed1 = (tmp_path / "results" / "rerank" / f"random-negatives_seed{seed}.json" for seed in (0, 1))
    _write(seed0, _result(0))
    _write(seed1, _result(1, 2.0, GALLERY_113, eval_images=113, eval_captions_per_image=1))
    (tmp_path / "page.md").write_text(PAGE)
    line = _assert_one_line_refusal(_make_page(tmp_path), tmp_path, str(seed0), str(seed1), GALLERY_50, GALLERY_113)
    assert "--eval_images 50, --eval_captions_per_image 5" in line and "--eval_images 113" in line
    # The table makers, given such runs directly, refuse them as well.
    page_maker = _load("make_results_page")
    runs = [_result(0), _result(1, 2.0, GALLERY_113)]
    for make_table in (page_maker.study_table, page_maker.by_seed_table):
        with pytest.raises(ValueError, match="different protocols"):
            make_table(runs)


def test_the_page_refuses_runs_of_one_gallery_fine_tuned_for_other_step_counts(tmp_path):
    seed0, seed1 = (tmp_path / "results" / "rerank" / f"random-negatives_seed{seed}.json" for seed in (0, 1))
    _write(seed0, _result(0))
    _write(seed1, _result(1, finetune_steps=300))
    (tmp_path / "page.md").write_text(PAGE)
    _assert_one_line_refusal(
        _make_page(tmp_path), tmp_path, str(seed0), str(seed1), "--finetune_steps 150", "--finetune_steps 300"
    )
    # Run files of one protocol fill the table as before.
    _write(seed1, _result(1, 2.0))
    completed = _make_page(tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert f"Scoring: {GALLERY_50}. Recall" in (tmp_path / "page.md").read_text()


# ------------------------------------------------------------------------------ damaged or edited run files


def _edited(edit):
    run = _result(0)
    edit(run)
    return run


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("{not json", "is not valid JSON (line 1, column 2"),
        ("[1, 2]", "holds a JSON list"),
        (_edited(lambda run: run.pop("protocol")), "has no 'protocol' field"),
        (_edited(lambda run: run["metrics"]["cross-encoder"].pop("rsum")), "metrics['cross-encoder'] has no 'rsum'"),
        (
            _edited(lambda run: run["metrics"]["cross-encoder"].update(tr_r1="44.0")),
            "metrics['cross-encoder']['tr_r1'] must be a number, got '44.0'",
        ),
        (
            _edited(lambda run: run["metrics"]["cross-encoder"].update(tr_r1=float("nan"))),
            "metrics['cross-encoder']['tr_r1'] must be a finite number",
        ),
        (
            _edited(lambda run: run["metrics"]["cross-encoder"].update(tr_r1=1e308)),
            "metrics['cross-encoder']['tr_r1'] must be in [0, 100]",
        ),
        (
            _edited(lambda run: run["metrics"]["chance"].update(rsum=600.5)),
            "metrics['chance']['rsum'] must be in [0, 600]",
        ),
        (_edited(lambda run: run.update(seed="1")), "'seed' must be an integer"),
        (_edited(lambda run: run.update(variant="random | negatives")), "'variant' must hold neither '|'"),
        (_edited(lambda run: run["seconds"].update(train="1m")), "seconds['train'] must be a number"),
    ],
    ids=[
        "not_json",
        "list",
        "no_protocol",
        "no_rsum",
        "text_recall",
        "nan",
        "huge",
        "rsum_above_600",
        "text_seed",
        "pipe_in_variant",
        "text_seconds",
    ],  # fmt: skip
)
def test_a_damaged_run_file_is_one_line_naming_the_file_and_the_field(tmp_path, content, field):
    # A sound run file in a table filled first: nothing is written until every file is read.
    _write(tmp_path / "results" / "rerank" / "random-negatives_seed1.json", _result(1))
    damaged = tmp_path / "results" / "stages" / "clean-only_seed0.json"
    _write(damaged, content if isinstance(content, str) else json.dumps({**content, "study": "stages"}))
    (tmp_path / "page.md").write_text(PAGE)
    _assert_one_line_refusal(_make_page(tmp_path), tmp_path, str(damaged), field)


def test_a_damaged_shipped_results_file_is_one_line_naming_the_file_and_the_field(tmp_path):
    shipped = json.loads((PROJECT_ROOT / "docs" / "results" / "pretrain_shared_data.json").read_text())
    shipped["results"]["after stage2-flickr8k"]["ir_r5"] = "55.7"
    _write(tmp_path / "results" / "pretrain_shared_data.json", shipped)
    (tmp_path / "page.md").write_text(PAGE)
    path = tmp_path / "results" / "pretrain_shared_data.json"
    _assert_one_line_refusal(_make_page(tmp_path), tmp_path, str(path), "results['after stage2-flickr8k']['ir_r5']")


# ------------------------------------------------------------------------------ writing a result


class Killed(Exception):
    pass


def test_a_run_killed_while_its_result_is_written_leaves_no_part_of_it(tmp_path, monkeypatch):
    runner = _load("run_ablations")
    monkeypatch.setattr(runner, "ensure_region_caches", lambda args: None)
    figures = _result(0)
    monkeypatch.setattr(
        runner,
        "run_pretraining_variant",
        lambda args, variant, seed: {key: figures[key] for key in ("metrics", "protocol", "seconds", "steps")},
    )
    flags = ["--study", "stages", "--variants", "clean only", "--seeds", "0", "--recipe", str(tmp_path / "recipe"),
             "--results_dir", str(tmp_path / "results"), "--output_dir", str(tmp_path / "runs")]  # fmt: skip

    def killed(descriptor):
        raise Killed

    with monkeypatch.context() as patched:
        patched.setattr(os, "fsync", killed)
        with pytest.raises(Killed):
            runner.main(flags)
    # Neither a truncated result (which the page could not read) nor the run's claim is left behind.
    assert sorted(path.name for path in (tmp_path / "results" / "stages").iterdir()) == []
    [result] = runner.main(flags)
    written = tmp_path / "results" / "stages" / "clean-only_seed0.json"
    assert json.loads(written.read_text()) == result
    assert sorted(path.name for path in written.parent.iterdir()) == [written.name]
