"""Multi-stage pretraining with Accelerate: recipes, the training loop, crash-safe checkpoints and loss plots.

The loop pieces (`build_accelerator`, `build_optimizer`, `build_scheduler`, `train_loop`, `save_checkpoint`,
`load_checkpoint`, `plot_losses`) are generic, so retrieval fine-tuning runs on them too.
"""

from .arguments import PretrainingArguments
from .checkpointing import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from .loop import (
    TooManyFailedRecords,
    TrainingStopped,
    build_accelerator,
    build_optimizer,
    build_scheduler,
    train_loop,
)
from .plots import plot_losses
from .recipe import Recipe, RecipeError, load_recipe, recipe_from_dict
from .stages import PretrainingRunOptions, run_pretraining


__all__ = [
    "PretrainingArguments",
    "PretrainingRunOptions",
    "Recipe",
    "RecipeError",
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
    "recipe_from_dict",
    "run_pretraining",
    "save_checkpoint",
    "train_loop",
]
