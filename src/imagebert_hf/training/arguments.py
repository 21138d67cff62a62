"""Command-line arguments of the training scripts (`HfArgumentParser` dataclasses, help on every field).

`PretrainingArguments`: the recipe file holds the run; these flags override it for one invocation, and a flag left
unset never overrides. `PretrainingRunOptions`: the run's other per-invocation settings (resume, precision, device,
Hub), parsed from the same command line. `RetrievalArguments`: every setting of a fine-tuning run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..formats.manifest import outside_root_flag
from ..models.imagebert.configuration_imagebert import SEED_RULE


# The learning-rate schedules the training loop can step (recipes and `--lr_scheduler_type`); transformers' others
# need a metric or settings that no flag gives.
SCHEDULER_TYPES = (
    "linear",
    "cosine",
    "constant",
    "constant_with_warmup",
    "cosine_with_restarts",
    "inverse_sqrt",
    "polynomial",
)

# The metavars of the flags that name a file or a folder (the last: or a Hub repository). `--help` shows them, and a
# resumed fine-tuning compares these flags by the location they name rather than as written (`path_flags`).
PATH_METAVARS = ("FILE", "FOLDER", "FOLDER_OR_HUB_ID")


def path_flags(arguments) -> dict[str, bool]:
    """The fields of the dataclass `arguments` that name a file or folder (their metavar is one of
    `PATH_METAVARS`), each with whether it may name a Hub repository instead."""
    return {
        item.name: item.metadata["metavar"] == "FOLDER_OR_HUB_ID"
        for item in dataclasses.fields(arguments)
        if item.metadata.get("metavar") in PATH_METAVARS
    }


# The numeric flags both training scripts take, as `check_field`'s (kind, lowest, highest), so that pretraining and
# fine-tuning refuse the same values under the same names; a flag left unset (None) is not checked. The bounds are
# the recipe's.
TRAINING_FLAG_RULES: dict[str, tuple[str, float | None, float | None]] = {
    **dict.fromkeys(
        (
            "max_steps",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "checkpointing_steps",
            "save_total_limit",
            "logging_steps",
            "stop_after_steps",
        ),
        ("int", 1, None),
    ),
    "learning_rate": ("positive", None, None),
    "seed": SEED_RULE,
}


@dataclass
class PretrainingRunOptions:
    """Per-invocation settings of a pretraining run that are not part of its recipe: what `run_pretraining` takes
    beside the recipe, parsed from the flags of `examples/run_pretraining.py` with `PretrainingArguments`."""

    resume: bool = field(
        default=False,
        metadata={
            "help": "Continue from the last complete checkpoint in output_dir: finished stages are skipped and the "
            "current one continues mid-stage with the same data order."
        },
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
    stop_after_steps: int | None = field(
        default=None,
        metadata={
            "help": "Stop (as if interrupted) after this many optimizer steps of the whole run (1 or more), with no "
            "final save; for testing resumption."
        },
    )


@dataclass
class PretrainingArguments:
    """Flags of `examples/run_pretraining.py` that override the recipe (its run options: `PretrainingRunOptions`)."""

    config: str = field(metadata={"help": "Path of the YAML recipe (model section and ordered stages)."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where checkpoints, stage models, logs and plots go; overrides the recipe."}
    )
    seed: int | None = field(
        default=None, metadata={"help": "Seed of initialisation, data order and masking (0 to 2**32 - 1)."}
    )
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
    max_failure_rate: float | None = field(
        default=None,
        metadata={"help": "Stop the run when more than this share of records fails to load (0 to 1)."},
    )
    num_workers: int | None = field(default=None, metadata={"help": "DataLoader worker processes per process."})
    set: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Recipe overrides as dotted.key=value, values parsed as YAML, e.g. "
            "--set stages.0.max_steps=10 model.config.hidden_size=64",
            "nargs": "*",
        },
    )


@dataclass
class RetrievalArguments:
    """Flags of `examples/run_retrieval.py` (`HfArgumentParser` dataclass)."""

    output_dir: str = field(
        metadata={"help": "Where checkpoints, the final model, logs and plots go.", "metavar": "FOLDER"}
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "ImageBERT checkpoint to start from (e.g. a pretraining stage's final/).",
            "metavar": "FOLDER_OR_HUB_ID",
        },
    )
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Karpathy split file (dataset_coco.json, dataset_flickr30k.json) or a jsonl manifest.",
            "metavar": "FILE",
        },
    )
    image_root: str | None = field(
        default=None, metadata={"help": "Folder the Karpathy image paths start from.", "metavar": "FOLDER"}
    )
    allow_outside_root: bool = outside_root_flag("--train_file")
    train_split: str = field(
        default="train",
        metadata={
            "help": "Split(s) to train on, comma-separated (COCO: train,restval); for a manifest, one split, or 'all' "
            "for every line."
        },
    )
    eval_split: str | None = field(default=None, metadata={"help": "Split to evaluate on at the end (e.g. test)."})
    region_cache: str | None = field(
        default=None, metadata={"help": "Region cache folder (imagebert-extract-regions).", "metavar": "FOLDER"}
    )
    synthetic_images: int | None = field(
        default=None, metadata={"help": "Train on this many generated images instead of files (demo and tests)."}
    )
    eval_images: int = field(
        default=100,
        metadata={
            "help": "Held-out generated images evaluated at the end (with --synthetic_images; 0: no evaluation)."
        },
    )
    max_images: int | None = field(default=None, metadata={"help": "Use only the first images of each split."})
    captions_per_image: int | None = field(
        default=None,
        metadata={
            "help": "Keep at most this many captions per image. Unset, training takes every caption and the "
            "evaluation split those evaluate_retrieval.py ranks (a Karpathy split's first 5, a manifest's all); set, "
            "it cuts both."
        },
    )
    loss_weights: str = field(
        default="binary=1", metadata={"help": "Retrieval losses and weights, e.g. binary=1,multiclass=0.5,triplet=1."}
    )
    contrastive_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the contrastive loss of the shortlist heads (0 or more; 0: not trained)."},
    )
    num_negatives: int = field(default=3, metadata={"help": "Negatives per positive (the paper's P)."})
    negative_type: str = field(default="both", metadata={"help": "'text', 'image' or 'both' (random mix)."})
    hard_negatives: bool = field(default=False, metadata={"help": "Mine the hardest of a scored random pool."})
    hard_pool_size: int = field(default=16, metadata={"help": "Candidates scored per positive when mining."})
    contrastive_trains_encoder: bool = field(
        default=True,
        metadata={
            "help": "Let the contrastive loss train the encoder the cross-encoder shares (False: only the "
            "projection heads learn from it, on the encoder's detached outputs)."
        },
    )
    negative_mining: str = field(
        default="random",
        metadata={
            "help": "'random': the collator's negatives; 'contrastive': in-batch negatives drawn by the unimodal "
            "similarity (ALBEF / BLIP), the candidates a shortlist gives the re-ranker."
        },
    )
    seed: int = field(
        default=42, metadata={"help": "Seed of initialisation, data order and negatives (0 to 2**32 - 1)."}
    )
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps (overrides num_epochs)."})
    num_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training captions."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Positives per process and micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate (the paper: 5e-5)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of steps with linear warmup."})
    lr_scheduler_type: str = field(
        default="linear",
        metadata={"help": f"One of {', '.join(SCHEDULER_TYPES)}."},
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: no clipping)."})
    logging_steps: int = field(default=10, metadata={"help": "Log losses every this many steps."})
    checkpointing_steps: int | None = field(default=None, metadata={"help": "Save the training state this often."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last complete checkpoint."})
    stop_after_steps: int | None = field(
        default=None, metadata={"help": "Stop as if killed after this many steps, 1 or more (resumption tests)."}
    )
    report_to: str = field(default="tensorboard", metadata={"help": "Accelerate tracker, or 'none'."})
    mixed_precision: str | None = field(
        default=None, metadata={"help": "'no', 'fp16' or 'bf16' to override the accelerate launch config."}
    )
    cpu: bool = field(default=False, metadata={"help": "Train on the CPU even when a GPU is present."})
    eval_batch_size: int = field(default=256, metadata={"help": "Pairs per forward pass when evaluating."})
    eval_shortlist_k: int | None = field(
        default=None, metadata={"help": "Also evaluate shortlist + re-rank with this k."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push model, processor and card when done."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository for push_to_hub."})


__all__ = [
    "PATH_METAVARS",
    "SCHEDULER_TYPES",
    "TRAINING_FLAG_RULES",
    "PretrainingArguments",
    "PretrainingRunOptions",
    "RetrievalArguments",
    "path_flags",
]
