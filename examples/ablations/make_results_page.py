"""Fills the tables of docs/results.md from the run files that `run_ablations.py` wrote (docs/results/).

    python examples/ablations/make_results_page.py

Each table sits between `<!-- results:TABLE -->` and `<!-- /results:TABLE -->` in the page, TABLE the folder of its
run files under docs/results/ (a study's name, or a kept earlier series such as `rerank_six_epochs`); the text around
the markers is left as written. `<!-- results:shipped -->` takes `docs/results/pretrain_shared_data.json`, the
`results.json` of `examples/pretrain_shared_data.py` (with the command that made it). A table gives, per variant and ranking, the mean and standard deviation over the seeds
found, the scoring protocol, the seeds, and the minutes one run took here. `<!-- results:TABLE_by_seed -->` takes
each variant's RSUM minus the study's first variant's, seed by seed.

The defaults, `docs/results/` and `docs/results.md`, are those of this checkout, whatever the working directory.
A missing or empty `--results_dir` or a missing `--page` exits 1 with one line on stderr before the page is written:
a mistyped folder would otherwise replace every table by "no runs yet". So does a run file that is not JSON, lacks a
field the tables show or holds one of the wrong type or out of range (a recall outside [0, 100], an RSUM outside
[0, 600]), naming the file and the field; and a table whose run files were scored on different protocols (gallery,
captions per image, or a flag that decides the figures), naming two of them and both protocols: its mean over
seeds would mix two galleries.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from imagebert_hf.formats.files import read_json_file
from imagebert_hf.models.imagebert.configuration_imagebert import SEED_RULE, check_field
from imagebert_hf.models.imagebert.script_errors import exit_on_error


ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum")
HEADERS = ("TR R@1", "TR R@5", "TR R@10", "IR R@1", "IR R@5", "IR R@10", "RSUM")


RUN_FILE = "a run file of run_ablations.py, as a JSON object"
SHIPPED_FILE = "the results.json of examples/pretrain_shared_data.py, as a JSON object"


def load_runs(results_dir: Path) -> dict[str, list[dict]]:
    """Run files by table, in a stable order, each checked (`check_run_file`) and each table's on one protocol
    (`check_one_protocol`). The folder a run file sits in names its table: the study's own (`rerank`), or a kept
    earlier series of it (`rerank_six_epochs`, started from another checkpoint)."""
    files = defaultdict(list)
    for path in sorted(results_dir.glob("*/*.json")):
        files[path.parent.name].append((path, check_run_file(path, read_json_file(path, RUN_FILE))))
    for table, runs in files.items():
        check_one_protocol(table, runs)
    return {table: [run for _, run in runs] for table, runs in files.items()}


def check_number(path: Path, name: str, value, kind: str = "float", low=None, high=None) -> None:
    """`check_field` naming the file and the field, its type errors raised as ValueError (one line on exit)."""
    try:
        check_field(f"{path}: {name}", value, kind, low, high)
    except TypeError as error:
        raise ValueError(str(error)) from None


def check_text(path: Path, name: str, value, cell: bool = False) -> None:
    """Raises ValueError unless `value` is a non-empty string; one shown in a table cell (`cell`) may hold neither
    `|` nor a line break, which would cut the markdown table."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}: {name} must be a non-empty string, got {value!r}.")
    if cell and ("|" in value or "\n" in value or "\r" in value):
        raise ValueError(f"{path}: {name} must hold neither '|' nor a line break (a table cell), got {value!r}.")


def check_metrics(path: Path, name: str, metrics) -> None:
    """A ranking's recall: every column of the tables, a finite percentage; RSUM, the sum of six, in [0, 600]."""
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: {name} must be an object of {list(COLUMNS)}, got {metrics!r}.")
    for column in COLUMNS:
        if column not in metrics:
            raise ValueError(f"{path}: {name} has no {column!r}; expected {list(COLUMNS)}.")
        check_number(path, f"{name}[{column!r}]", metrics[column], "float", 0, 600 if column == "rsum" else 100)


def check_seconds(path: Path, seconds, allow_unknown: bool) -> None:
    if not isinstance(seconds, dict):
        raise ValueError(f"{path}: 'seconds' must be an object of durations, got {seconds!r}.")
    for key, value in seconds.items():
        if not (allow_unknown and value is None):
            check_number(path, f"seconds[{key!r}]", value, "float", 0, None)


