"""`imagebert-curate` never writes among its inputs nor deletes what it did not create: an output folder that is an
input, lies inside one or contains one is refused before anything is read or written; a user's `curation-*` folder
or `data/` folder survives; an empty input or output path and inputs that yield not a single page end with one line
and leave an earlier run's output as it was. `examples/train_curation_models.py` checks every flag up front."""

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagebert_hf.curation import run_local, synthetic
from imagebert_hf.curation.cli import main
from imagebert_hf.curation.pipeline import WORK_MARKER, NoPagesError

from .test_curation_cli_inputs import LENIENT, _snapshot
from .testing_utils import PROJECT_ROOT, require_module


pytestmark = [require_module("resiliparse"), require_module("wordfreq")]

PROGRAM = "imagebert-curate: error: "


def _saved_site(folder: Path) -> Path:
    """A saved HTML page with its photo under `folder/images`."""
    (folder / "images").mkdir(parents=True)
    pixels = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(folder / "images" / "walk.jpg", quality=85)
    page = synthetic.page_html(
        "Walk", "images/walk.jpg", alt="A man walking a dog in the park", paragraphs=synthetic.FILLER_PARAGRAPHS[:3]
    )
    (folder / "walk.html").write_text(page)
    return folder


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """A crawl folder and the output of a successful run on it."""
    root = tmp_path_factory.mktemp("earlier")
    site = _saved_site(root / "site")
    out = root / "out"
    assert main(["--inputs", str(site), "--output_dir", str(out), *LENIENT]) == 0
    return site, out, _snapshot(out)


def _refused(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = str(stop.value.code)
    assert message.startswith(PROGRAM) and "\n" not in message, message
    return message


# (name, inputs relative to the crawl root, output relative to it, what the line says)
OVERLAPS = [
    ("output-is-the-input-with-a-data-folder", ["crawl"], "crawl", "is the input"),
    ("output-is-the-input-with-a-curation-folder", ["crawl"], "crawl", "is the input"),
    ("output-inside-the-input", ["crawl"], "crawl/lait", "is inside the input"),
    ("output-contains-the-input", ["crawl/curation-2024"], "crawl", "contains the input"),
    ("output-contains-a-pattern-match", ["crawl/*/*.html"], "crawl", "contains the input"),
    ("output-is-the-input-by-another-path", ["crawl/../crawl/"], "crawl", "is the input"),
]


@pytest.mark.parametrize(("name", "inputs", "output", "says"), OVERLAPS, ids=[case[0] for case in OVERLAPS])
def test_an_output_among_the_inputs_is_refused_and_the_inputs_stay(tmp_path, name, inputs, output, says):
    crawl = tmp_path / "crawl"
    _saved_site(crawl / ("data" if "data" in name else "curation-2024"))
    before = _snapshot(tmp_path)
    message = _refused(
        ["--inputs", *(str(tmp_path / item) for item in inputs), "--output_dir", str(tmp_path / output), *LENIENT]
    )
    assert f"--output_dir {tmp_path / output} {says}" in message and "apart from the inputs" in message, message
    assert _snapshot(tmp_path) == before
    with pytest.raises(ValueError, match=f"output_dir .* {says}"):
        run_local([str(tmp_path / item) for item in inputs], tmp_path / output)
    assert _snapshot(tmp_path) == before


def test_a_users_folders_in_the_output_survive_a_run(earlier_run, tmp_path):
    site, _, _ = earlier_run
    out = tmp_path / "out"
    (out / "curation-notes").mkdir(parents=True)
    (out / "curation-notes" / "n.txt").write_text("important")
    (out / ".data.tmp-notes").mkdir()
    (out / ".data.tmp-notes" / "m.txt").write_text("mine")
    # What a killed run leaves: its marked work folder, and the unpublished data folder that marker names.
    (out / "curation-work-old").mkdir()
    (out / ".data.tmp-1-0123abcd").mkdir()
    (out / ".data.tmp-1-0123abcd" / "part-00000-of-00001.parquet").write_bytes(b"x")
    marker = {"tool": "imagebert-curate", "data_tmp": ".data.tmp-1-0123abcd"}
    (out / "curation-work-old" / WORK_MARKER).write_text(json.dumps(marker))
    assert main(["--inputs", str(site), "--output_dir", str(out), *LENIENT]) == 0
    assert (out / "curation-notes" / "n.txt").read_text() == "important"
    assert (out / ".data.tmp-notes" / "m.txt").read_text() == "mine"
    assert not (out / "curation-work-old").exists() and not (out / ".data.tmp-1-0123abcd").exists()
    assert sorted(path.name for path in out.iterdir()) == [
        ".data.tmp-notes",
        "config.json",
        "curation-notes",
        "data",
        "funnel.json",
        "funnel.md",
        "funnel.png",
    ]


def test_a_data_folder_the_runs_did_not_write_is_refused(earlier_run, tmp_path):
    site, _, _ = earlier_run
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "notes.txt").write_text("mine")
    before = _snapshot(out)
    message = _refused(["--inputs", str(site), "--output_dir", str(out), *LENIENT])
    assert "--output_dir" in message and "'notes.txt'" in message and "no curation run wrote" in message, message
    assert _snapshot(out) == before


