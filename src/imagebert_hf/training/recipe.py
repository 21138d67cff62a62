"""Pretraining recipes: a YAML file with a model section and an ordered list of stages.

```yaml
output_dir: outputs/my_run
seed: 42
model:
  config: {hidden_size: 768, num_hidden_layers: 12, region_feature_size: 2048, num_object_classes: 1600}
  text_pretrained: bert-base-uncased     # or "minilm" (the offline package); optional
  tokenizer: bert-base-uncased           # or "minilm", "synthetic", a folder
stages:
  - name: lait
    sources:
      - {name: lait, type: webdataset, path: "lait/{00000..00999}.tar", region_cache: lait_regions, weight: 1.0}
    num_epochs: 1                        # or max_steps
    per_device_train_batch_size: 12
    learning_rate: 1.0e-4
    warmup_ratio: 0.05
    loss_weights: {mlm: 1.0, moc: 1.0, mrfr: 1.0, itm: 1.0}
```

Every key is checked: an unknown key or one given twice, a value of the wrong type or out of range, a source whose
file or region cache does not exist, zero steps, a source weight that is not positive, loss weights that are all
zero, or a stage name that cannot be a folder name fails at load time with the dotted path of the field
(`stages[1].sources[0].weight`). So does a source key that only another kind of source reads, set to other than its
default, and hf_dataset's `split` on a manifest (whose key is `splits`). A path that starts with `~` is taken from the
home folder.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import inspect
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..data.collator import MaskingSettings
from ..data.pair_sources import data_file_builder, expand_urls
from ..formats.files import check_folder_or_hub_id, expand_home, read_text_file
from ..models.imagebert import configuration_imagebert as model_configuration
from ..models.imagebert.configuration_imagebert import FIELD_RULES, SEED_RULE, check_field
from .arguments import SCHEDULER_TYPES


logger = logging.get_logger(__name__)

SOURCE_TYPES = ("manifest", "hf_dataset", "webdataset", "synthetic")
LOSS_TASKS = ("mlm", "moc", "mrfr", "itm")
# The rate transformers' polynomial schedule ends at (`lr_end` of get_polynomial_decay_schedule_with_warmup, which the
# runner leaves at its default); the schedule refuses a learning rate that is not above it.
POLYNOMIAL_LR_END = 1e-7


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the offending field."""


@dataclass
class SourceSpec:
    """One image-text pair source of a stage."""

    name: str
    type: str
    path: str | None = None
    weight: float = 1.0
    region_cache: str | None = None
    # webdataset, hf_dataset: read as a stream (never listed in memory; the stage then needs max_steps)
    streaming: bool = False
    # hf_dataset: the split of a stream, or of a saved DatasetDict
    split: str = "train"
    # manifest
    image_root: str | None = None
    allow_outside_root: bool = False
    splits: list[str] | None = None
    key_field: str = "image"
    max_captions_per_image: int | None = None
    # hf_dataset
    text_column: str = "captions"
    image_column: str = "image"
    id_column: str | None = None
    # synthetic
    num_images: int | None = None
    seed: int = 0
    first_image: int = 0
    image_size: int = 96
    captions_per_image: int = 2
    caption_noise: float = 0.0
    regions: str | None = None
    # Share of the source's ITM negatives that are its own image with the objects or colours of the caption's
    # relation swapped (hard negatives; see SyntheticPairSource). 0 keeps the plain negatives.
    swap_negatives: float = 0.0


@dataclass
class StageSpec(MaskingSettings):
    """One pretraining stage: data, length, optimisation, loss weights and masking (`MaskingSettings`)."""

    name: str
    sources: list[SourceSpec]
    max_steps: int | None = None
    num_epochs: float | None = None
    samples_per_epoch: int | None = None
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0
    lr_scheduler_type: str = "linear"
    loss_weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_TASKS, 1.0))
    # Batches of similar region count and caption length, each padded to its own longest (see MixtureSampler).
    group_by_length: bool = True
    length_group_pool: int = 50


@dataclass
class ModelSpec:
    """How the stage-1 model and the tokenizer are made (later stages start from the previous stage's weights)."""

    config: dict[str, Any] = field(default_factory=dict)
    config_path: str | None = None
    text_pretrained: str | None = None
    init_from: str | None = None
    tokenizer: str | None = None
    processor: str | None = None