def check_run_file(path: Path, run) -> dict:
    """`run`, the content of the run file `path`, once every field the tables read is there, of its type and in
    range; raises ValueError naming the file and the field otherwise."""
    if not isinstance(run, dict):
        raise ValueError(f"{path} holds a JSON {type(run).__name__}; expected {RUN_FILE}.")
    for key in ("study", "variant", "seed", "command", "date", "protocol", "metrics", "seconds"):
        if key not in run:
            raise ValueError(f"{path} has no {key!r} field; expected {RUN_FILE}.")
    for key in ("study", "command", "date", "protocol"):
        check_text(path, repr(key), run[key])
    check_text(path, "'variant'", run["variant"], cell=True)
    check_number(path, "'seed'", run["seed"], *SEED_RULE)
    metrics = run["metrics"]
    if not isinstance(metrics, dict) or not any(way != "chance" for way in metrics):
        raise ValueError(
            f"{path}: 'metrics' must be an object of recall per ranking (not chance alone), got {metrics!r}."
        )
    for way, recall in metrics.items():
        check_text(path, f"metrics key {way!r}", way, cell=True)
        check_metrics(path, f"metrics[{way!r}]", recall)
    check_seconds(path, run["seconds"], allow_unknown=True)
    if not isinstance(run.get("arguments", {}), dict):
        raise ValueError(f"{path}: 'arguments' must be an object of the run's flags, got {run['arguments']!r}.")
    return run


def check_one_protocol(table: str, runs: list[tuple[Path, dict]]) -> None:
    """Refuses a table whose run files were scored on different protocols: their `protocol` (the gallery and the
    captions per image), or a flag of `run_ablations.RESULT_FLAGS` that both record, differs. One row averages the
    seeds of a variant, and the seed-by-seed table subtracts variants: figures of two galleries do not mix. Every
    pair is compared, as a run file of an earlier version may lack the flags."""
    for index, (path, run) in enumerate(runs):
        for earlier_path, earlier in runs[:index]:
            if run["study"] != earlier["study"]:
                raise ValueError(
                    f"{table}: {earlier_path} is a run of {earlier['study']!r}, {path} of {run['study']!r}; one "
                    "folder holds the runs of one study."
                )
            differing = runner_module().differing_flags(
                run["study"], earlier.get("arguments", {}), run.get("arguments", {})
            )
            if run["protocol"] != earlier["protocol"] or differing:
                raise ValueError(
                    f"{table}: {earlier_path} was scored on {describe_protocol(earlier, differing)}, {path} on "
                    f"{describe_protocol(run, differing)}; one table would average the two. Keep the runs of one "
                    "protocol in one folder (another protocol's in a folder, and a table, of its own)."
                )


def describe_protocol(run: dict, flags: list[str]) -> str:
    text = repr(run["protocol"])
    if flags:
        text += " with " + runner_module().protocol_flags(run["study"], run["arguments"], flags)
    return text


def runner_module():
    """`run_ablations.py`, the file beside this one, however this one was loaded."""
    runner = sys.modules.get("run_ablations")
    if runner is None:
        spec = importlib.util.spec_from_file_location("run_ablations", Path(__file__).with_name("run_ablations.py"))
        runner = importlib.util.module_from_spec(spec)
        sys.modules["run_ablations"] = runner  # its dataclasses look their module up while it loads
        spec.loader.exec_module(runner)
    return runner


def study_variants(study: str) -> list[str]:
    """`run_ablations.study_variants`."""
    return runner_module().study_variants(study)


def check_shipped_file(path: Path, summary) -> dict:
    """`summary`, the content of `pretrain_shared_data.json`, once the fields its table reads are there and of
    their type; raises ValueError naming the file and the field otherwise."""
    if not isinstance(summary, dict):
        raise ValueError(f"{path} holds a JSON {type(summary).__name__}; expected {SHIPPED_FILE}.")
    for key in ("results", "seconds", "steps_per_stage"):
        if key not in summary:
            raise ValueError(f"{path} has no {key!r} field; expected {SHIPPED_FILE}.")
    if not isinstance(summary["results"], dict) or not summary["results"]:
        raise ValueError(f"{path}: 'results' must be an object of recall per model, got {summary['results']!r}.")
    for name, metrics in summary["results"].items():
        check_text(path, f"results key {name!r}", name, cell=True)
        check_metrics(path, f"results[{name!r}]", metrics)
    check_seconds(path, summary["seconds"], allow_unknown=False)
    steps = summary["steps_per_stage"]
    if not isinstance(steps, list) or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in steps):
        raise ValueError(f"{path}: 'steps_per_stage' must be a list of step counts, got {steps!r}.")
    for key in ("protocol", "command", "note"):
        if key in summary:
            check_text(path, repr(key), summary[key])
    if "seed" in summary:
        check_number(path, "'seed'", summary["seed"], *SEED_RULE)
    return summary