def test_an_empty_input_is_one_line(earlier_run, tmp_path):
    site, out, snapshot = earlier_run
    message = _refused(["--inputs", str(site), "", "--output_dir", str(out), *LENIENT])
    assert "--inputs: input 2 of 2 is an empty string" in message, message
    assert _snapshot(out) == snapshot


def test_an_empty_output_dir_writes_nothing_in_the_current_folder(earlier_run, tmp_path, monkeypatch):
    site, _, _ = earlier_run
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    message = _refused(["--inputs", str(site), "--output_dir", "", *LENIENT])
    assert "--output_dir must be a non-empty path, got ''" in message, message
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == ["data", "data/keep.txt"]
    with pytest.raises(ValueError, match="output_dir must be a non-empty path"):
        run_local([str(site)], "")
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == ["data", "data/keep.txt"]


def test_inputs_without_a_single_page_end_with_the_counts_and_keep_the_earlier_output(earlier_run, tmp_path):
    _, out, snapshot = earlier_run
    (tmp_path / "t.warc").write_bytes(b"abc")
    (tmp_path / "e.warc").write_bytes(b"")
    message = _refused(["--inputs", str(tmp_path / "t.warc"), str(tmp_path / "e.warc"), "--output_dir", str(out)])
    assert "no input yielded a single page" in message and "file/not_a_warc_file: 1" in message, message
    assert "file/empty_file: 1" in message, message
    assert _snapshot(out) == snapshot
    # Into a new folder: nothing is left behind, not even the folder.
    with pytest.raises(NoPagesError) as info:
        run_local([str(tmp_path / "t.warc")], tmp_path / "new" / "out", require_pages=True)
    assert info.value.tally.get_count("read", "file", "not_a_warc_file") == 1
    assert not (tmp_path / "new").exists()


def test_an_output_inside_an_input_is_refused_when_given_from_home(tmp_path, monkeypatch):
    """The runner writes to the output folder with `~` expanded, so the comparison with the inputs expands it too."""
    monkeypatch.setenv("HOME", str(tmp_path))
    crawl = tmp_path / "crawl"
    _saved_site(crawl / "data")
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"output_dir ~/crawl/out is inside the input .*crawl"):
        run_local([str(crawl)], "~/crawl/out")
    assert _snapshot(tmp_path) == before


