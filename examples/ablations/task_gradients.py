"""How much of each training step each pretraining task drives: the gradient norm of each task's weighted loss, over
the whole model and over its parts, on the first batches of one stage of a recipe (`--stage`), called as the
training loop calls the model.

    OMP_NUM_THREADS=1 python examples/ablations/task_gradients.py \
        --config examples/configs/pretrain_minilm_shared_data.yaml --init_from outputs/minilm_shared_data/region_alignment

The loss weights are the stage's; the model is the recipe's own (`model.init_from`, or the text
checkpoint), or `--init_from`'s, in training mode (dropout on) as a run starts. Prints one JSON line per batch and
returns the rows. docs/pretraining.md ("The ITM stage") has what it showed: at the start of the real-photo
recipe the new MLM head's gradient is 37-49 times ITM's. Exits 1 with one line on stderr when an argument or file is
wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from imagebert_hf.models.imagebert.script_errors import exit_on_error, parse_flags


# Parameter groups by name: the two region projections, the encoder layers, and the ITM head with the pooler.
PARAMETER_GROUPS = {
    "region_projections": ("region_feature_projection", "region_location_projection"),
    "encoder": (".encoder.",),
    "itm_head_and_pooler": ("cls.seq_relationship", "bert.pooler"),
}


@dataclass
class TaskGradientArguments:
    config: str = field(metadata={"help": "The pretraining recipe (YAML)."})
    init_from: str | None = field(default=None, metadata={"help": "A checkpoint to measure instead of the recipe's."})
    stage: int = field(default=0, metadata={"help": "Which stage's data and loss weights (0-based)."})
    num_batches: int = field(default=3, metadata={"help": "Batches to measure."})
    seed: int | None = field(default=None, metadata={"help": "Seed (the recipe's by default)."})
    set: list[str] = field(default_factory=list, metadata={"help": "Recipe overrides, as run_pretraining's --set."})


def gradient_norms(model, batch: dict, loss_weights: dict[str, float], model_kwargs: dict) -> dict[str, dict]:
    """Per task (with a positive weight): its weighted loss, and the norm of that loss's gradient over all trained
    parameters (`total`) and over each of `PARAMETER_GROUPS`. `batch` and `model_kwargs` are what the training loop
    passes to the model."""
    import torch

    named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    outputs = model(**batch, **model_kwargs)
    row = {}
    for task, weight in loss_weights.items():
        loss = getattr(outputs, f"{task}_loss")
        if not weight or loss is None:
            continue
        grads = torch.autograd.grad(weight * loss, [p for _, p in named], retain_graph=True, allow_unused=True)
        squares = {name: float(g.double().pow(2).sum()) for (name, _), g in zip(named, grads) if g is not None}
        norms = {"loss": float(weight * loss.detach()), "total": sum(squares.values()) ** 0.5}
        for group, patterns in PARAMETER_GROUPS.items():
            norms[group] = sum(v for n, v in squares.items() if any(p in n for p in patterns)) ** 0.5
        row[task] = norms
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    (args,) = parse_flags(HfArgumentParser(TaskGradientArguments), argv)
    from accelerate.utils import set_seed

    from imagebert_hf.training import PretrainingRunOptions, load_recipe
    from imagebert_hf.training.pretraining import build_model, build_stage_data, load_tokenizer, loop_settings

    with exit_on_error("task_gradients"):
        if args.num_batches < 1:
            raise ValueError(f"--num_batches must be at least 1, got {args.num_batches}.")
        recipe = load_recipe(args.config, args.set)
        if not 0 <= args.stage < len(recipe.stages):
            raise ValueError(f"--stage must be in [0, {len(recipe.stages) - 1}], got {args.stage}.")
        seed = recipe.seed if args.seed is None else args.seed
        set_seed(seed)
        tokenizer = load_tokenizer(recipe.model)
        model = build_model(recipe.model, tokenizer, init_from=args.init_from)
        stage = recipe.stages[args.stage]
        dataloader, *_ = build_stage_data(stage, tokenizer, model.config, seed=seed)
        model_kwargs = loop_settings(recipe, stage, PretrainingRunOptions()).model_kwargs or {}

    model.train()
    rows = []
    for index, batch in zip(range(args.num_batches), dataloader):
        batch.pop("num_failed_records", None)  # the loop's count, not a model input
        rows.append({"batch": index, **gradient_norms(model, batch, stage.loss_weights, model_kwargs)})
        print(json.dumps(rows[-1]))
    return rows


if __name__ == "__main__":
    main()