def variant_rank(study: str, variant: str) -> tuple[int, str]:
    """Where a variant stands in its study's list (`run_ablations.study_variants`), unknown ones last by name."""
    try:
        order = study_variants(study)
    except ValueError:
        order = []
    return (order.index(variant) if variant in order else len(order), variant)


def single_protocol(runs: list[dict]) -> str:
    """The protocol every run of a table was scored on; `load_runs` names the files that differ, and runs given to
    the table makers directly are refused as well."""
    protocols = sorted({run["protocol"] for run in runs})
    if len(protocols) > 1:
        raise ValueError(f"the runs of one table were scored on different protocols, {protocols}; not averaged.")
    return protocols[0]


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def study_table(runs: list[dict]) -> str:
    """A markdown table of one study: one row per (variant, ranking), in the order the runs name them."""
    by_variant = defaultdict(list)
    for run in sorted(runs, key=lambda run: variant_rank(run["study"], run["variant"])):
        by_variant[run["variant"]].append(run)
    lines = [f"Scoring: {single_protocol(runs)}. Recall in %, mean ± standard deviation over seeds.", ""]
    lines.append("| variant | ranking | seeds | " + " | ".join(HEADERS) + " | minutes per run |")
    lines.append("|---|---|---|" + "---|" * len(HEADERS) + "---|")
    chance_row = None
    for variant, variant_runs in by_variant.items():
        seeds = ", ".join(str(run["seed"]) for run in sorted(variant_runs, key=lambda r: r["seed"]))
        timed = [sum(run["seconds"].values()) / 60 for run in variant_runs if None not in run["seconds"].values()]
        minutes = f"{statistics.mean(timed):.1f}" if timed else "n/a"
        for way in variant_runs[0]["metrics"]:
            if way == "chance":
                chance_row = variant_runs[0]["metrics"]["chance"]
                continue
            cells = [mean_std([run["metrics"][way][column] for run in variant_runs]) for column in COLUMNS]
            lines.append(f"| {variant} | {way} | {seeds} | " + " | ".join(cells) + f" | {minutes} |")
    if chance_row is not None:
        lines.append("| chance | random ranking | | " + " | ".join(f"{chance_row[c]:.1f}" for c in COLUMNS) + " | |")
    commands = sorted({run["command"] for run in runs})
    lines += ["", "Command" + ("s" if len(commands) > 1 else "") + ": " + "; ".join(f"`{c}`" for c in commands)]
    dates = sorted({run["date"] for run in runs})
    lines.append(f"Run on {', '.join(dates)}; {len(runs)} runs.")
    return "\n".join(lines)


def by_seed_table(runs: list[dict], column: str = "rsum") -> str | None:
    """Seed-by-seed differences from the study's first variant, for studies whose variants share their seeds.

    A seed fixes what a run draws (initialisation, data order, masking) the same way for every variant, so the
    difference between two variants at one seed leaves out the part of the spread that belongs to the seed. None
    for a study of one variant, or when its variants share fewer than two seeds. Variants that lack the baseline's
    ranking are left out.
    """
    single_protocol(runs)
    by_variant = defaultdict(dict)
    for run in sorted(runs, key=lambda run: variant_rank(run["study"], run["variant"])):
        by_variant[run["variant"]][run["seed"]] = run
    baseline, *others = by_variant
    seeds = sorted(set.intersection(*(set(seeded) for seeded in by_variant.values())))
    if not others or len(seeds) < 2:
        return None
    way = next(way for way in by_variant[baseline][seeds[0]]["metrics"] if way != "chance")
    header = HEADERS[COLUMNS.index(column)]
    lines = [
        f"{header} ({way}) of each variant minus that of `{baseline}` at the same seed.",
        "",
        "| variant | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean ± std |",
        "|---|" + "---|" * len(seeds) + "---|",
    ]
    for variant in others:
        if any(way not in by_variant[variant][seed]["metrics"] for seed in seeds):
            continue
        gaps = [
            by_variant[variant][seed]["metrics"][way][column] - by_variant[baseline][seed]["metrics"][way][column]
            for seed in seeds
        ]
        mean, std = statistics.mean(gaps), statistics.stdev(gaps)
        lines.append(f"| {variant} | " + " | ".join(f"{gap:+.1f}" for gap in gaps) + f" | {mean:+.1f} ± {std:.1f} |")
    return "\n".join(lines)


