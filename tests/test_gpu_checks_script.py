"""`benchmarks/gpu_checks.sh`, checked where there is no GPU: it parses, it is strict, its steps fit 9 minutes, every
Python entry it calls exists and takes the flags it is given, and without CUDA it skips clearly. The whole script
with tiny CPU settings (`--dry_run`) is the slow test."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_checks.sh"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="no bash")


def _env():
    return {**os.environ, "PYTHON": sys.executable}


def _run(*args, timeout=120):
    return subprocess.run(
        [BASH, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT
    )


def _steps(branch: str) -> list[tuple[str, int, list[str]]]:
    """(label, limit, command) of each `step` of the GPU branch ("cuda") or the dry-run branch ("cpu")."""
    text = SCRIPT.read_text()
    start = text.index(f"DEVICE={branch}")
    end = text.index("else", start) if branch == "cpu" else text.index('echo "=== gpu_checks.sh', start)
    body = text[start:end].replace("\\\n", " ")
    steps = []
    for line in body.splitlines():
        line = line.strip()
        if line.startswith("step "):
            words = shlex.split(line)
            steps.append((words[1], int(words[2]), words[4:]))
    return steps


def test_script_parses_and_is_strict():
    assert subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True).returncode == 0
    text = SCRIPT.read_text()
    assert "set -euo pipefail" in text
    assert "timeout --kill-after=5" in text


def test_gpu_steps_fit_nine_minutes_and_cover_every_quoted_figure():
    steps = _steps("cuda")
    labels = [label for label, _, _ in steps]
    for wanted in ("GPU tests", "pretraining step rate", "MFU", "extraction images/s at batch 64", "loader feeding"):
        assert any(wanted in label for label in labels), (wanted, labels)
    assert any("FSDP" in label for label in labels)
    # Every step at its limit plus the 5 s grace of each kill, and 30 s for the CUDA probe, stay under 9 minutes.
    assert sum(limit + 5 for _, limit, _ in steps) + 30 <= 9 * 60, [(label, limit) for label, limit, _ in steps]
    extraction = next(command for label, _, command in steps if "extraction" in label)
    assert extraction[extraction.index("--batch_size") + 1] == "64"


def test_every_python_entry_exists_and_takes_its_flags():
    entries: dict[str, set[str]] = {}
    for branch in ("cuda", "cpu"):
        for _, _, command in _steps(branch):
            scripts = [word for word in command if word.startswith("benchmarks/") and word.endswith(".py")]
            for script in scripts:
                flags = {word for word in command[command.index(script) + 1 :] if word.startswith("--")}
                entries.setdefault(script, set()).update(flags)
    assert len(entries) == 5, sorted(entries)
    for script in entries:
        assert (ROOT / script).is_file(), script
    # Each entry's argparse in one process: --help prints its options and exits 0.
    code = (
        "import os, runpy, sys\n"
        "for script in sys.argv[1:]:\n"
        "    sys.argv = [script, '--help']\n"
        "    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script` would\n"
        "    try:\n"
        "        runpy.run_path(script, run_name='__main__')\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code in (0, None), (script, exit.code)\n"
        "    print('=== END', script, flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *entries],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    helps = re.split(r"=== END (\S+)\n", result.stdout)
    by_script = {helps[i + 1]: helps[i] for i in range(0, len(helps) - 1, 2)}
    for script, flags in entries.items():
        for flag in flags:
            assert flag in by_script[script], f"{script} --help does not list {flag}"


def test_unknown_argument_is_refused():
    result = _run("--bogus", timeout=30)
    assert result.returncode == 2 and "usage" in result.stderr and "--bogus" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without CUDA")
def test_skips_clearly_without_cuda():
    result = _run()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("SKIP: no CUDA device here; no GPU figure was measured")


@pytest.mark.slow
def test_dry_run_runs_every_step_on_the_cpu():
    result = _run("--dry_run", timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "=== all steps passed" in result.stdout
    for label, _, _ in _steps("cpu"):
        assert f"=== {label}: done" in result.stdout, label
