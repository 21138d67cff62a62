"""Multi-stage ImageBERT pretraining (MLM, MOC, MRFR, ITM) with Accelerate.

    accelerate launch examples/run_pretraining.py --config examples/configs/pretrain_tiny_synthetic.yaml
    accelerate launch --config_file examples/configs/accelerate_4gpu.yaml examples/run_pretraining.py \
        --config examples/configs/pretrain_paper_lait_ccsbu.yaml
    accelerate launch --config_file examples/configs/accelerate_fsdp.yaml examples/run_pretraining.py ...
    python examples/run_pretraining.py --config recipe.yaml --output_dir out --resume --set stages.0.max_steps=100

Flags left unset never override the recipe; a flag's value is taken as the flag's type (`--output_dir "exp #2"` is
that folder), while `--set dotted.key=value`, which reaches any recipe field, reads its value as YAML. The device,
mixed precision and distributed engine (DDP, FSDP, DeepSpeed) come from the accelerate launch config;
`--mixed_precision` and `--cpu` override it only when given. A bad flag, recipe or input ends the script with one line
naming it and exit status 1.
"""

import re
import sys
from pathlib import Path

from transformers import HfArgumentParser

from imagebert_hf.formats.files import check_output_dir
from imagebert_hf.models.imagebert.configuration_imagebert import check_flag_values
from imagebert_hf.models.imagebert.script_errors import exit_on_error, parse_flags
from imagebert_hf.training import (
    PretrainingArguments,
    PretrainingRunOptions,
    TrainingStopped,
    load_recipe,
    run_pretraining,
)
from imagebert_hf.training.arguments import TRAINING_FLAG_RULES
from imagebert_hf.training.pretraining import check_run_options
from imagebert_hf.training.recipe import RecipeError, read_recipe


# Flags that replace the same field of every stage.
STAGE_FLAGS = ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate")
# Flags that replace a top-level recipe field.
RUN_FLAGS = (
    "output_dir",
    "seed",
    "checkpointing_steps",
    "save_total_limit",
    "logging_steps",
    "report_to",
    "max_failure_rate",
    "num_workers",
)


# The flags' rules as `check_field`'s (kind, lowest, highest): the recipe's, named by flag before the recipe is read.
FLAG_RULES = {**TRAINING_FLAG_RULES, "max_failure_rate": ("float", 0.0, 1.0), "num_workers": ("int", 0, None)}


def check_flags(args: PretrainingArguments, options: PretrainingRunOptions) -> None:
    """Raises `ValueError` (or `OSError` for a path) naming the flag when a flag cannot work."""
    check_flag_values(args, {name: FLAG_RULES[name] for name in (*RUN_FLAGS, *STAGE_FLAGS) if name in FLAG_RULES})
    check_run_options(options)
    if args.output_dir is not None:
        check_output_dir(args.output_dir)
    if not args.config.strip():
        raise ValueError("--config must be the path of a YAML recipe, got ''.")
    if Path(args.config).is_dir():
        raise IsADirectoryError(f"--config {args.config} is a folder; expected a YAML recipe file.")


def recipe_values(args: PretrainingArguments, num_stages: int) -> dict:
    """The recipe fields the given flags set (dotted keys), with the flags' values as parsed: never read as YAML, so a
    folder named `exp #2` or `2024-05-01` stays that string."""
    values = {name: getattr(args, name) for name in RUN_FLAGS if getattr(args, name) is not None}
    for name in STAGE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            values.update({f"stages.{i}.{name}": value for i in range(num_stages)})
            if name == "max_steps":
                values.update({f"stages.{i}.num_epochs": None for i in range(num_stages)})
    return values


def count_stages(data) -> int:
    """The stages of a recipe as read, before it is validated (0 where it has no list of them, which the validated
    load then refuses)."""
    stages = data.get("stages") if isinstance(data, dict) else None
    return len(stages) if isinstance(stages, list) else 0


def naming_flags(error: RecipeError, args: PretrainingArguments) -> RecipeError:
    """`error`, saying which given flags set the fields it names (a run flag sets `<file>.name`, a stage flag
    `stages[i].name`)."""
    given = [name for name in (*RUN_FLAGS, *STAGE_FLAGS) if getattr(args, name) is not None]
    named = [
        name
        for name in given
        if re.search(rf"stages\[\d+\]\.{name}\b" if name in STAGE_FLAGS else rf"(?<!\])\.{name}\b", str(error))
    ]
    if not named:
        return error
    flags = " and ".join(f"--{name} {getattr(args, name)}" for name in named)
    return RecipeError(f"{str(error).rstrip('.')} (set by {flags}).")


def load_flagged_recipe(args: PretrainingArguments):
    """The recipe with `--set` and then the flags applied, validated once (a recipe may leave each stage's length
    to `--max_steps`)."""
    num_stages = count_stages(read_recipe(args.config, args.set))
    try:
        return load_recipe(args.config, args.set, values=recipe_values(args, num_stages))
    except RecipeError as error:
        raise naming_flags(error, args) from None


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((PretrainingArguments, PretrainingRunOptions))
    args, options = parse_flags(parser, argv)
    if options.mixed_precision not in (None, "no", "fp16", "bf16"):
        parser.error(f"--mixed_precision must be no, fp16 or bf16, got {options.mixed_precision!r}")
    check_flags(args, options)
    recipe = load_flagged_recipe(args)
    try:
        return run_pretraining(recipe, options)
    except TrainingStopped as stop:
        # Exit status 3: what a job scheduler reads as "resubmit with --resume".
        print(f"{stop}; continue with --resume", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    from safetensors import SafetensorError

    from imagebert_hf.training import TooManyFailedRecords

    # SafetensorError: a damaged weights file; TooManyFailedRecords: sources whose records mostly fail to load.
    with exit_on_error("run_pretraining", errors=(OSError, ValueError, SafetensorError, TooManyFailedRecords)):
        main()