@dataclass
class Recipe:
    """A whole pretraining run."""

    stages: list[StageSpec]
    model: ModelSpec = field(default_factory=ModelSpec)
    output_dir: str = "outputs/pretraining"
    seed: int = 42
    checkpointing_steps: int | None = 500
    save_total_limit: int | None = 2
    logging_steps: int = 10
    report_to: str = "tensorboard"
    max_failure_rate: float = 0.01
    min_records_for_failure_check: int = 200
    num_workers: int = 0


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping, got {type(data).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(data, fields, where, "key")
    required = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in data
    ]
    if required:
        raise RecipeError(f"{where}: missing required key(s) {required}.")
    data = dict(data)
    for name, value in data.items():
        # YAML 1.1 reads `1e-4` (no dot) as a string; take it as the number it was meant to be.
        if isinstance(value, str) and str(fields[name].type).startswith("float"):
            try:
                data[name] = float(value)
            except ValueError:
                raise RecipeError(f"{where}.{name} must be a number, got {value!r}.") from None
        _check_type(data[name], str(fields[name].type), f"{where}.{name}")
        if name in _FIELD_RULES and data[name] is not None:
            _check_field(f"{where}.{name}", data[name], *_FIELD_RULES[name])
    return data


def _check_keys(data: dict, allowed, where: str, what: str) -> None:
    """Refuses keys of `data` not in `allowed`, a key that is not a string (YAML reads `1:`, `yes:` or `null:` as a
    number, a boolean or None) among them."""
    unknown = [key for key in data if not isinstance(key, str) or key not in allowed]
    if unknown:
        unknown = sorted(unknown, key=repr)
        raise RecipeError(f"{where}: unknown {what}(s) {unknown}; allowed {what}s are {sorted(allowed)}.")


def check_folder_name(value: str, where: str) -> None:
    """Refuses a name that cannot be a folder name of its own: empty, a path (`/`, `\\`, `..`), or holding a
    character some filesystem refuses or a shell misreads (control characters, `<>:"|?*`)."""
    unsafe = sorted({char for char in value if ord(char) < 32 or ord(char) == 127 or char in _UNSAFE_IN_NAMES})
    if unsafe:
        why = f"holds the character(s) {unsafe}"
    elif ".." in value:
        why = "holds '..'"
    elif not value.strip():
        why = "is empty"
    elif value != value.strip():
        why = "starts or ends with a space"
    else:
        return
    raise RecipeError(
        f"{where} is {value!r}, which {why}; the name becomes a folder name, so use letters, digits, '-', '_' and "
        "'.' (no '..')."
    )


_UNSAFE_IN_NAMES = frozenset('/\\<>:"|?*')


# The numeric fields not checked with a message of their own, by rule in `check_field`'s `(kind, lowest, highest)`
# form (inclusive bounds, None for none): counts that must let something through are at least 1, offsets and
# optional counts at least 0, Adam's betas in [0, 1). Field names are unique across the recipe's sections.
_FIELD_RULES: dict[str, tuple[str, float | None, float | None]] = {
    **dict.fromkeys(
        ("max_captions_per_image", "image_size", "captions_per_image", "samples_per_epoch", "save_total_limit"),
        ("int", 1, None),
    ),
    **dict.fromkeys(("first_image", "warmup_steps", "min_records_for_failure_check", "num_workers"), ("int", 0, None)),
    **dict.fromkeys(("weight_decay", "max_grad_norm"), ("float", 0.0, None)),
    # torch's AdamW refuses a beta of 1, when the stage starts (after the stages before it trained).
    **dict.fromkeys(("adam_beta1", "adam_beta2"), ("prob<1", None, None)),
    "adam_epsilon": ("positive", None, None),
    "seed": SEED_RULE,
}

_TYPE_NAMES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false", "None": "null"}


def _matches(value: Any, annotation: str) -> bool:
    if annotation == "None":
        return value is None
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation == "str":
        return isinstance(value, str)
    if annotation == "list[str]":
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    if annotation == "dict[str, float]":
        return isinstance(value, dict) and all(_matches(item, "float") for item in value.values())
    if annotation.startswith("dict["):
        return isinstance(value, dict)
    return True  # nested specs are checked by their own builder


def _check_type(value: Any, annotation: str, where: str) -> None:
    options = [option.strip() for option in annotation.split("|")]
    if any(_matches(value, option) for option in options):
        return
    names = {
        "list[str]": "a list of strings",
        "dict[str, float]": "a mapping of names to numbers",
        "dict[str, Any]": "a mapping",
    }
    expected = " or ".join(_TYPE_NAMES.get(option) or names.get(option, option) for option in options)
    raise RecipeError(f"{where} must be {expected}, got {value!r} ({type(value).__name__}).")


