"""Training with Accelerate: multi-stage pretraining (recipes, `run_pretraining`) and retrieval fine-tuning
(`run_retrieval_finetuning`), on one training loop with crash-safe checkpoints and loss plots.

The loop pieces (`build_accelerator`, `build_optimizer`, `build_scheduler`, `train_loop`, `save_checkpoint`,
`load_checkpoint`, `plot_losses`) are generic; both kinds of training run on them.
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
from .pretraining import PretrainingRunOptions, run_pretraining
from .recipe import Recipe, RecipeError, load_recipe, recipe_from_dict
from .retrieval_finetuning import RetrievalArguments, RetrievalTrainingModel, run_retrieval_finetuning


__all__ = [
    "PretrainingArguments",
    "PretrainingRunOptions",
    "Recipe",
    "RecipeError",
    "RetrievalArguments",
    "RetrievalTrainingModel",
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
    "run_retrieval_finetuning",
    "save_checkpoint",
    "train_loop",
]
