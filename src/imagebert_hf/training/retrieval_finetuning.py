"""Retrieval fine-tuning with Accelerate (binary, multi-class, triplet or a weighted mix), on the shared loop.

`examples/run_retrieval.py` parses `RetrievalArguments` and calls `run_retrieval_finetuning`. Each positive
caption-image pair comes with `num_negatives` negatives (other captions or other images, at random or the hardest of
a scored pool); the unimodal heads that shortlist candidates learn alongside with a contrastive loss over the batch's
positives (`RetrievalTrainingModel`). Checkpoints, resumption, logging and the loss plot work as in pretraining.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from ..data.pair_sources import MixtureSampler
from ..data.retrieval_corpus import (
    DataCollatorForImageTextRetrieval,
    HardNegativeSampler,
    RandomNegativeSampler,
    RetrievalCorpus,
    RetrievalPairDataset,
    check_region_cache_fits,
    evaluation_captions_per_image,
    load_karpathy_split,
    load_manifest_records,
    region_cache_lookup,
)
from ..data.synthetic import (
    HELD_OUT_SEED,
    make_synthetic_examples,
    make_synthetic_tokenizer,
    synthetic_region_record,
)
from ..evaluation.full_ranking import load_retrieval_model, rank_corpus
from ..evaluation.hub import check_push_to_hub, push_to_hub
from ..evaluation.recall import retrieval_metrics
from ..formats.files import (
    atomic_write_json,
    check_nothing_left_unexpanded,
    check_output_dir,
    expand_home,
    read_json_file,
)
from ..models.imagebert import ImageBERTConfig, ImageBERTForImageTextRetrieval
from ..models.imagebert.configuration_imagebert import check_flag_values
from ..models.imagebert.pipeline_image_text_retrieval import PROJECTION_HEADS, untrained_heads
from ..regions.cache_reader import load_region_cache
from .arguments import SCHEDULER_TYPES, TRAINING_FLAG_RULES, RetrievalArguments, path_flags
from .checkpointing import COMPLETE_FILE, TrainState, latest_checkpoint
from .loop import LoopSettings, build_accelerator, stop_on_sigterm
from .plots import plot_losses
from .pretraining import DIFFERENCES_SHOWN, short_value
from .retrieval_objective import LOSS_NAMES, RetrievalTrainingModel
from .runner import Schedule, Stage, hold_run_folder, run_stage, save_final


logger = logging.get_logger(__name__)

# The flags of a run, as it started, in its folder: `--resume` refuses other values of those that decide a weight or
# a batch.
RUN_ARGS_FILE = "run_args.json"
# The key of `run_args.json` (not a flag) that holds the working directory the flags were given in: a relative path
# among them names a file from there. A file without it (an earlier version's) reads them from the current one.
WORKING_DIR_KEY = "_working_dir"
# Flags a resumed run may change: where the folder is named from, how the run is logged, checkpointed, stopped,
# evaluated and published, and the device and precision (the launch config's, as in pretraining). Every other flag
# decides a weight or the data, so a run resumed with another value would be neither run.
RESUMABLE_FLAGS = (
    "output_dir",
    "resume",
    "stop_after_steps",
    "logging_steps",
    "checkpointing_steps",
    "save_total_limit",
    "report_to",
    "mixed_precision",
    "cpu",
    "eval_split",
    "eval_images",
    "eval_batch_size",
    "eval_shortlist_k",
    "push_to_hub",
    "hub_model_id",
)


def parse_loss_weights(text: str) -> dict[str, float]:
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in LOSS_NAMES[:3] or not value:
            raise ValueError(f"--loss_weights takes name=weight with names {LOSS_NAMES[:3]}; got {item!r}.")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"--loss_weights: the weight of {item!r} must be a number, got {value!r}.") from None
    if not any(weights.values()):
        raise ValueError(f"--loss_weights {text!r} turns every retrieval loss off.")
    return weights


def build_corpora(args: RetrievalArguments, tokenizer, config) -> tuple[RetrievalCorpus, RetrievalCorpus | None]:
    """The training corpus and the evaluation corpus (None when no evaluation split is asked for)."""
    if args.synthetic_images:
        examples = make_synthetic_examples(args.synthetic_images + args.eval_images, seed=args.seed, image_size=32)
        regions = [synthetic_region_record(example, config.region_feature_size) for example in examples]

        def corpus(start: int, end: int) -> RetrievalCorpus:
            # `--max_images` and `--captions_per_image` cut both splits, as they cut a file's.
            end = min(end, start + args.max_images) if args.max_images else end
            return RetrievalCorpus.from_records(
                examples[start:end],
                tokenizer,
                regions[start:end],
                config.max_text_length,
                config.max_regions,
                args.captions_per_image,
            )

        train = corpus(0, args.synthetic_images)
        return train, corpus(args.synthetic_images, len(examples)) if args.eval_images else None

    if args.train_file is None:
        raise ValueError("give --train_file (with --region_cache) or --synthetic_images.")
    if args.region_cache is None:
        raise ValueError("--train_file needs --region_cache: extract the regions once with imagebert-extract-regions.")

    cache = load_region_cache(args.region_cache)
    check_region_cache_fits(cache, config, f"--region_cache {args.region_cache}", args.model_name_or_path)

    karpathy = args.train_file.endswith(".json")

    def read(split: str) -> list[dict]:
        if karpathy:
            return load_karpathy_split(
                args.train_file, split.split(","), args.image_root, args.max_images, args.allow_outside_root
            )
        return load_manifest_records(
            args.train_file, split, args.max_images, allow_outside_root=args.allow_outside_root
        )

    def corpus(records: list[dict], captions_per_image: int | None) -> RetrievalCorpus:
        try:
            return RetrievalCorpus.from_records(
                records,
                tokenizer,
                region_cache_lookup(cache),
                config.max_text_length,
                config.max_regions,
                captions_per_image,
            )
        except KeyError as error:  # an image without regions: one line naming the cache, as evaluation says it
            raise ValueError(f"--region_cache {args.region_cache}: {error.args[0]}") from None

    train_records = read(args.train_split)
    if not args.eval_split:
        return corpus(train_records, args.captions_per_image), None
    eval_records = read(args.eval_split)
    shared = _shared_pictures(train_records, eval_records)
    if shared:
        logger.warning(
            "%d of the %d images of --eval_split %r are training images too (--train_split %r; e.g. %s): the recall "
            "at the end is not that of held-out images.",
            len(shared),
            len(eval_records),
            args.eval_split,
            args.train_split,
            shared[0],
        )
    # The captions `evaluate_retrieval` ranks on the same split (the protocol's 5 of a Karpathy split), so the
    # recall reported here is that measurement.
    eval_captions = evaluation_captions_per_image(karpathy, args.captions_per_image)
    return corpus(train_records, args.captions_per_image), corpus(eval_records, eval_captions)


def _shared_pictures(train_records: list[dict], eval_records: list[dict]) -> list[str]:
    """The evaluation images the training split lists too (the same image file), found from the records alone: no
    cache lookup, which for a cache keyed by file name reads each image to confirm it."""
    training = {record.get("image") for record in train_records} - {None}
    return [str(record.get("image_id")) for record in eval_records if record.get("image") in training]


def load_model_and_tokenizer(args: RetrievalArguments, loss_weights: dict[str, float]):
    overrides = {"retrieval_loss_weights": loss_weights}
    if args.model_name_or_path is not None:
        from transformers import AutoTokenizer

        # Trained in float32 whatever dtype the folder was saved in (mixed precision comes from the launch config):
        # bf16 weights would drop most of an update as small as the fine-tuning learning rate makes it.
        model = load_retrieval_model(args.model_name_or_path, dtype=torch.float32, **overrides)
        try:  # a checkpoint saved with its processor keeps it, so the fine-tuned folder serves the pipeline
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(args.model_name_or_path)
            if getattr(processor, "image_processor", None) is not None:
                return model, processor.tokenizer, processor
        except OSError:
            pass  # a checkpoint saved without a processor: the fine-tuned folder then serves region records only
        except (ValueError, KeyError) as error:
            logger.warning(
                "--model_name_or_path %s holds a processor that does not load (%s); the fine-tuned folder is saved "
                "without one, so it will not read raw images. Fix or remove its processor files to keep it.",
                args.model_name_or_path,
                str(error)[:300],
            )
        return model, AutoTokenizer.from_pretrained(args.model_name_or_path), None
    if not args.synthetic_images:
        raise ValueError("--model_name_or_path is needed unless --synthetic_images builds a tiny model.")

    tokenizer = make_synthetic_tokenizer()
    config = ImageBERTConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        region_feature_size=32,
        num_object_classes=24,
        max_regions=8,
        max_text_length=16,
        contrastive_embedding_size=32,
        **overrides,
    )
    return ImageBERTForImageTextRetrieval(config), tokenizer, None


def evaluate(model, corpus: RetrievalCorpus, args: RetrievalArguments, output_dir: Path) -> dict:
    ranking = rank_corpus(model, corpus, args.eval_batch_size, args.eval_shortlist_k)
    results = {"full": retrieval_metrics(ranking.scores, corpus.text_to_image)}
    if ranking.shortlist is not None:
        results[f"shortlist_k{args.eval_shortlist_k}"] = ranking.shortlist_metrics()
    ranking.plot(output_dir, title=f"{corpus.num_images} images")
    return results


def heads_left_untrained(model, args: RetrievalArguments) -> list[str]:
    """The projection heads the run leaves as they came when they came untrained: with `--contrastive_weight 0`
    nothing trains them, so those a start checkpoint lacked (a pretraining one), or all of a model built from
    scratch (`--synthetic_images` without `--model_name_or_path`), stay as initialised. They are left out of
    `final/` and of what is published, so that every later load reports them untrained (the pipeline then ranks
    without a shortlist), and `--eval_shortlist_k` is refused, naming both flags, before anything is trained or
    written."""
    if args.contrastive_weight:
        return []
    heads = list(PROJECTION_HEADS) if args.model_name_or_path is None else untrained_heads(model)
    if heads and args.eval_shortlist_k:
        source = (
            "which a model built from scratch starts with at random"
            if args.model_name_or_path is None
            else f"which {args.model_name_or_path} does not hold"
        )
        raise ValueError(
            f"--eval_shortlist_k {args.eval_shortlist_k}: with --contrastive_weight 0 nothing trains the projection "
            f"heads ({', '.join(heads)}), {source}, so the shortlist would be random; leave out --eval_shortlist_k, "
            "or give --contrastive_weight > 0 to train them."
        )
    return heads


# Every numeric flag's rule as `check_field`'s (kind, lowest, highest); a flag left unset (None) is not checked. The
# flags pretraining takes too follow its rules (`TRAINING_FLAG_RULES`). `eval_images` 0 means no evaluation,
# `contrastive_weight` 0 no contrastive loss and `max_grad_norm` 0 no clipping.
_FLAG_RULES = {
    **TRAINING_FLAG_RULES,
    "synthetic_images": ("int", 1, None),
    "eval_images": ("int", 0, None),
    "max_images": ("int", 1, None),
    "captions_per_image": ("int", 1, None),
    "contrastive_weight": ("float", 0.0, None),
    "num_negatives": ("int", 1, None),
    "hard_pool_size": ("int", 1, None),
    "num_epochs": ("positive", None, None),
    "warmup_ratio": ("prob<1", None, None),
    "weight_decay": ("float", 0.0, None),
    "max_grad_norm": ("float", 0.0, None),
    "eval_batch_size": ("int", 1, None),
    "eval_shortlist_k": ("int", 1, None),
}


def expand_path_flags(args: RetrievalArguments) -> RetrievalArguments:
    """`args` with `~` expanded in every flag naming a file or folder (`expand_home`)."""
    return dataclasses.replace(args, **expand_home({name: getattr(args, name) for name in path_flags(args)}))


def check_flags(args: RetrievalArguments) -> RetrievalArguments:
    """Raises `ValueError` naming the flag when a setting cannot work: the checks that need no accelerator, made
    before one is built (it takes some of them) and before anything is written.

    Returns:
        The flags as the run uses them, `~` expanded in its paths (`expand_path_flags`): what was checked.
    """
    args = expand_path_flags(args)
    check_flag_values(args, _FLAG_RULES)
    # The schedules the loop can step (pretraining's too): the others need a metric or settings no flag gives.
    if args.lr_scheduler_type not in SCHEDULER_TYPES:
        raise ValueError(
            f"--lr_scheduler_type must be one of {list(SCHEDULER_TYPES)}, got {args.lr_scheduler_type!r}."
        )
    if args.synthetic_images and args.seed == HELD_OUT_SEED:
        raise ValueError(
            f"--seed {args.seed} with --synthetic_images would train on the held-out images evaluate_retrieval "
            "--dataset synthetic ranks (they are generated from that seed); choose another --seed."
        )
    if args.lr_scheduler_type == "constant" and args.warmup_ratio > 0:
        # transformers' "constant" schedule drops the warmup it is given: the flag would change nothing.
        raise ValueError(
            f"--lr_scheduler_type constant has no warmup, so --warmup_ratio {args.warmup_ratio} (0.1 unless given) "
            "would be ignored; use --lr_scheduler_type constant_with_warmup, or --warmup_ratio 0."
        )
    output_dir = check_output_dir(args.output_dir)
    if args.train_file is not None and not Path(args.train_file).is_file():
        raise FileNotFoundError(
            f"--train_file {args.train_file} does not exist (expected a Karpathy split file or a jsonl manifest)."
        )
    if args.hard_negatives and args.hard_pool_size < args.num_negatives:
        raise ValueError(
            f"--hard_pool_size ({args.hard_pool_size}) must be at least --num_negatives ({args.num_negatives}): the "
            "hard negatives are the best-scored of that many candidates."
        )
    if args.hard_negatives and args.negative_mining != "random":
        raise ValueError(
            f"--hard_negatives and --negative_mining {args.negative_mining} both choose the negatives; pick one."
        )
    if args.resume:
        if _has_progress(output_dir):
            check_resumed_flags(args)
    elif (output_dir / "final").exists():
        raise FileExistsError(
            f"{args.output_dir} already holds a finished run; pass --resume or another --output_dir."
        )
    elif (checkpoint := latest_checkpoint(output_dir / "checkpoints")) is not None:
        # A new run would save its steps beside the other run's, and --resume would continue the newest of them.
        raise FileExistsError(
            f"--output_dir {args.output_dir} holds an interrupted run ({checkpoint.name}): pass --resume to continue "
            "it or choose another --output_dir."
        )
    return args


def _has_progress(output_dir: Path) -> bool:
    """Whether the run in `output_dir` is finished or has a complete checkpoint: what `--resume` continues from."""
    if (output_dir / "final" / COMPLETE_FILE).is_file():
        return True
    return latest_checkpoint(output_dir / "checkpoints") is not None


def _recorded_flags(args: RetrievalArguments) -> dict:
    """The flags as `run_args.json` holds them (a path given as a `Path` is its string)."""
    return json.loads(json.dumps(dataclasses.asdict(args), default=str))


def _location(value, working_dir: str, hub_id_allowed: bool):
    """The file or folder a path flag's `value` names from `working_dir`, resolved; `value` itself when it names
    none: unset, empty, or (`hub_id_allowed`) no local path, so a Hub id as `from_pretrained` reads it."""
    if not isinstance(value, str) or not value.strip():
        return value
    # A run of an earlier version recorded `~` as typed (its region cache was read from the home folder).
    path = os.path.join(working_dir, os.path.expanduser(value))
    if hub_id_allowed and not os.path.exists(path):
        return value
    return os.path.realpath(path)


def flag_differences(args: RetrievalArguments, stored: dict) -> list[tuple[str, Any, Any]]:
    """`(flag, value there, value now)` of each flag that decides a weight or the data (all but `RESUMABLE_FLAGS`)
    and differs between `stored`, a run's `run_args.json`, and `args`; a flag the file lacks compares by its default.
    A flag naming a file or folder compares by the place it names, each read from the working directory its run was
    given it in (the file's `WORKING_DIR_KEY`, else the current one)."""
    working_dir = os.getcwd()
    stored_working_dir = stored.get(WORKING_DIR_KEY) or working_dir
    paths = path_flags(args)
    current = _recorded_flags(args)
    differences = []
    for item in dataclasses.fields(args):
        if item.name in RESUMABLE_FLAGS:
            continue
        default = item.default if item.default is not dataclasses.MISSING else None
        old, new = stored.get(item.name, default), current[item.name]
        if item.name in paths:
            old = _location(old, stored_working_dir, paths[item.name])
            new = _location(new, working_dir, paths[item.name])
        if old != new:
            differences.append((item.name, old, new))
    return differences


def check_resumed_flags(args: RetrievalArguments) -> None:
    """Refuses to resume a run whose `run_args.json` differs from `args` in a flag that decides a weight or the data
    (all but `RESUMABLE_FLAGS`): the rest of the run would follow neither setting. A folder without the file (a run
    started by an earlier version) is not checked; a flag the file lacks compares by its default. A flag naming a
    file or folder compares by the place it names, each read from the working directory its run was given it in (the
    file's `WORKING_DIR_KEY`, else the current one): `x`, `./x/` and its absolute path are one flag value, while the
    same relative path given from another directory is another."""
    path = Path(args.output_dir) / RUN_ARGS_FILE
    if not path.is_file():
        return
    try:
        stored = read_json_file(path, "the flags of the run being resumed, as a JSON object")
        if not isinstance(stored, dict):
            raise ValueError(f"{path} holds a JSON {type(stored).__name__}, not an object.")
        if not isinstance(stored.get(WORKING_DIR_KEY, ""), str):
            raise ValueError(f"{path} holds {WORKING_DIR_KEY} {stored[WORKING_DIR_KEY]!r}, not a folder.")
    except ValueError as error:
        raise ValueError(
            f"--resume: {path} (the flags of the run being resumed) cannot be read: {error} Restore it, or give a new "
            "--output_dir."
        ) from None
    paths = path_flags(args)
    differences = [
        # A path whole: cut short, it would hide where the two differ.
        f"{name} is {old!r} there, {new!r} now"
        if name in paths
        else f"{name} is {short_value(old)} there, {short_value(new)} now"
        for name, old, new in flag_differences(args, stored)
    ]
    if not differences:
        return
    more = len(differences) - DIFFERENCES_SHOWN
    raise ValueError(
        f"--resume: {args.output_dir} holds a run started with other flags: "
        + "; ".join(differences[:DIFFERENCES_SHOWN])
        + (f"; and {more} more" if more > 0 else "")
        + f". Resume with the flags it was started with ({path}), or give a new --output_dir."
    )


def _check_arguments(args: RetrievalArguments, accelerator) -> None:
    """Refuses what the launch does not allow, before the model is loaded or anything is written (the flags
    themselves: `check_flags`)."""
    if args.hard_negatives and accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise ValueError(
            f"--hard_negatives scores candidates with the whole model inside the collator, which sharded parameters "
            f"({accelerator.distributed_type.value}) do not allow; use a DDP launch config (accelerate_4gpu.yaml) "
            "or random negatives."
        )


def retrieval_dataloader(args: RetrievalArguments, train_corpus: RetrievalCorpus, model):
    """The positives in a seeded order, each with `num_negatives` negatives from the collator (random, or the
    hardest of a pool scored by `model`), and the sampler inside the loader."""
    if args.hard_negatives:
        negatives = HardNegativeSampler(
            train_corpus, args.num_negatives, args.hard_pool_size, args.negative_type, model, seed=args.seed
        )
    else:
        negatives = RandomNegativeSampler(train_corpus, args.num_negatives, args.negative_type, args.seed)
    sampler = MixtureSampler([train_corpus.num_texts], [1.0], seed=args.seed)
    dataloader = torch.utils.data.DataLoader(
        RetrievalPairDataset(train_corpus),
        batch_size=args.per_device_train_batch_size,
        sampler=sampler,
        # Hard mining runs the model inside the collator, so batches are built in the main process.
        collate_fn=DataCollatorForImageTextRetrieval(train_corpus, negatives),
        num_workers=0,
        # Its own generator: creating an iterator would otherwise draw from the global RNG, which a resumed run
        # does once more than an uninterrupted one (dropout masks would then differ).
        generator=torch.Generator().manual_seed(args.seed),
    )
    return dataloader, sampler, negatives


def retrieval_stage(args: RetrievalArguments, accelerator, model, train_corpus: RetrievalCorpus) -> Stage:
    """Fine-tuning as the stage runner takes it: the model with its contrastive heads (`RetrievalTrainingModel`)
    and `retrieval_dataloader`'s batches."""
    dataloader, sampler, negatives = retrieval_dataloader(args, train_corpus, model)
    wrapper = RetrievalTrainingModel(
        model,
        args.contrastive_weight,
        args.negative_mining,
        args.negative_type,
        seed=args.seed,
        contrastive_trains_encoder=args.contrastive_trains_encoder,
    )

    def on_prepared(prepared, state: TrainState) -> None:
        if args.hard_negatives:
            negatives.model = accelerator.unwrap_model(prepared).model
        if accelerator.log_with:
            accelerator.init_trackers(
                "imagebert_retrieval", config={"seed": args.seed, "total_steps": state.total_steps}
            )

    def describe(total_steps: int) -> str:
        kind = (
            "hard" if args.hard_negatives else "in-batch mined" if args.negative_mining == "contrastive" else "random"
        )
        return (
            f"{train_corpus.num_images} images, {train_corpus.num_texts} captions; {total_steps} steps; losses "
            f"{parse_loss_weights(args.loss_weights)} + contrastive x{args.contrastive_weight}; {args.num_negatives} "
            f"{kind} negatives ({args.negative_type})"
        )

    # The flags named as the schedule's fields set them, as a pretraining stage's do (AdamW's betas and epsilon, which
    # no flag names, keep their defaults).
    schedule = Schedule(
        **{item.name: getattr(args, item.name) for item in dataclasses.fields(Schedule) if hasattr(args, item.name)}
    )
    return Stage(
        name="retrieval",
        model=wrapper,
        dataloader=dataloader,
        schedule=schedule,
        folder=Path(args.output_dir),
        sampler=sampler,
        describe=describe,
        on_prepared=on_prepared,
    )


def _finish(
    accelerator, wrapper, state, tokenizer, processor, eval_corpus, args: RetrievalArguments, untrained: list[str]
) -> dict:
    """Saves `final/` (without the `untrained` heads, `heads_left_untrained`), then plots the losses, evaluates on
    the evaluation corpus and pushes to the Hub when asked (`_report`)."""
    output_dir = Path(args.output_dir)
    # Gathers sharded parameters (FSDP, DeepSpeed ZeRO-3) on every process; the main process writes.
    final_dir = save_final(
        accelerator,
        wrapper,
        state,
        output_dir / "final",
        processor or tokenizer,
        submodule="model",
        leave_out=untrained,
    )
    model = accelerator.unwrap_model(wrapper).model
    # What the start checkpoint lacked is trained now, but for the heads left untrained: the pipeline built to
    # publish the model reads this (`untrained_heads`) and leaves them out too.
    left_out = tuple(head + "." for head in untrained)
    model._missing_keys_at_load = [key for key in model.state_dict() if left_out and key.startswith(left_out)]
    results = {"history": state.history, "final_model": str(final_dir)}
    if not accelerator.is_main_process:
        return results
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        # The model in memory holds this process's shards only; evaluate and publish the gathered copy.
        model = type(model).from_pretrained(final_dir).to(accelerator.device)
    return _report(accelerator, model, processor, eval_corpus, args, results)


def _report(accelerator, model, processor, eval_corpus, args: RetrievalArguments, results: dict) -> dict:
    """The end of a run once `final/` is saved (main process): the loss plot, the evaluation and the upload."""
    output_dir = Path(args.output_dir)
    plot_losses(results["history"], output_dir / "losses.png", tasks=("loss", *LOSS_NAMES), title="retrieval losses")
    card_results = None
    if eval_corpus is not None:
        results["eval"] = evaluate(model, eval_corpus, args, output_dir)
        # The gallery's size beside its recall: --max_images and --captions_per_image cut the split.
        sizes = {"num_images": eval_corpus.num_images, "num_texts": eval_corpus.num_texts}
        atomic_write_json(output_dir / "eval_results.json", {**results["eval"], **sizes}, indent=1)
        accelerator.print(json.dumps(results["eval"], indent=1))
        card_results = [_card_result(args, results["eval"]["full"], **sizes)]
    if args.push_to_hub:
        push_to_hub(model, processor, args.hub_model_id, results=card_results, base_model=_hub_start(args))
    return results


def _hub_start(args: RetrievalArguments) -> str | None:
    """The Hub id the run started from, for the card's `base_model`; None for a local folder or a fresh model."""
    name = args.model_name_or_path
    if name is None or os.path.exists(name):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _card_result(args: RetrievalArguments, metrics: dict, num_images: int, num_texts: int) -> dict:
    """The model card's entry (`evaluation.hub.build_model_card`) for the full ranking of the evaluation corpus. It
    is named by the file and the size of the gallery ranked, never a published protocol's name: the split may be
    cut (`--max_images`, `--captions_per_image`)."""
    if args.synthetic_images:
        name, kind, split = "synthetic", "synthetic", None
    else:
        name = Path(args.train_file).name
        kind, split = ("karpathy" if args.train_file.endswith(".json") else "manifest"), args.eval_split
    return {
        "dataset_name": name,
        "dataset_type": kind,
        "dataset_config": f"{num_images} images x {num_texts} texts",
        "dataset_split": split,
        "num_images": num_images,
        "num_texts": num_texts,
        "metrics": metrics,
        "ranking": "full",
    }


def _end_finished_run(accelerator, args: RetrievalArguments, loss_weights: dict[str, float]) -> dict:
    """`--resume` of a run whose `final/` is complete: nothing is trained again; `final/` is evaluated and pushed
    as the end of the run does (a run stopped while it evaluated or uploaded ends here)."""
    final_dir = Path(args.output_dir) / "final"
    state = TrainState.load(final_dir)
    model, tokenizer, processor = load_model_and_tokenizer(
        dataclasses.replace(args, model_name_or_path=str(final_dir)), loss_weights
    )
    heads_left_untrained(model, dataclasses.replace(args, model_name_or_path=str(final_dir)))
    if args.push_to_hub:
        check_push_to_hub(args.hub_model_id, processor, needs_processor=True)
    _, eval_corpus = build_corpora(args, tokenizer, model.config)
    accelerator.print(
        f"{final_dir} holds the finished run ({state.completed_steps} steps): nothing to train"
        + ("; evaluating it" if eval_corpus is not None else "")
    )
    results = {"history": state.history, "final_model": str(final_dir)}
    # The other processes end here, as at the end of a run: waiting at a barrier while the main process evaluates (hours
    # on a large gallery) would outlast the process group's timeout and end the run with the evaluation unwritten.
    if accelerator.is_main_process:
        with hold_run_folder(accelerator, args.output_dir):
            _report(accelerator, model.to(accelerator.device), processor, eval_corpus, args, results)
    return results


def run_retrieval_finetuning(args: RetrievalArguments) -> dict:
    """Fine-tunes (or, with `--synthetic_images`, trains a tiny model) for retrieval, saves `final/` with its
    processor or tokenizer, and evaluates on the evaluation split when there is one.

    With `--resume`, a run whose `final/` is complete is not trained again: `final/` is evaluated (and pushed when
    asked). The flags that decide the weights or the data must be those the run started with (`run_args.json` in
    the output folder), and a new run (no `--resume`) is refused in a folder that holds another one's checkpoints.

    Raises:
        TrainingStopped: `args.stop_after_steps` was reached, or the process got SIGTERM during training (a
            checkpoint was saved at the end of the step); the run continues with `--resume`.

    Returns:
        `{"history", "final_model"}` and, with an evaluation split, `"eval"` (recall of full ranking and, with
        `eval_shortlist_k`, of shortlist + re-rank).
    """
    from accelerate.utils import set_seed

    args = check_flags(args)
    loss_weights = parse_loss_weights(args.loss_weights)
    accelerator = build_accelerator(
        args.output_dir, args.mixed_precision, args.report_to, args.cpu, args.gradient_accumulation_steps
    )
    _check_arguments(args, accelerator)
    output_dir = Path(args.output_dir)
    if args.resume and (output_dir / "final" / COMPLETE_FILE).is_file():
        return _end_finished_run(accelerator, args, loss_weights)
    checkpoints = output_dir / "checkpoints"
    # A scheduler passes --resume on the first submission too, so an empty folder starts the run, with a word.
    nothing_to_resume = args.resume and latest_checkpoint(checkpoints) is None
    if nothing_to_resume:
        check_nothing_left_unexpanded(output_dir)
    if nothing_to_resume and accelerator.is_main_process:
        logger.warning(
            "--resume: nothing to resume in %s (no complete checkpoint); the run starts from the beginning.",
            checkpoints,
        )
    elif args.resume and accelerator.is_main_process and not (output_dir / RUN_ARGS_FILE).is_file():
        logger.warning(
            "--resume: %s has no %s (a run started by an earlier version), so the flags it was started with cannot "
            "be compared with these; resume with the same ones.",
            output_dir,
            RUN_ARGS_FILE,
        )
    set_seed(args.seed)
    model, tokenizer, processor = load_model_and_tokenizer(args, loss_weights)
    untrained = heads_left_untrained(model, args)
    if args.push_to_hub:
        # Checked before training (nothing is written yet): the publisher needs the processor loaded with the model.
        check_push_to_hub(args.hub_model_id, processor, needs_processor=True)
    train_corpus, eval_corpus = build_corpora(args, tokenizer, model.config)
    stage = retrieval_stage(args, accelerator, model, train_corpus)
    # The loop's settings that RetrievalArguments holds under the same names.
    shared = ("checkpointing_steps", "save_total_limit", "logging_steps", "max_grad_norm")
    settings = LoopSettings(
        loss_names=LOSS_NAMES,
        stop_after_global_step=args.stop_after_steps,
        **{name: getattr(args, name) for name in shared},
    )
    with hold_run_folder(accelerator, args.output_dir):
        if accelerator.is_main_process:
            record = {**_recorded_flags(args), WORKING_DIR_KEY: os.getcwd()}
            atomic_write_json(output_dir / RUN_ARGS_FILE, record, indent=1)
        # Training answers SIGTERM with a checkpoint. The final save and the evaluation end on it as on any signal;
        # with checkpoints asked for, the last step gets one too, so that a run killed while it saves `final/` or
        # evaluates (hours on a large gallery) resumes there with no step repeated.
        with stop_on_sigterm():
            wrapper, state = run_stage(
                accelerator,
                stage,
                settings,
                resume=args.resume,
                checkpoint_at_end=args.checkpointing_steps is not None,
            )
        results = _finish(accelerator, wrapper, state, tokenizer, processor, eval_corpus, args, untrained)
        accelerator.end_training()
    return results


__all__ = [
    "RESUMABLE_FLAGS",
    "RUN_ARGS_FILE",
    "WORKING_DIR_KEY",
    "build_corpora",
    "check_flags",
    "check_resumed_flags",
    "expand_path_flags",
    "flag_differences",
    "evaluate",
    "load_model_and_tokenizer",
    "parse_loss_weights",
    "retrieval_dataloader",
    "retrieval_stage",
    "run_retrieval_finetuning",
]