def _check_field(where: str, value: Any, kind: str, low: float | None, high: float | None) -> None:
    try:
        check_field(where, value, kind, low, high)
    except (TypeError, ValueError) as error:
        raise RecipeError(str(error)) from None


# The keys each kind of source reads besides name, type, weight, region_cache and streaming. A key only other kinds
# read does nothing, so one set to other than its default is refused (`_check_unread_keys`).
SOURCE_KEYS = {
    "manifest": ("path", "image_root", "allow_outside_root", "splits", "key_field", "max_captions_per_image"),
    "hf_dataset": ("path", "split", "text_column", "image_column", "id_column"),
    "webdataset": ("path",),
    "synthetic": (
        "num_images",
        "seed",
        "first_image",
        "image_size",
        "captions_per_image",
        "caption_noise",
        "regions",
        "swap_negatives",
    ),
}
# A stream (`streaming: true`) also reads `seed`, the order of its shards; its rows' images are never read.
_STREAM_ONLY_KEYS, _LIST_ONLY_KEYS = ("seed",), ("image_column",)
# What a key of another kind is likely meant as, where its name is close to the key of this kind.
_KEY_HINTS = {
    ("manifest", "split"): "a manifest keeps the lines of the splits in `splits`: give `splits: [{value}]` instead",
    ("hf_dataset", "splits"): "an hf_dataset source reads the one split in `split`: give `split: NAME` instead",
}


def source_keys(kind: str, streaming: bool) -> frozenset[str]:
    """The keys a source of `kind` reads, read as a stream or not."""
    keys = {"name", "type", "weight", "region_cache", "streaming", *SOURCE_KEYS.get(kind, ())}
    return frozenset((keys | set(_STREAM_ONLY_KEYS)) - set(_LIST_ONLY_KEYS) if streaming else keys)


def _readers(key: str) -> str:
    """Which sources read `key`, as in "only {an hf_dataset source} reads it"."""
    kinds = [kind for kind, keys in SOURCE_KEYS.items() if key in keys]
    named = kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"
    named = f"{'an' if named[0] in 'aeiouh' else 'a'} {named} source"
    if key in _LIST_ONLY_KEYS:
        named += " not read as a stream"
    if key in _STREAM_ONLY_KEYS:
        named += " or a stream (streaming: true)"
    return named


def _set_by_hand(data: dict, key: str, default: Any, kind: str) -> bool:
    """Whether `data[key]` was set to mean something: a value other than the default, or a manifest's `split`
    without `splits`. The recipe.yaml a run writes gives every source every key, `split: train` (the default) beside
    `splits`; a manifest given `split: train` alone means to keep that split, which only `splits` does."""
    return data[key] != default or (key == "split" and kind == "manifest" and "splits" not in data)


def _check_unread_keys(data: dict, spec: SourceSpec, where: str) -> None:
    """Refuses keys of `data` that a source of its kind does not read, set by hand (`_set_by_hand`): the source would
    be built as though they were left out (a manifest's `split: train` would keep every line)."""
    defaults = {item.name: item.default for item in dataclasses.fields(SourceSpec)}
    readable = source_keys(spec.type, spec.streaming)
    unread = [key for key in data if key not in readable and _set_by_hand(data, key, defaults[key], spec.type)]
    if not unread:
        return
    problems = []
    for key in unread:
        hint = _KEY_HINTS.get((spec.type, key))
        hint = f" ({hint.format(value=data[key])})" if hint else ""
        problems.append(f"{where}.{key} is {data[key]!r}, but only {_readers(key)} reads it{hint}")
    kind = f"{spec.type} source" + (" read as a stream" if spec.streaming else "")
    them = "it" if len(unread) == 1 else "them"
    raise RecipeError(
        f"{'; '.join(problems)}. Source {spec.name!r} is a {kind}, which would ignore {them}: leave {them} out."
    )


# The fields that name a file or folder (or, for the model's, a Hub id or a short name, which never starts with `~`).
_SOURCE_PATH_FIELDS = ("path", "region_cache", "image_root")
_MODEL_PATH_FIELDS = ("config_path", "text_pretrained", "init_from", "tokenizer", "processor")


def _expand_home(data: dict, names) -> None:
    """Expands a leading `~` in the named fields of `data` (`expand_home`), once, where the recipe is read."""
    data.update(expand_home({name: data[name] for name in names if name in data}))


