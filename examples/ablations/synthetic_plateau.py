"""What shortens the ITM plateau, on the generated shapes set: the learning-quality guard's recipe
(`examples/configs/learning_quality_synthetic.yaml`) with recipe overrides, over seeds, each run ranked zero-shot
with its ITM head on 100 held-out images, as `tests/test_learning_quality.py` ranks it.

    OMP_NUM_THREADS=1 python examples/ablations/synthetic_plateau.py --setting "guard recipe (lr 3e-3, batch 32)"
    OMP_NUM_THREADS=1 python examples/ablations/synthetic_plateau.py --setting "batch 128" \
        --seeds 0 1 2 3 4 5 6 7 8 9 --set stages.0.per_device_train_batch_size=128

    OMP_NUM_THREADS=1 python examples/ablations/synthetic_plateau.py \
        --setting "region alignment warm start (200 steps)" --region_alignment_steps 200

    python examples/ablations/synthetic_plateau.py --summary   # the table in docs/pretraining.md

Each run appends one line to `--results_file` (JSON: setting, seed, overrides, held-out RSUM, the first logged step
whose ITM loss is below 0.6, mean ITM losses over steps 126-150 and over the last 100 steps, seconds); a (setting,
seed) already there is skipped, so an interrupted sweep resumes. One thread, about 40 seconds a run on a free core
at batch 32. docs/pretraining.md ("What shortens the plateau") is made from the shipped results file.
Exits 1 with one line on stderr when an argument or file is wrong (`exit_on_error`, as the console scripts).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from imagebert_hf.models.imagebert.script_errors import exit_on_error, parse_flags


ROOT = Path(__file__).resolve().parents[2]
GUARD_RECIPE = ROOT / "examples" / "configs" / "learning_quality_synthetic.yaml"
HELD_OUT_IMAGES = 100
ITM_ESCAPED = 0.6
# A run has left the plateau when its ITM loss over the last 100 steps is at most the guard's ceiling.
LEFT_PLATEAU = 0.62
# Two-sided 95% quantiles of Student's t by degrees of freedom (paired differences over 2-31 seeds).
T_975 = dict(enumerate([12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
                        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
                        2.052, 2.048, 2.045, 2.042], start=1))  # fmt: skip


@dataclass
class PlateauArguments:
    setting: str | None = field(
        default=None, metadata={"help": "Name of the setting (the row of the results table); needed to run."}
    )
    seeds: list[int] = field(default_factory=lambda: list(range(10)), metadata={"help": "Seeds, one run each."})
    set: list[str] = field(default_factory=list, metadata={"help": "Recipe overrides, as run_pretraining's --set."})
    region_alignment_steps: int = field(
        default=0,
        metadata={
            "help": "Before pretraining, fit the region projections to the frozen encoder for this many steps "
            "(examples/region_alignment.py, same seed) and pretrain from the result; 0: no warm start."
        },
    )
    results_file: str = field(
        default=str(ROOT / "docs" / "learning_quality" / "synthetic_plateau.jsonl"),
        metadata={"help": "JSON-lines file the runs are appended to."},
    )
    summary: bool = field(
        default=False,
        metadata={"help": "Print the results file as a markdown table (the first setting is the baseline)."},
    )


def itm_summary(history: list[dict]) -> dict[str, float | int | None]:
    """The first logged step whose ITM loss is below 0.6, and the mean ITM loss over steps 126-150 and over the
    last 100 steps, from a run's loss history."""
    itm = [(entry["step"], entry["itm"]) for entry in history if "itm" in entry]
    if not itm:
        raise ValueError("the run logged no ITM loss; is the ITM weight 0?")
    last = itm[-1][0]

    def mean_between(first: int, end: int) -> float | None:
        values = [value for step, value in itm if first < step <= end]
        return statistics.fmean(values) if values else None

    return {
        "first_step_below_0.6": next((step for step, value in itm if value < ITM_ESCAPED), None),
        "itm_steps_126_150": mean_between(125, 150),
        "itm_last_100_steps": mean_between(last - 100, last),
    }


