"""What the results page maker, the benchmark runner and the grid-region generator refuse before writing or running
anything: a results folder that is missing or holds no run file, a missing page, an unknown benchmark name, an empty
output folder. Only the argument handling runs here, never a study or a benchmark."""

import importlib.util
import json
import subprocess
import sys

import pytest

from .test_ablations import _load, _run_file
from .testing_utils import PROJECT_ROOT


PAGE_MAKER = PROJECT_ROOT / "examples" / "ablations" / "make_results_page.py"
RUN_ALL = PROJECT_ROOT / "benchmarks" / "run_all.py"
SHIPPED_PAGE = PROJECT_ROOT / "docs" / "results.md"


def _run(script, *arguments, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *arguments], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def _page_copy(tmp_path):
    page = tmp_path / "results.md"
    page.write_text(SHIPPED_PAGE.read_text(encoding="utf-8"), encoding="utf-8")
    return page


@pytest.mark.parametrize(
    ("results_dir", "named"),
    [
        ("missing", "does not exist"),
        ("empty", "holds no run file"),
        ("run_file", "is a file"),
        ("", "must be a non-empty path"),
    ],
)
def test_a_results_folder_without_runs_leaves_the_page_as_it_was(tmp_path, results_dir, named):
    (tmp_path / "empty" / "rerank").mkdir(parents=True)
    (tmp_path / "run_file").write_text(json.dumps(_run_file("rerank", "random negatives", 0, 0.0)))
    page = _page_copy(tmp_path)
    flag = str(tmp_path / results_dir) if results_dir else ""
    completed = _run(PAGE_MAKER, "--results_dir", flag, "--page", str(page), cwd=tmp_path)
    assert completed.returncode == 1, completed.stdout
    assert completed.stderr.startswith("make_results_page: error: --results_dir ") and named in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr
    assert page.read_text(encoding="utf-8") == SHIPPED_PAGE.read_text(encoding="utf-8")


def test_a_missing_page_is_one_line_naming_the_flag(tmp_path):
    completed = _run(PAGE_MAKER, "--page", str(tmp_path / "missing.md"), cwd=tmp_path)
    assert completed.returncode == 1
    assert completed.stderr.strip() == (
        f"make_results_page: error: --page {tmp_path / 'missing.md'} does not exist; "
        "expected the markdown page that holds the text around the tables."
    )
    assert not (tmp_path / "missing.md").exists()


def test_the_default_results_folder_is_the_checkout_s_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page = _page_copy(tmp_path)
    assert _load("make_results_page").main(["--page", str(page)]) == SHIPPED_PAGE.read_text(encoding="utf-8")


def _runner(monkeypatch):
    """benchmarks/run_all.py as a module, with every benchmark it would start recorded instead of run."""
    spec = importlib.util.spec_from_file_location("bench_run_all", RUN_ALL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    started = []

    def record(command, **kwargs):
        started.append(command[-1].rsplit("/", 1)[-1])
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(module.subprocess, "run", record)
    return module, started


def test_an_unknown_benchmark_name_lists_the_known_ones_and_runs_nothing(monkeypatch, capsys):
    runner, started = _runner(monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        runner.main(["model", "modle"])
    assert stopped.value.code == 2 and started == []
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: unknown benchmark modle; expected some of: butd, cli, " in last, last
    assert "length_grouping, loader, model, pretraining" in last


def test_the_benchmark_runner_names_a_subset_or_runs_them_all(monkeypatch):
    runner, started = _runner(monkeypatch)
    assert runner.main(["model", "cli"]) == 0 and started == ["bench_cli.py", "bench_model.py"]
    started.clear()
    assert runner.main([]) == 0  # `make bench` passes no name
    assert started == sorted(path.name for path in RUN_ALL.parent.glob("bench_*.py")) and len(started) > 2


def test_the_benchmark_runner_prints_its_usage():
    completed = _run(RUN_ALL, "--help")
    assert completed.returncode == 0 and completed.stdout.startswith("usage: run_all.py")
    assert "length_grouping" in completed.stdout and "===" not in completed.stdout


@pytest.mark.parametrize("output_dir", ["", "a_file"])
def test_grid_regions_refuse_an_empty_or_file_output_folder_before_writing(tmp_path, monkeypatch, output_dir):
    import imagebert_hf.data.synthetic

    def never(*args, **kwargs):
        raise AssertionError("the manifest was written before the output folder was checked")

    monkeypatch.setattr(imagebert_hf.data.synthetic, "write_synthetic_manifest", never)
    monkeypatch.chdir(tmp_path)
    if output_dir:
        (tmp_path / output_dir).write_text("")
    with pytest.raises(SystemExit) as stopped:
        _load("synthetic_grid_regions").main(["--output_dir", output_dir])
    expected = (
        f"--output_dir {output_dir} is a file; expected a folder (created when missing)."
        if output_dir
        else "--output_dir must be a non-empty path, got ''."
    )
    assert stopped.value.code == f"synthetic_grid_regions: error: {expected}"
    assert sorted(path.name for path in tmp_path.iterdir()) == ([output_dir] if output_dir else [])