def _source(data: Any, where: str) -> SourceSpec:
    data = _build(SourceSpec, data, where)
    _expand_home(data, _SOURCE_PATH_FIELDS)
    spec = SourceSpec(**data)
    if spec.type not in SOURCE_TYPES:
        raise RecipeError(f"{where}.type is {spec.type!r}; expected one of {SOURCE_TYPES}.")
    if not isinstance(spec.weight, (int, float)) or spec.weight <= 0:
        raise RecipeError(f"{where}.weight must be a positive number, got {spec.weight!r}.")
    if spec.regions not in (None, "annotations"):
        raise RecipeError(f"{where}.regions must be 'annotations' or absent, got {spec.regions!r}.")
    if spec.streaming not in (False, True) or (spec.streaming and spec.type not in ("webdataset", "hf_dataset")):
        raise RecipeError(f"{where}.streaming must be true or false, and true only for webdataset or hf_dataset.")
    if spec.type == "synthetic":
        if not spec.num_images or spec.num_images < 1:
            raise RecipeError(
                f"{where}.num_images must be a positive integer for a synthetic source, got {spec.num_images!r}."
            )
        if spec.region_cache is None and spec.regions != "annotations":
            raise RecipeError(f"{where}: a synthetic source needs region_cache or `regions: annotations`.")
        if not 0.0 <= spec.caption_noise <= 1.0:
            raise RecipeError(f"{where}.caption_noise must be in [0, 1], got {spec.caption_noise}.")
        if not 0.0 <= spec.swap_negatives <= 1.0:
            raise RecipeError(f"{where}.swap_negatives must be in [0, 1], got {spec.swap_negatives}.")
    else:
        if not spec.path:
            raise RecipeError(f"{where}.path is required for a {spec.type} source.")
        if not spec.region_cache:
            raise RecipeError(f"{where}.region_cache is required: pretraining reads regions from the cache.")
    _check_unread_keys(data, spec, where)
    return spec


def _stage(data: Any, where: str, as_written: bool = False) -> StageSpec:
    data = _build(StageSpec, data, where)
    check_folder_name(data["name"], f"{where}.name")
    data = dict(data)
    sources = data.pop("sources")
    if not isinstance(sources, list) or not sources:
        raise RecipeError(f"{where}.sources must be a non-empty list of sources.")
    specs = [_source(source, f"{where}.sources[{i}]") for i, source in enumerate(sources)]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise RecipeError(f"{where}.sources: source names must be distinct, got {names}.")
    stage = StageSpec(sources=specs, **data)
    if (stage.max_steps is None) == (stage.num_epochs is None):
        raise RecipeError(f"{where}: give exactly one of max_steps and num_epochs.")
    if any(spec.streaming for spec in specs) and not (all(spec.streaming for spec in specs) and stage.max_steps):
        raise RecipeError(f"{where}: a stage over streaming sources needs max_steps, and every source streaming.")
    if specs[0].streaming and stage.samples_per_epoch is not None:
        raise RecipeError(
            f"{where}.samples_per_epoch is {stage.samples_per_epoch}, but a stage over streaming sources has no epoch "
            "to size (it reads its streams for max_steps steps), so it would be ignored: leave it out."
        )
    if stage.max_steps is not None and (not isinstance(stage.max_steps, int) or stage.max_steps < 1):
        raise RecipeError(f"{where}.max_steps must be a positive integer, got {stage.max_steps!r}.")
    if stage.num_epochs is not None and not stage.num_epochs > 0:
        raise RecipeError(f"{where}.num_epochs must be positive, got {stage.num_epochs!r}.")
    if not isinstance(stage.group_by_length, bool):
        raise RecipeError(f"{where}.group_by_length must be true or false, got {stage.group_by_length!r}.")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "length_group_pool"):
        value = getattr(stage, name)
        if not isinstance(value, int) or value < 1:
            raise RecipeError(f"{where}.{name} must be a positive integer, got {value!r}.")
    if not stage.learning_rate > 0:
        raise RecipeError(f"{where}.learning_rate must be positive, got {stage.learning_rate!r}.")
    if stage.lr_scheduler_type not in SCHEDULER_TYPES:
        raise RecipeError(
            f"{where}.lr_scheduler_type is {stage.lr_scheduler_type!r}; expected one of {SCHEDULER_TYPES}."
        )
    if not 0.0 <= stage.warmup_ratio < 1.0:
        raise RecipeError(f"{where}.warmup_ratio must be in [0, 1), got {stage.warmup_ratio}.")
    # Settings that would be accepted and change nothing: transformers' "constant" schedule drops the warmup it is
    # given, and `warmup_steps` replaces `warmup_ratio`.
    if stage.lr_scheduler_type == "constant" and (stage.warmup_steps or stage.warmup_ratio):
        given = f"warmup_steps {stage.warmup_steps}" if stage.warmup_steps else f"warmup_ratio {stage.warmup_ratio}"
        raise RecipeError(
            f"{where}.lr_scheduler_type 'constant' has no warmup, so its {given} would be ignored; use "
            "'constant_with_warmup', or leave the warmup out."
        )
    if stage.warmup_steps is not None and stage.warmup_ratio:
        raise RecipeError(
            f"{where} gives warmup_steps {stage.warmup_steps} and warmup_ratio {stage.warmup_ratio}; the steps would "
            "replace the ratio: give one of them."
        )
    if stage.lr_scheduler_type == "polynomial" and not stage.learning_rate > POLYNOMIAL_LR_END:
        raise RecipeError(
            f"{where}.learning_rate is {stage.learning_rate!r}, but the polynomial schedule decays it to "
            f"{POLYNOMIAL_LR_END:g}, so it must be above that; give a larger learning_rate or another "
            "lr_scheduler_type."
        )
    _check_keys(stage.loss_weights, LOSS_TASKS, f"{where}.loss_weights", "task")
    stage.loss_weights = {**dict.fromkeys(LOSS_TASKS, 1.0), **stage.loss_weights}
    for task, weight in stage.loss_weights.items():
        _check_field(f"{where}.loss_weights.{task}", weight, "float", 0.0, None)
    if not any(weight > 0 for weight in stage.loss_weights.values()):
        raise RecipeError(
            f"{where}.loss_weights are all zero ({stage.loss_weights}): the stage would train on no task; give at "
            "least one task a positive weight."
        )
    try:
        stage.check_masking_settings(f"{where}.")
    except ValueError as error:
        raise RecipeError(str(error)) from None
    _switch_off_inputs_of_untrained_tasks(stage, where)
    if as_written:
        # What the stage trained: a task its settings left without targets learned nothing.
        for task in _tasks_without_targets(stage):
            stage.loss_weights[task] = 0.0
    else:
        _check_trained_tasks_have_targets(stage, where)
    return stage


