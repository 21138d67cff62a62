"""One task's loss for groups of runs in one figure: e.g. the seeds of a recipe before and after a change.

    python examples/plot_loss_curves.py --group "6 epochs" run_a/results.json run_b/results.json \
        --group "10 epochs" run_c/results.json --task itm --output itm_curves.png

Each file is a JSON with a `history` list (the `results.json` of examples/pretrain_shared_data.py, or the
`trainer_state.json` of a stage folder). Exits 1 with one line on stderr when a file or flag is wrong.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def read_history(path: str) -> list[dict]:
    """The `history` list of a run file, checked to be a list of logged steps."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read run file {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"run file {path} is not JSON ({error.msg} at line {error.lineno})") from None
    history = data.get("history") if isinstance(data, dict) else None
    if not isinstance(history, list) or not all(isinstance(entry, dict) and "step" in entry for entry in history):
        raise ValueError(f"run file {path} has no 'history' list of logged steps (each a dict with 'step').")
    return history


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--group", nargs="+", action="append", required=True, metavar=("LABEL", "RUN_FILE"),
        help="A label, then the run files of that group (repeat the flag for each group).",
    )  # fmt: skip
    parser.add_argument("--task", default="itm", help="The loss to plot: itm, mlm, moc, mrfr or loss (the total).")
    parser.add_argument("--smoothing", type=int, default=25, help="Moving average width, in logged steps.")
    parser.add_argument("--output", required=True, help="The PNG to write.")
    parser.add_argument("--title", default=None, help="Figure title.")
    return parser.parse_args(argv)


def output_path(output: str) -> Path:
    """The PNG that `--output` names, as it will be written (matplotlib adds `.png` to a name without a suffix);
    raises ValueError when it is a folder or lies under a file."""
    path = Path(output)
    if not output.strip():
        raise ValueError(f"--output must be the path of a PNG file, got {output!r}.")
    if path.is_dir():
        raise ValueError(f"--output {output} is a folder; expected the path of a PNG file.")
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    if path.is_dir():
        raise ValueError(f"--output {output}: {path} is a folder; expected the path of a PNG file.")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"--output {output}: {parent} is a file, not a folder.")
    return path


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    from imagebert_hf.training.plots import plot_run_groups

    try:
        output = output_path(args.output)
        groups = {}
        for label, *files in args.group:
            if not files:
                raise ValueError(f"--group {label!r} names no run file; expected a label, then one or more files.")
            groups[label] = [read_history(path) for path in files]
        if args.smoothing < 1:
            raise ValueError(f"--smoothing must be at least 1, got {args.smoothing}.")
        reference = {"ln 2 (chance)": math.log(2)} if args.task == "itm" else None
        path = plot_run_groups(groups, output, args.task, args.smoothing, reference, args.title)
    except OSError as error:  # the folder cannot be made or the file written
        print(
            f"plot_loss_curves: error: cannot write --output {args.output}: {error.strerror or error}", file=sys.stderr
        )
        sys.exit(1)
    except ValueError as error:
        print(f"plot_loss_curves: error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