def summary_table(rows: list[dict]) -> str:
    """One line per setting, in the file's order: runs, how many left the plateau, when the ITM loss first fell
    below 0.6, its mean over steps 126-150, held-out RSUM, and the RSUM difference to the first setting over the
    seeds both ran (mean and 95% t interval)."""
    settings = {}
    for row in rows:
        settings.setdefault(row["setting"], {})[row["seed"]] = row
    baseline = next(iter(settings.values()))
    lines = [
        "| setting | runs | left the plateau | step ITM first < 0.6 | ITM, steps 126-150 | held-out RSUM | minus the "
        "first row, same seeds (95% interval) |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, by_seed in settings.items():
        runs = list(by_seed.values())
        rsums = [run["rsum"] for run in runs]
        left = [run for run in runs if run["itm_last_100_steps"] <= LEFT_PLATEAU]
        steps = [run["first_step_below_0.6"] for run in left if run["first_step_below_0.6"] is not None]
        spread = f"{min(steps)}-{max(steps)}" if steps else "never"
        early = statistics.fmean(run["itm_steps_126_150"] for run in runs)
        rsum = f"{statistics.fmean(rsums):.1f} +- {statistics.stdev(rsums) if len(rsums) > 1 else 0.0:.1f}"
        gaps = [run["rsum"] - baseline[seed]["rsum"] for seed, run in by_seed.items() if seed in baseline]
        difference = ""
        if by_seed is not baseline and len(gaps) > 1:
            mean, half = statistics.fmean(gaps), T_975.get(len(gaps) - 1, 1.96) * statistics.stdev(gaps)
            half /= len(gaps) ** 0.5
            difference = f"{mean:+.1f} [{mean - half:.1f}, {mean + half:.1f}]"
        lines.append(f"| {setting} | {len(runs)} | {len(left)} | {spread} | {early:.3f} | {rsum} | {difference} |")
    return "\n".join(lines)


def run_one(setting: str, seed: int, overrides: list[str], region_alignment_steps: int = 0) -> dict:
    from imagebert_hf.evaluation.zero_shot import synthetic_retrieval_inputs, zero_shot_retrieval
    from imagebert_hf.training import PretrainingRunOptions, load_recipe, run_pretraining
    from imagebert_hf.training.region_alignment import RegionAlignmentSettings, run_region_alignment

    start = time.perf_counter()
    recorded = {"overrides": overrides}
    with tempfile.TemporaryDirectory(prefix="synthetic_plateau-") as output_dir:
        if region_alignment_steps:
            recorded["region_alignment_steps"] = region_alignment_steps
            aligned = str(Path(output_dir) / "aligned")
            run_region_alignment(
                load_recipe(GUARD_RECIPE, overrides),
                aligned,
                RegionAlignmentSettings(max_steps=region_alignment_steps),
                seed,
            )
            overrides = [*overrides, f"model.init_from={aligned}"]
        recipe = load_recipe(GUARD_RECIPE, [f"output_dir={output_dir}", f"seed={seed}", *overrides])
        run = run_pretraining(recipe, PretrainingRunOptions())
        source = recipe.stages[0].sources[0]
        text_inputs, region_inputs, text_to_image = synthetic_retrieval_inputs(
            source.num_images, HELD_OUT_IMAGES, source.seed, recipe.model.config["region_feature_size"]
        )
        metrics = zero_shot_retrieval(run["final_model"], text_inputs, region_inputs, text_to_image, progress=False)
    return {
        "setting": setting,
        "seed": seed,
        **recorded,
        "rsum": metrics["rsum"],
        **itm_summary(run["history"]),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    (args,) = parse_flags(HfArgumentParser(PlateauArguments), argv)
    import torch

    from imagebert_hf.formats.files import atomic_write_text

    torch.set_num_threads(1)  # the figures depend on the order of float reductions, which the thread count changes
    results_file = Path(args.results_file)
    with exit_on_error("synthetic_plateau"):
        lines = results_file.read_text(encoding="utf-8").splitlines() if results_file.exists() else []
        if args.summary:
            if not lines:
                raise FileNotFoundError(f"--results_file {results_file} holds no runs to summarise.")
            print(summary_table([json.loads(line) for line in lines]))
            return []
        if not args.setting:
            raise ValueError("--setting names the runs (a row of the table); give it, or --summary.")
        done = {(row["setting"], row["seed"]) for row in map(json.loads, lines)}
        new_rows = []
        for seed in args.seeds:
            if (args.setting, seed) in done:
                continue
            row = run_one(args.setting, seed, args.set, args.region_alignment_steps)
            print(json.dumps(row), flush=True)
            new_rows.append(row)
            lines.append(json.dumps(row))
            atomic_write_text(results_file, "\n".join(lines) + "\n")
    return new_rows


if __name__ == "__main__":
    main()