# The input changes each task needs, and the tasks that need them: with all of those at weight 0 the change only
# takes signal from the others (masked words or regions that no loss predicts, mismatched pairs whose masked losses
# are skipped), so it is switched off.
TASK_INPUT_SETTINGS = {
    "mlm_probability": ("mlm",),
    "region_mask_probability": ("moc", "mrfr"),
    "itm_negative_probability": ("itm",),
}


def _switch_off_inputs_of_untrained_tasks(stage: StageSpec, where: str) -> None:
    for setting, tasks in TASK_INPUT_SETTINGS.items():
        if getattr(stage, setting) > 0 and all(stage.loss_weights[task] == 0 for task in tasks):
            logger.warning(
                "%s.%s is %s, but %s trained in this stage (loss weight 0): set to 0, so that no input is changed "
                "for a task that does not learn from it.",
                where,
                setting,
                getattr(stage, setting),
                " and ".join(tasks) + (" are not" if len(tasks) > 1 else " is not"),
            )
            setattr(stage, setting, 0.0)


def _tasks_without_targets(stage: StageSpec) -> list[str]:
    """The tasks trained in the stage that its settings leave no target at all (no masked word or region, or every
    pair a negative, whose masked losses are skipped)."""
    weights = stage.loss_weights
    untrainable = []
    if weights["mlm"] > 0 and (stage.mlm_probability == 0 or stage.itm_negative_probability == 1):
        untrainable.append("mlm")
    for task in ("moc", "mrfr"):
        if weights[task] > 0 and (stage.region_mask_probability == 0 or stage.itm_negative_probability == 1):
            untrainable.append(task)
    return untrainable


def _check_trained_tasks_have_targets(stage: StageSpec, where: str) -> None:
    """Refuses a task trained in the stage (loss weight above 0) whose inputs give it nothing to learn: its loss would
    be logged as missing, or fall while the head learns one label, with every other task training as asked."""
    weights, negatives = stage.loss_weights, stage.itm_negative_probability
    problems = []
    if weights["mlm"] > 0 and stage.mlm_probability == 0:
        problems.append("mlm_probability is 0: no word is masked for MLM to predict")
    for task in ("moc", "mrfr"):
        if weights[task] > 0 and stage.region_mask_probability == 0:
            problems.append(f"region_mask_probability is 0: no region is masked for {task.upper()} to predict")
    if weights["itm"] > 0 and negatives in (0, 1):
        kind = "matched" if negatives == 0 else "mismatched"
        problems.append(f"itm_negative_probability is {negatives}: every pair is {kind}, so ITM learns one label")
    masked_tasks = [task.upper() for task in ("mlm", "moc", "mrfr") if weights[task] > 0]
    if masked_tasks and negatives == 1:
        problems.append(
            f"itm_negative_probability is 1: every pair is mismatched, and the masked losses of mismatched pairs are "
            f"skipped, so {', '.join(masked_tasks)} learn nothing"
        )
    if problems:
        raise RecipeError(
            f"{where}: {'; '.join(problems)}. Give the setting a value that leaves the task targets, or set the "
            f"task's {where}.loss_weights entry to 0."
        )


