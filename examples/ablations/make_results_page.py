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
a mistyped folder would otherwise replace every table by "no runs yet".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from imagebert_hf.models.imagebert.script_errors import exit_on_error


ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum")
HEADERS = ("TR R@1", "TR R@5", "TR R@10", "IR R@1", "IR R@5", "IR R@10", "RSUM")


def load_runs(results_dir: Path) -> dict[str, list[dict]]:
    """Run files by table, in a stable order. The folder a run file sits in names its table: the study's own
    (`rerank`), or a kept earlier series of it (`rerank_six_epochs`, started from another checkpoint)."""
    runs = defaultdict(list)
    for path in sorted(results_dir.glob("*/*.json")):
        runs[path.parent.name].append(json.loads(path.read_text()))
    return dict(runs)


def study_variants(study: str) -> list[str]:
    """`run_ablations.study_variants`, read from the file beside this one however this one was loaded."""
    runner = sys.modules.get("run_ablations")
    if runner is None:
        spec = importlib.util.spec_from_file_location("run_ablations", Path(__file__).with_name("run_ablations.py"))
        runner = importlib.util.module_from_spec(spec)
        sys.modules["run_ablations"] = runner  # its dataclasses look their module up while it loads
        spec.loader.exec_module(runner)
    return runner.study_variants(study)


def variant_rank(study: str, variant: str) -> tuple[int, str]:
    """Where a variant stands in its study's list (`run_ablations.study_variants`), unknown ones last by name."""
    try:
        order = study_variants(study)
    except ValueError:
        order = []
    return (order.index(variant) if variant in order else len(order), variant)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def study_table(runs: list[dict]) -> str:
    """A markdown table of one study: one row per (variant, ranking), in the order the runs name them."""
    by_variant = defaultdict(list)
    for run in sorted(runs, key=lambda run: variant_rank(run["study"], run["variant"])):
        by_variant[run["variant"]].append(run)
    protocols = sorted({run["protocol"] for run in runs})
    lines = [f"Scoring: {'; '.join(protocols)}. Recall in %, mean ± standard deviation over seeds.", ""]
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
        tables["shipped"] = shipped_recipe_table(json.loads(shipped.read_text()))
    template = page_path.read_text(encoding="utf-8")
    page = fill_page(template, tables)
    page_path.write_text(page, encoding="utf-8")
    print(f"{page_path}: filled {sorted(name for name in tables if f'<!-- results:{name} -->' in template)}")
    return page


if __name__ == "__main__":
    with exit_on_error("make_results_page"):
        main()
