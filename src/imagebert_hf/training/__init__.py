"""Training with Accelerate: multi-stage pretraining (recipes, `run_pretraining`) and retrieval fine-tuning
(`run_retrieval_finetuning`), on one stage runner with crash-safe checkpoints and loss plots.

Each task builds its model, data and losses into a `Stage` with its `Schedule`; `run_stage` (the runner) prepares it,
resumes it and trains it with `train_loop` under `LoopSettings`, and `save_final` writes the stage's model folder.
A run stopped before its end, on purpose (`stop_after_steps`) or by SIGTERM (a checkpoint saved first,
`stop_on_sigterm`), raises `TrainingStopped`; the example scripts turn it into exit status 3.
"""

from .arguments import PretrainingArguments, PretrainingRunOptions, RetrievalArguments
from .checkpointing import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from .loop import (
    LoopSettings,
    TooManyFailedRecords,
    TrainingStopped,
    build_accelerator,
    build_optimizer,
    build_scheduler,
    train_loop,
)
from .plots import plot_losses, plot_run_groups
from .pretraining import run_pretraining
from .recipe import Recipe, RecipeError, load_recipe, recipe_from_dict
from .retrieval_finetuning import run_retrieval_finetuning
from .retrieval_objective import RetrievalTrainingModel
from .runner import Schedule, Stage, run_stage, save_final


__all__ = [
    "LoopSettings",
    "PretrainingArguments",
    "PretrainingRunOptions",
    "Recipe",
    "RecipeError",
    "RetrievalArguments",
    "RetrievalTrainingModel",
    "Schedule",
    "Stage",
    "TooManyFailedRecords",
    "TrainState",
    "TrainingStopped",
    "build_accelerator",
    "build_optimizer",
    "build_scheduler",
    "latest_checkpoint",
    "load_checkpoint",
    "load_recipe",
    "plot_losses",
    "plot_run_groups",
    "recipe_from_dict",
    "run_pretraining",
    "run_retrieval_finetuning",
    "run_stage",
    "save_checkpoint",
    "save_final",
    "train_loop",
]
