"""Command-line arguments of the pretraining script (`HfArgumentParser` dataclasses).

The recipe file holds the run; these flags override it for one invocation. A flag left unset never overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PretrainingArguments:
    """Flags of `examples/run_pretraining.py`."""

    config: str = field(metadata={"help": "Path of the YAML recipe (model section and ordered stages)."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where checkpoints, stage models, logs and plots go; overrides the recipe."}
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "Continue from the last complete checkpoint in output_dir: finished stages are skipped and the "
            "current one continues mid-stage with the same data order."
        },
    )
    seed: int | None = field(default=None, metadata={"help": "Seed of initialisation, data order and masking."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps of every stage (replaces each stage's steps or epochs)."}
    )
    per_device_train_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size per process for every stage."}
    )
    gradient_accumulation_steps: int | None = field(
        default=None, metadata={"help": "Micro-batches per optimizer step for every stage."}
    )
    learning_rate: float | None = field(default=None, metadata={"help": "Peak learning rate for every stage."})
    checkpointing_steps: int | None = field(
        default=None, metadata={"help": "Save the full training state every this many optimizer steps."}
    )
    save_total_limit: int | None = field(
        default=None, metadata={"help": "Keep at most this many step checkpoints per stage (oldest deleted)."}
    )
    logging_steps: int | None = field(default=None, metadata={"help": "Log losses every this many optimizer steps."})
    report_to: str | None = field(
        default=None, metadata={"help": "Accelerate tracker to log to: 'tensorboard' (the default) or 'none'."}
    )
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "'no', 'fp16' or 'bf16' (bf16 also works on CPU) to override the launch config; unset, the "
            "accelerate launch config (or `accelerate config`'s default) decides."
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass to save memory."}
    )
    max_failure_rate: float | None = field(
        default=None,
        metadata={"help": "Stop the run when more than this share of records fails to load (0 to 1)."},
    )
    num_workers: int | None = field(default=None, metadata={"help": "DataLoader worker processes per process."})
    cpu: bool = field(
        default=False,
        metadata={"help": "Train on the CPU even when an accelerator is present (else the launch config decides)."},
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Push each stage's final model (and processor) to the Hub."}
    )
    hub_model_id: str | None = field(
        default=None,
        metadata={
            "help": "Hub repository for push_to_hub; each stage's model is pushed there, the commit naming the stage."
        },
    )
    set: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Recipe overrides as dotted.key=value, values parsed as YAML, e.g. "
            "--set stages.0.max_steps=10 model.config.hidden_size=64",
            "nargs": "*",
        },
    )
    stop_after_steps: int | None = field(
        default=None,
        metadata={
            "help": "Stop (as if interrupted) after this many optimizer steps of the whole run, with no final save; "
            "for testing resumption."
        },
    )


__all__ = ["PretrainingArguments"]