@require_module("pyspark")
def test_the_spark_runner_refuses_an_output_among_the_inputs_before_starting(tmp_path, monkeypatch):
    from imagebert_hf.curation import spark

    def no_session(*args, **kwargs):
        raise AssertionError("a session was started")

    monkeypatch.setattr(spark, "local_spark_session", no_session)
    crawl = tmp_path / "crawl"
    _saved_site(crawl / "data")
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"output_dir .*crawl is the input"):
        spark.run_spark([str(crawl)], crawl)
    with pytest.raises(ValueError, match=r"output_dir .*crawl/lait is inside the input"):
        spark.run_spark([f"file://{crawl}"], f"file://{crawl}/lait")
    with pytest.raises(ValueError, match=r"output_dir must be a non-empty path"):
        spark.run_spark([str(crawl)], "")
    (tmp_path / "out" / "data").mkdir(parents=True)
    (tmp_path / "out" / "data" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds 'notes.txt' that no curation run wrote"):
        spark.run_spark([str(crawl)], tmp_path / "out")
    assert _snapshot(tmp_path) == {**before, "out/data/notes.txt": b"mine"}


# ------------------------------------------------------------------------------------- train_curation_models.py

TRAIN_SCRIPT = PROJECT_ROOT / "examples" / "train_curation_models.py"


def _captioned_folder(folder: Path, count: int = 2) -> Path:
    (folder / "images").mkdir(parents=True)
    lines = []
    for index in range(count):
        pixels = (np.random.default_rng(index).random((64, 64, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / "images" / f"{index}.jpg")
        lines.append(json.dumps({"image": f"images/{index}.jpg", "captions": [f"A dog number {index}."]}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


TRAIN_CASES = [
    ("data-dir-missing", ["--data_dir", "{tmp}/nonexist"], "--data_dir '{tmp}/nonexist': no such folder"),
    ("data-dir-a-file", ["--data_dir", "{tmp}/afile"], "--data_dir '{tmp}/afile': not a folder"),
    ("data-dir-no-captions", ["--data_dir", "{tmp}/empty"], "--data_dir {tmp}/empty: no captions.jsonl"),
    ("eval-dir-missing", ["--eval_dir", "{tmp}/nonexist"], "--eval_dir '{tmp}/nonexist': no such folder"),
    ("num-graphics-negative", ["--num_graphics", "-1"], "--num_graphics must be >= 1, got -1"),
    ("num-graphics-zero", ["--num_graphics", "0"], "--num_graphics must be >= 1, got 0"),
    ("relevance-c-nan", ["--relevance_c", "nan"], "--relevance_c must be a finite number, got nan"),
    ("relevance-c-zero", ["--relevance_c", "0"], "--relevance_c must be positive, got 0.0"),
    ("seed-negative", ["--seed", "-1"], "--seed must be >= 0, got -1"),
    ("output-a-file", ["--output_dir", "{tmp}/afile"], "--output_dir {tmp}/afile is a file"),
    ("output-empty", ["--output_dir", ""], "--output_dir must be a non-empty path, got ''"),
]


@pytest.mark.parametrize(("flags", "says"), [case[1:] for case in TRAIN_CASES], ids=[case[0] for case in TRAIN_CASES])
def test_train_curation_models_checks_every_flag_first(tmp_path, monkeypatch, flags, says):
    import imagebert_hf.curation.fitting as fitting

    def never(*args, **kwargs):
        raise AssertionError("an image was read before the flags were checked")

    monkeypatch.setattr(fitting, "load_captioned_images", never)
    data = _captioned_folder(tmp_path / "data")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    argv = {"--data_dir": str(data), "--output_dir": str(tmp_path / "models")}
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    argv.update(dict(zip(flags[::2], flags[1::2])))
    monkeypatch.setattr(sys, "argv", ["train_curation_models.py", *(item for pair in argv.items() for item in pair)])
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")
    message = str(stop.value.code)
    assert message.startswith(f"train_curation_models: error: {says.replace('{tmp}', str(tmp_path))}"), message
    assert "\n" not in message, message
    assert _snapshot(tmp_path) == before and not (tmp_path / "models").exists()


def test_train_curation_models_writes_nothing_when_a_model_cannot_train(tmp_path, monkeypatch):
    data = _captioned_folder(tmp_path / "data", count=1)
    argv = ["--data_dir", str(data), "--output_dir", str(tmp_path / "models"), "--num_graphics", "2"]
    monkeypatch.setattr(sys, "argv", ["train_curation_models.py", *argv])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")
    assert str(stop.value.code).startswith("train_curation_models: error: --data_dir ") and "at least 2" in str(
        stop.value.code
    )
    assert not (tmp_path / "models").exists()
