"""The run-group loss figure and its script: groups of runs drawn from their `history`, bad files named."""

import json
import math
import runpy

import pytest

from imagebert_hf.training.plots import plot_run_groups

from .testing_utils import PROJECT_ROOT


SCRIPT = PROJECT_ROOT / "examples" / "plot_loss_curves.py"


def _history(escape_step: int, steps: int = 300) -> list[dict]:
    return [
        {"step": step, "stage": "s", "itm": math.log(2) if step < escape_step else 0.4, "mlm": 5.0}
        for step in range(5, steps + 1, 5)
    ]


def _write(tmp_path, name, payload):
    path = tmp_path / name
    path.write_text(json.dumps(payload))
    return str(path)


def test_plot_run_groups_writes_a_png_with_one_line_per_run(tmp_path):
    groups = {"before": [_history(200), _history(250)], "after": [_history(60)]}
    path = plot_run_groups(groups, tmp_path / "itm.png", reference_lines={"ln 2": math.log(2)}, smoothing=5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_run_groups_names_the_run_without_the_task(tmp_path):
    with pytest.raises(ValueError, match=r"run 1 of group 'before' logs no 'itm' loss"):
        plot_run_groups({"before": [_history(100), [{"step": 5, "mlm": 1.0}]]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one group"):
        plot_run_groups({}, tmp_path / "x.png")


def test_script_reads_results_and_trainer_state_files(tmp_path, capsys):
    before = _write(tmp_path, "results.json", {"results": {}, "history": _history(200)})
    after = _write(tmp_path, "trainer_state.json", {"completed_steps": 300, "history": _history(50)})
    output = tmp_path / "figures" / "itm.png"
    main = runpy.run_path(str(SCRIPT))["main"]
    assert main(["--group", "before", before, "--group", "after", after, "--output", str(output)]) == output
    assert output.is_file() and "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "payload, expected",
    [
        ("{not json", "is not JSON"),
        ({"results": {}}, "has no 'history' list"),
        ({"history": [1, 2]}, "has no 'history' list"),
        ([], "has no 'history' list"),
    ],
)
def test_script_exits_1_naming_a_bad_run_file(tmp_path, capsys, payload, expected):
    path = tmp_path / "run.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    main = runpy.run_path(str(SCRIPT))["main"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--group", "a", str(path), "--output", str(tmp_path / "x.png")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and expected in err


def test_script_exits_1_on_a_missing_file_or_an_empty_group(tmp_path, capsys):
    main = runpy.run_path(str(SCRIPT))["main"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--group", "a", str(tmp_path / "missing.json"), "--output", str(tmp_path / "x.png")])
    assert exit_info.value.code == 1 and "cannot read run file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--group", "lonely", "--output", str(tmp_path / "x.png")])
    assert exit_info.value.code == 1 and "names no run file" in capsys.readouterr().err