# What a recipe's `model.config` may set: the fields of ImageBERTConfig, and how the model attends and what it returns.
MODEL_CONFIG_KEYS = frozenset(
    name
    for name in inspect.signature(model_configuration.ImageBERTConfig.__init__).parameters
    if name not in ("self", "kwargs")
) | {"attn_implementation", "output_attentions", "output_hidden_states", "return_dict"}
# Weights train in float32 whatever a config's dtype says (a low-precision master copy loses the small updates).
_PRECISION_KEYS = ("dtype", "torch_dtype")


def _check_model_config(config: dict[str, Any], where: str) -> None:
    """Types and ranges of the config fields a recipe sets (fields that must agree are checked when the model is
    made, since a text checkpoint may supply the rest)."""
    non_string = [key for key in config if not isinstance(key, str)]
    if non_string:
        raise RecipeError(f"{where}: keys must be config field names, got {sorted(non_string, key=repr)}.")
    for name in config:
        if name in model_configuration.REMOVED_FIELDS:
            belongs = (
                f"it is a stage's setting (stages[i].{name})"
                if name in {item.name for item in dataclasses.fields(MaskingSettings)}
                else "it is a setting of the data, not of the model"
            )
            raise RecipeError(f"{where}.{name}: the model never reads it; {belongs}.")
        if name in _PRECISION_KEYS:
            raise RecipeError(
                f"{where}.{name}: the weights train in float32 whatever it says; mixed precision comes from "
                "--mixed_precision (bf16 or fp16) or the accelerate launch config. Drop it."
            )
        if name in model_configuration.PRETRAINING_LOSS_WEIGHTS:
            raise RecipeError(
                f"{where}.{name}: each stage sets it from its loss_weights (stages[i].loss_weights."
                f"{name.removesuffix('_loss_weight')}), so a value here would be replaced."
            )
        if name not in MODEL_CONFIG_KEYS:
            import difflib

            close = difflib.get_close_matches(name, sorted(MODEL_CONFIG_KEYS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"{where}.{name} is not a field of ImageBERTConfig, so it would do nothing.{hint}")
    for name, value in config.items():
        if name in FIELD_RULES:
            _check_field(f"{where}.{name}", value, *FIELD_RULES[name])


def _check_model_start(model: dict[str, Any], where: str) -> None:
    """Says (a warning) that `init_from` replaces the recipe's other way to make the stage-1 model: `--set
    model.init_from=FOLDER` on a recipe that starts from `text_pretrained` is how a run starts from a trained model
    instead, and the field it replaces is not used."""
    if model.get("init_from") is None:
        return
    for name in ("text_pretrained", "config_path"):
        if model.get(name) is not None:
            logger.warning(
                "%s.init_from (%r) is set: the run starts from that trained model (its weights and config, with the "
                "recipe's model.config settings), and %s.%s (%r) is not used.",
                where,
                model["init_from"],
                where,
                name,
                model[name],
            )


# The model section's fields that name a folder or a Hub id, and what each folder holds.
_MODEL_FOLDERS = {
    "text_pretrained": "a BERT checkpoint folder",
    "init_from": "a folder saved with ImageBERTForPreTraining.save_pretrained",
    "tokenizer": "a tokenizer folder",
    "processor": "a folder saved with ImageBERTProcessor.save_pretrained",
}


def _names_local_files(path: str) -> bool:
    """Whether a stream's `path` names data files on this machine (not a Hub id, a folder or an fsspec URL)."""
    return "://" not in path and data_file_builder(path) is not None


def check_source_paths(recipe: Recipe, where: str = "recipe") -> None:
    """Fails with a `RecipeError` naming the field when a source's data or region cache does not exist, or a model
    folder the recipe names (`text_pretrained`, `init_from`, `tokenizer`, `processor`) is missing or a file and not
    a Hub id either."""
    for name, expected in _MODEL_FOLDERS.items():
        value = getattr(recipe.model, name)
        if value is not None:
            try:
                check_folder_or_hub_id(value, f"{where}.model.{name}:", expected)
            except (OSError, ValueError) as error:
                raise RecipeError(str(error)) from None
    for i, stage in enumerate(recipe.stages):
        for j, spec in enumerate(stage.sources):
            at = f"{where}.stages[{i}].sources[{j}]"
            if spec.type == "manifest" and not Path(spec.path).is_file():
                raise RecipeError(f"{at}.path: manifest {spec.path} does not exist (expected a .jsonl file).")
            streamed = spec.streaming  # a stream's path may be a URL or a Hub name
            if spec.type == "hf_dataset" and not streamed and not Path(spec.path).is_dir():
                raise RecipeError(f"{at}.path: {spec.path} is not a folder saved with Dataset.save_to_disk.")
            # Local data of a stream too: a missing shard or file is otherwise found when its stage starts.
            local = spec.type == "hf_dataset" and streamed and _names_local_files(spec.path)
            if local and not glob.glob(os.path.expanduser(spec.path), recursive=True):
                raise RecipeError(f"{at}.path: no file matches {spec.path} (expected its data files).")
            if spec.type == "webdataset":
                try:
                    expand_urls(spec.path)
                except FileNotFoundError as error:
                    raise RecipeError(f"{at}.path: {error}") from None
            if spec.image_root is not None and not Path(spec.image_root).is_dir():
                raise RecipeError(f"{at}.image_root: {spec.image_root} is not a folder.")
            if spec.region_cache is not None and not Path(spec.region_cache).exists():
                raise RecipeError(
                    f"{at}.region_cache: {spec.region_cache} does not exist; build it with "
                    "`imagebert-extract-regions` first."
                )


def recipe_from_dict(data: Any, where: str = "recipe", as_written: bool = False) -> Recipe:
    """Validates a recipe given as a dict (as read from YAML). `as_written` reads the `recipe.yaml` a run wrote, as
    that run trained: a task its stage left without targets, which an earlier version trained on nothing and this
    one refuses, is read at loss weight 0; a `model.config.dtype` it ignored is left out."""
    data = _build(Recipe, data, where)
    data = dict(data)
    stages = data.pop("stages")
    if not isinstance(stages, list) or not stages:
        raise RecipeError(f"{where}.stages must be a non-empty list of stages.")
    model = data.pop("model", {}) or {}
    model = _build(ModelSpec, model, f"{where}.model")
    _expand_home(model, _MODEL_PATH_FIELDS)
    _expand_home(data, ("output_dir",))
    if not str(data.get("output_dir", Recipe.output_dir)).strip():
        # The empty path is the working folder to the OS: a run would write its stages there.
        raise RecipeError(f"{where}.output_dir must be a non-empty path, got {data['output_dir']!r}.")
    if as_written and isinstance(model.get("config"), dict):
        # An earlier version took these and trained in float32 all the same: the run resumes without them.
        ignored = [name for name in _PRECISION_KEYS if name in model["config"]]
        if ignored:
            model["config"] = {k: v for k, v in model["config"].items() if k not in _PRECISION_KEYS}
            logger.warning(
                "%s.model.config sets %s, which the run ignored (it trained in float32); read without it.",
                where,
                ", ".join(ignored),
            )
    _check_model_config(model.get("config", {}), f"{where}.model.config")
    _check_model_start(model, f"{where}.model")
    recipe = Recipe(
        stages=[_stage(stage, f"{where}.stages[{i}]", as_written) for i, stage in enumerate(stages)],
        model=ModelSpec(**model),
        **data,
    )
    names = [stage.name for stage in recipe.stages]
    if len(set(names)) != len(names):
        raise RecipeError(f"{where}.stages: stage names must be distinct, got {names}.")
    if recipe.checkpointing_steps is not None and recipe.checkpointing_steps < 1:
        raise RecipeError(f"{where}.checkpointing_steps must be positive or null, got {recipe.checkpointing_steps}.")
    if not 0.0 <= recipe.max_failure_rate <= 1.0:
        raise RecipeError(f"{where}.max_failure_rate must be in [0, 1], got {recipe.max_failure_rate}.")
    if recipe.logging_steps < 1:
        raise RecipeError(f"{where}.logging_steps must be positive, got {recipe.logging_steps}.")
    _check_report_to(recipe.report_to, f"{where}.report_to")
    return recipe


def _check_report_to(value: str, where: str) -> None:
    """Refuses a tracker name Accelerate does not know, at load time rather than when the run starts."""
    from accelerate.utils import LoggerType

    trackers = [tracker.value for tracker in LoggerType]
    if value not in ("", "none", *trackers):
        raise RecipeError(f"{where} is {value!r}; expected 'none' or one of Accelerate's trackers {trackers}.")


def _unique_key_loader():
    """A safe YAML loader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise RecipeError(
                        f"{key_node.start_mark.name}:{line}: key {key!r} is given twice (first on line {seen[key]})."
                    )
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def read_recipe(path: str | Path, overrides: list[str] | None = None) -> Any:
    """The data of a YAML recipe with `overrides` set (see `load_recipe`), not validated: what a script reads to count
    the stages its flags set before the one validated load (`load_recipe`) with them."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"recipe {path} is a folder; expected a YAML recipe file.")
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist.")
    stream = io.StringIO(read_text_file(path, "a YAML recipe file"))
    stream.name = str(path)  # what YAML's marks, and so the messages naming a line, call the file
    try:
        data = yaml.load(stream, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise RecipeError(f"{path} is not valid YAML: {_one_line(error)}") from None
    return apply_overrides(data, overrides or [])


def load_recipe(
    path: str | Path,
    overrides: list[str] | None = None,
    check_paths: bool = True,
    values: dict[str, Any] | None = None,
    as_written: bool = False,
) -> Recipe:
    """Reads and validates a YAML recipe; `overrides` are `dotted.key=value` strings (`stages.0.max_steps=10`),
    values parsed as YAML, and `values` maps dotted keys to values set as they are, after the overrides (a script's
    typed flags: `--output_dir "exp #2"` stays that string). Relative paths in the recipe stay relative to the working
    directory; a leading `~` is the home folder. A key given twice fails, and with `check_paths` so does a source
    whose data or region cache does not exist. `as_written`: see `recipe_from_dict`."""
    path = Path(path)
    data = read_recipe(path, overrides)
    if values and isinstance(data, dict):  # a recipe that is not a mapping is refused as such below
        data = set_values(data, values)
    recipe = recipe_from_dict(data, where=path.name, as_written=as_written)
    if check_paths:
        check_source_paths(recipe, where=path.name)
    return recipe


def _one_line(error: Exception) -> str:
    """PyYAML's message (problem, then where, on lines of their own) on one line, as a script's error line."""
    return " ".join(str(error).split())


def _parent(data, dotted: str, what: str):
    """The mapping or list that holds `dotted.key` of `data` (list items by index; a missing mapping on the way is
    made), and the key in it. `what` is how a refusal names the setting."""
    keys = dotted.split(".")
    node = data
    for i, key in enumerate(keys):
        if isinstance(node, list) and not (key.isdigit() and int(key) < len(node)):
            raise RecipeError(
                f"{what}: {'.'.join(keys[:i]) or 'the recipe'} is a list of {len(node)}; "
                f"expected an index below {len(node)}, got {key!r}."
            )
        if not isinstance(node, (dict, list)):
            raise RecipeError(f"{what}: {'.'.join(keys[:i])} is not a mapping or list.")
        if i == len(keys) - 1:
            break
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    return node, int(keys[-1]) if isinstance(node, list) else keys[-1]


def set_values(data: dict, values: dict[str, Any]) -> dict:
    """Returns a copy of `data` with each `dotted.key` of `values` set to its value as it is (not parsed)."""
    data = copy.deepcopy(data)
    for dotted, value in values.items():
        node, key = _parent(data, dotted, f"setting {dotted}")
        node[key] = value
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Returns a copy of `data` with each `dotted.key=value` override set (list items by index), its value parsed
    as YAML."""
    import yaml

    data = copy.deepcopy(data)
    for override in overrides:
        if "=" not in override:
            raise RecipeError(f"override {override!r} must look like dotted.key=value.")
        dotted, raw = override.split("=", 1)
        node, key = _parent(data, dotted, f"override {override!r}")
        try:
            node[key] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise RecipeError(f"override {override!r}: the value is not valid YAML ({_one_line(error)}).") from None
    return data


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


__all__ = [
    "LOSS_TASKS",
    "ModelSpec",
    "Recipe",
    "RecipeError",
    "SourceSpec",
    "StageSpec",
    "TASK_INPUT_SETTINGS",
    "MODEL_CONFIG_KEYS",
    "apply_overrides",
    "check_folder_name",
    "check_source_paths",
    "load_recipe",
    "read_recipe",
    "recipe_from_dict",
    "recipe_to_dict",
    "set_values",
    "source_keys",
]