def shipped_recipe_table(summary: dict) -> str:
    """The table of `examples/pretrain_shared_data.py`'s `results.json` (copied to `docs/results/`)."""
    lines = []
    if "protocol" in summary:
        run = f"one run (seed {summary['seed']})" if "seed" in summary else "one run"
        lines += [f"Scoring: {summary['protocol']}. Recall in %, {run}.", ""]
    lines += ["| model | " + " | ".join(HEADERS) + " |", "|---|" + "---|" * len(HEADERS)]
    for name, metrics in summary["results"].items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[c]:.1f}" for c in COLUMNS) + " |")
    seconds = ", ".join(f"{key} {value / 60:.1f}" for key, value in summary["seconds"].items())
    lines += ["", f"Minutes: {seconds}. Steps per stage: {summary['steps_per_stage']}."]
    if "command" in summary:
        lines.append(f"Command: `{summary['command']}`")
    if "note" in summary:
        lines.append(summary["note"])
    return "\n".join(lines)


def fill_page(page: str, tables: dict[str, str]) -> str:
    """The page with the block between each study's markers replaced by its table (a study without runs says so)."""

    def replace(match: re.Match) -> str:
        study = match.group(1)
        table = tables.get(study, "_No runs yet: run the command above._")
        return f"<!-- results:{study} -->\n{table}\n<!-- /results:{study} -->"

    return re.sub(r"<!-- results:(\w+) -->.*?<!-- /results:\1 -->", replace, page, flags=re.DOTALL)


def check_results_dir(results_dir: str) -> Path:
    """The folder of run files; raises naming `--results_dir` when it is empty, missing, or holds no run file."""
    if not results_dir.strip():  # the empty path is the current folder to the OS
        raise ValueError(f"--results_dir must be a non-empty path, got {results_dir!r}.")
    folder = Path(results_dir).expanduser()
    expected = "the folder of run files (one subfolder per study, as docs/results/)"
    if not folder.is_dir():
        found = "is a file" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"--results_dir {folder} {found}; expected {expected}.")
    if not any(folder.glob("*/*.json")) and not (folder / "pretrain_shared_data.json").is_file():
        raise FileNotFoundError(
            f"--results_dir {folder} holds no run file (STUDY/*.json or pretrain_shared_data.json); expected {expected}."
        )
    return folder


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--results_dir",
        default=str(ROOT / "docs" / "results"),
        help="Folder of run files, one subfolder per study (default: docs/results/ of this checkout).",
    )
    parser.add_argument(
        "--page",
        default=str(ROOT / "docs" / "results.md"),
        help="The page whose tables are filled (default: docs/results.md of this checkout).",
    )
    args = parser.parse_args(argv)
    page_path = Path(args.page).expanduser()
    if not page_path.is_file():
        found = "is a folder" if page_path.exists() else "does not exist"
        raise FileNotFoundError(
            f"--page {page_path} {found}; expected the markdown page that holds the text around the tables."
        )
    results_dir = check_results_dir(args.results_dir)
    tables = {}
    for table, runs in load_runs(results_dir).items():
        tables[table] = study_table(runs)
        seed_gaps = by_seed_table(runs)
        if seed_gaps is not None:
            tables[f"{table}_by_seed"] = seed_gaps
    shipped = results_dir / "pretrain_shared_data.json"
    if shipped.is_file():
        tables["shipped"] = shipped_recipe_table(check_shipped_file(shipped, read_json_file(shipped, SHIPPED_FILE)))
    template = page_path.read_text(encoding="utf-8")
    page = fill_page(template, tables)
    page_path.write_text(page, encoding="utf-8")
    print(f"{page_path}: filled {sorted(name for name in tables if f'<!-- results:{name} -->' in template)}")
    return page


if __name__ == "__main__":
    with exit_on_error("make_results_page"):
        main()
