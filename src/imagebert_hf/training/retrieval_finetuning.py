"""Retrieval fine-tuning with Accelerate (binary, multi-class, triplet or a weighted mix), on the shared loop.

`examples/run_retrieval.py` parses `RetrievalArguments` and calls `run_retrieval_finetuning`. Each positive
caption-image pair comes with `num_negatives` negatives (other captions or other images, at random or the hardest of
a scored pool); the unimodal heads that shortlist candidates learn alongside with a contrastive loss over the batch's
positives (`RetrievalTrainingModel`). Checkpoints, resumption, logging and the loss plot work as in pretraining.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.utils import ModelOutput

from ..data.pair_sources import MixtureSampler
from ..data.retrieval_corpus import (
    DataCollatorForImageTextRetrieval,
    HardNegativeSampler,
    RandomNegativeSampler,
    RetrievalCorpus,
    RetrievalPairDataset,
    load_karpathy_split,
    load_manifest_records,
    region_cache_lookup,
)
from ..data.synthetic import make_synthetic_examples, make_synthetic_tokenizer, synthetic_region_record
from ..evaluation.full_ranking import rank_corpus
from ..evaluation.hub import push_to_hub
from ..evaluation.recall import retrieval_metrics
from ..formats.files import atomic_write_json
from ..models.imagebert import ImageBERTConfig, ImageBERTForImageTextRetrieval
from ..regions.feature_cache import load_region_cache
from .checkpointing import TrainState
from .loop import LoopSettings, build_accelerator
from .plots import plot_losses
from .runner import Schedule, Stage, run_stage, save_final


LOSS_NAMES = ("binary", "multiclass", "triplet", "contrastive")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
REGION_INPUTS = ("region_features", "region_locations", "region_attention_mask")


@dataclass
class RetrievalArguments:
    """Flags of `examples/run_retrieval.py` (`HfArgumentParser` dataclass)."""

    output_dir: str = field(metadata={"help": "Where checkpoints, the final model, logs and plots go."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "ImageBERT checkpoint to start from (e.g. a pretraining stage's final/)."}
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "Karpathy split file (dataset_coco.json, dataset_flickr30k.json) or a jsonl manifest."},
    )
    image_root: str | None = field(default=None, metadata={"help": "Folder the Karpathy image paths start from."})
    train_split: str = field(
        default="train", metadata={"help": "Split(s) to train on, comma-separated (COCO: train,restval)."}
    )
    eval_split: str | None = field(default=None, metadata={"help": "Split to evaluate on at the end (e.g. test)."})
    region_cache: str | None = field(
        default=None, metadata={"help": "Region cache folder (imagebert-extract-regions)."}
    )
    synthetic_images: int | None = field(
        default=None, metadata={"help": "Train on this many generated images instead of files (demo and tests)."}
    )
    eval_images: int = field(default=100, metadata={"help": "Held-out generated images evaluated at the end."})
    max_images: int | None = field(default=None, metadata={"help": "Use only the first images of each split."})
    captions_per_image: int | None = field(default=None, metadata={"help": "Keep at most this many captions."})
    loss_weights: str = field(
        default="binary=1", metadata={"help": "Retrieval losses and weights, e.g. binary=1,multiclass=0.5,triplet=1."}
    )
    contrastive_weight: float = field(
        default=1.0, metadata={"help": "Weight of the contrastive loss of the shortlist heads (0: not trained)."}
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
    seed: int = field(default=42, metadata={"help": "Seed of initialisation, data order and negatives."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps (overrides num_epochs)."})
    num_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training captions."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Positives per process and micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate (the paper: 5e-5)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of steps with linear warmup."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "A transformers scheduler name."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    logging_steps: int = field(default=10, metadata={"help": "Log losses every this many steps."})
    checkpointing_steps: int | None = field(default=None, metadata={"help": "Save the training state this often."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last complete checkpoint."})
    stop_after_steps: int | None = field(default=None, metadata={"help": "Stop as if killed (resumption tests)."})
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


def parse_loss_weights(text: str) -> dict[str, float]:
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in LOSS_NAMES[:3] or not value:
            raise ValueError(f"--loss_weights takes name=weight with names {LOSS_NAMES[:3]}; got {item!r}.")
        weights[name] = float(value)
    if not any(weights.values()):
        raise ValueError(f"--loss_weights {text!r} turns every retrieval loss off.")
    return weights


NEGATIVE_MINING = ("random", "contrastive")


def mine_contrastive_negatives(
    similarities: torch.Tensor,
    positive_images: torch.Tensor,
    num_negatives: int,
    negative_type: str,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In-batch hard negatives drawn by the unimodal similarity of the positives, as ALBEF and BLIP train ITM.

    Args:
        similarities: `(B, B)` text-image similarities of the batch's positives (row: text, column: image), already
            divided by the temperature.
        positive_images: `(B,)` the image of each positive; pairs of one image are never negatives of each other.
        num_negatives: negatives per positive (P).
        negative_type: `"text"` (another caption for the positive's image), `"image"` (another image for its
            caption) or `"both"` (alternating, text first).
        generator: seeds the draws.

    Returns:
        `(text_source, image_source, found)`, each `(B, P)`: negative p of positive i pairs the caption of positive
        `text_source[i, p]` with the image of positive `image_source[i, p]`; `found` is False where the batch holds
        no other image to draw from (the caller keeps its random negative there).
    """
    batch_size = similarities.shape[0]
    same_image = positive_images[:, None] == positive_images[None, :]
    logits = similarities.detach().float().masked_fill(same_image, float("-inf"))
    found_any = ~same_image.all(dim=1)
    # Rows without candidates get uniform weights; their draws are discarded through `found`.
    safe = torch.where(found_any[:, None], logits, torch.zeros_like(logits))
    own = torch.arange(batch_size, device=similarities.device)[:, None].expand(batch_size, num_negatives)
    texts_for_image = torch.multinomial(safe.T.softmax(dim=1), num_negatives, replacement=True, generator=generator)
    images_for_text = torch.multinomial(safe.softmax(dim=1), num_negatives, replacement=True, generator=generator)
    if negative_type == "text":
        use_text = torch.ones(batch_size, num_negatives, dtype=torch.bool, device=similarities.device)
    elif negative_type == "image":
        use_text = torch.zeros(batch_size, num_negatives, dtype=torch.bool, device=similarities.device)
    else:
        use_text = (torch.arange(num_negatives, device=similarities.device) % 2 == 0)[None].expand(batch_size, -1)
    text_source = torch.where(use_text, texts_for_image, own)
    image_source = torch.where(use_text, own, images_for_text)
    return text_source, image_source, found_any[:, None].expand(batch_size, num_negatives)


class RetrievalTrainingModel(torch.nn.Module):
    """The cross-encoder's retrieval losses plus the contrastive loss of its unimodal heads, as one module, so the
    shared Accelerate loop (one forward, one `loss`) trains both.

    With `contrastive_trains_encoder=False`, the contrastive loss trains the projection heads only: the encoder the
    cross-encoder shares then learns from the retrieval losses alone (on the shared data the contrastive loss
    otherwise halves the cross-encoder's recall, docs/results.md).

    With `negative_mining="contrastive"`, each group's negatives are replaced by in-batch hard negatives drawn by
    the unimodal similarity (`mine_contrastive_negatives`): the cross-encoder then learns to separate the candidates
    a shortlist actually gives it, rather than random pairs, which a briefly trained shortlist already tells apart.
    """

    def __init__(
        self,
        model,
        contrastive_weight: float = 1.0,
        negative_mining: str = "random",
        negative_type: str = "both",
        seed: int = 0,
        contrastive_trains_encoder: bool = True,
    ):
        super().__init__()
        if negative_mining not in NEGATIVE_MINING:
            raise ValueError(f"negative_mining must be one of {NEGATIVE_MINING}, got {negative_mining!r}.")
        if negative_mining == "contrastive" and not contrastive_weight:
            raise ValueError("negative_mining='contrastive' draws by the unimodal heads: give contrastive_weight > 0.")
        self.model = model
        self.contrastive_weight = contrastive_weight
        self.negative_mining = negative_mining
        self.negative_type = negative_type
        self.seed = int(seed)
        self.contrastive_trains_encoder = contrastive_trains_encoder

    def _mined_inputs(self, inputs, group_size, positive_index, positive_images, similarities):
        num_negatives = group_size - 1
        positive_images = positive_images.cpu()
        # Seeded by the batch itself, so that a resumed run (same data order) draws the same negatives.
        batch_key = int((positive_images * torch.arange(1, positive_images.numel() + 1)).sum())
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + batch_key)
        text_source, image_source, found = mine_contrastive_negatives(
            similarities.cpu(), positive_images, num_negatives, self.negative_type, generator
        )
        device = positive_index.device
        positives = positive_index.cpu()
        # Row of the batch each pair's text and regions come from: the positive itself first, then the negatives
        # (the mined one where the batch had another image, the collator's random one otherwise).
        random_rows = positives[:, None] + torch.arange(1, group_size)[None]
        text_rows = torch.where(found, positives[text_source], random_rows)
        image_rows = torch.where(found, positives[image_source], random_rows)
        text_rows = torch.cat([positives[:, None], text_rows], dim=1).reshape(-1).to(device)
        image_rows = torch.cat([positives[:, None], image_rows], dim=1).reshape(-1).to(device)
        mined = {}
        for key, value in inputs.items():
            rows = text_rows if key in TEXT_INPUTS else image_rows if key in REGION_INPUTS else None
            mined[key] = value[rows] if rows is not None else value
        return mined

    def forward(self, labels, group_size, positive_index, positive_images=None, **inputs) -> ModelOutput:
        contrastive, similarities = None, None
        if self.contrastive_weight and positive_index.numel() > 1:
            text = {key: inputs[key][positive_index] for key in TEXT_INPUTS if key in inputs}
            regions = {key: inputs[key][positive_index] for key in REGION_INPUTS if key in inputs}
            grad = self.contrastive_trains_encoder
            text_embeddings = self.model.get_text_embeddings(**text, encoder_grad=grad)
            region_embeddings = self.model.get_region_embeddings(**regions, encoder_grad=grad)
            contrastive = self.model.contrastive_loss(text_embeddings, region_embeddings)
            similarities = text_embeddings @ region_embeddings.T / self.model.config.contrastive_temperature
        if self.negative_mining == "contrastive" and similarities is not None and group_size > 1:
            if positive_images is None:
                raise ValueError("negative_mining='contrastive' needs the batch's positive_images (the collator's).")
            inputs = self._mined_inputs(inputs, group_size, positive_index, positive_images, similarities)
        outputs = self.model(**inputs, labels=labels, group_size=group_size)
        losses = {f"{name}_loss": getattr(outputs, f"{name}_loss") for name in LOSS_NAMES[:3]}
        result = ModelOutput(loss=outputs.loss, **{key: value for key, value in losses.items() if value is not None})
        if contrastive is not None:
            result["contrastive_loss"] = contrastive
            result["loss"] = outputs.loss + self.contrastive_weight * contrastive
        return result


def build_corpora(args: RetrievalArguments, tokenizer, config) -> tuple[RetrievalCorpus, RetrievalCorpus | None]:
    """The training corpus and the evaluation corpus (None when no evaluation split is asked for)."""
    if args.synthetic_images:
        examples = make_synthetic_examples(args.synthetic_images + args.eval_images, seed=args.seed, image_size=32)
        regions = [synthetic_region_record(example, config.region_feature_size) for example in examples]

        def corpus(part: slice) -> RetrievalCorpus:
            return RetrievalCorpus.from_records(
                examples[part], tokenizer, regions[part], config.max_text_length, config.max_regions
            )

        train = corpus(slice(0, args.synthetic_images))
        return train, corpus(slice(args.synthetic_images, None)) if args.eval_images else None

    if args.train_file is None:
        raise ValueError("give --train_file (with --region_cache) or --synthetic_images.")
    if args.region_cache is None:
        raise ValueError("--train_file needs --region_cache: extract the regions once with imagebert-extract-regions.")

    cache = load_region_cache(args.region_cache)

    def read(split: str) -> list[dict]:
        if args.train_file.endswith(".json"):
            return load_karpathy_split(args.train_file, split.split(","), args.image_root, args.max_images)
        return load_manifest_records(args.train_file, split, args.max_images)

    def corpus(split: str) -> RetrievalCorpus:
        return RetrievalCorpus.from_records(
            read(split),
            tokenizer,
            region_cache_lookup(cache),
            config.max_text_length,
            config.max_regions,
            args.captions_per_image,
        )

    return corpus(args.train_split), corpus(args.eval_split) if args.eval_split else None


def load_model_and_tokenizer(args: RetrievalArguments, loss_weights: dict[str, float]):
    overrides = {"retrieval_loss_weights": loss_weights}
    if args.model_name_or_path is not None:
        from transformers import AutoTokenizer

        model = ImageBERTForImageTextRetrieval.from_pretrained(args.model_name_or_path, **overrides)
        try:  # a checkpoint saved with its processor keeps it, so the fine-tuned folder serves the pipeline
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(args.model_name_or_path)
            if getattr(processor, "image_processor", None) is not None:
                return model, processor.tokenizer, processor
        except (OSError, ValueError, KeyError):
            pass
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


def _check_arguments(args: RetrievalArguments, accelerator) -> None:
    if args.hard_negatives and args.negative_mining != "random":
        raise ValueError(
            f"--hard_negatives and --negative_mining {args.negative_mining} both choose the negatives; pick one."
        )
    if args.hard_negatives and accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise ValueError(
            f"--hard_negatives scores candidates with the whole model inside the collator, which sharded parameters "
            f"({accelerator.distributed_type.value}) do not allow; use a DDP launch config (accelerate_4gpu.yaml) "
            "or random negatives."
        )
    if (Path(args.output_dir) / "final").exists() and not args.resume:
        raise FileExistsError(
            f"{args.output_dir} already holds a finished run; pass --resume or another --output_dir."
        )


def retrieval_stage(args: RetrievalArguments, accelerator, model, train_corpus: RetrievalCorpus) -> Stage:
    """Fine-tuning as the stage runner takes it: the model with its contrastive heads (`RetrievalTrainingModel`),
    the positives in a seeded order, the collator adding each positive's negatives."""
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

    schedule = Schedule(
        learning_rate=args.learning_rate,
        max_steps=args.max_steps or None,
        num_epochs=args.num_epochs,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        weight_decay=args.weight_decay,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_ratio=args.warmup_ratio,
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


def _finish(accelerator, wrapper, state, companion, processor, eval_corpus, args: RetrievalArguments) -> dict:
    """Saves `final/`, plots the losses, evaluates on the evaluation corpus and pushes to the Hub when asked."""
    output_dir = Path(args.output_dir)
    # Gathers sharded parameters (FSDP, DeepSpeed ZeRO-3) on every process; the main process writes.
    final_dir = save_final(accelerator, wrapper, state, output_dir / "final", companion, submodule="model")
    model = accelerator.unwrap_model(wrapper).model
    results = {"history": state.history, "final_model": str(final_dir)}
    if not accelerator.is_main_process:
        return results
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        # The model in memory holds this process's shards only; evaluate and publish the gathered copy.
        model = type(model).from_pretrained(final_dir).to(accelerator.device)
    plot_losses(state.history, output_dir / "losses.png", tasks=("loss", *LOSS_NAMES), title="retrieval losses")
    if eval_corpus is not None:
        results["eval"] = evaluate(model, eval_corpus, args, output_dir)
        atomic_write_json(output_dir / "eval_results.json", results["eval"], indent=1)
        accelerator.print(json.dumps(results["eval"], indent=1))
    if args.push_to_hub:
        if not args.hub_model_id or processor is None:
            raise ValueError("--push_to_hub needs --hub_model_id and a checkpoint saved with its processor.")
        push_to_hub(model, processor, args.hub_model_id, results=None)
    return results


def run_retrieval_finetuning(args: RetrievalArguments) -> dict:
    """Fine-tunes (or, with `--synthetic_images`, trains a tiny model) for retrieval, saves `final/` with its
    processor or tokenizer, and evaluates on the evaluation split when there is one.

    Raises:
        TrainingStopped: `args.stop_after_steps` was reached (the run continues with `--resume`).

    Returns:
        `{"history", "final_model"}` and, with an evaluation split, `"eval"` (recall of full ranking and, with
        `eval_shortlist_k`, of shortlist + re-rank).
    """
    from accelerate.utils import set_seed

    loss_weights = parse_loss_weights(args.loss_weights)
    accelerator = build_accelerator(
        args.output_dir, args.mixed_precision, args.report_to, args.cpu, args.gradient_accumulation_steps
    )
    _check_arguments(args, accelerator)
    set_seed(args.seed)
    model, tokenizer, processor = load_model_and_tokenizer(args, loss_weights)
    train_corpus, eval_corpus = build_corpora(args, tokenizer, model.config)
    stage = retrieval_stage(args, accelerator, model, train_corpus)
    # The loop's settings that RetrievalArguments holds under the same names.
    shared = ("checkpointing_steps", "save_total_limit", "logging_steps", "max_grad_norm")
    settings = LoopSettings(
        loss_names=LOSS_NAMES,
        stop_after_global_step=args.stop_after_steps,
        **{name: getattr(args, name) for name in shared},
    )
    wrapper, state = run_stage(accelerator, stage, settings, resume=args.resume)
    results = _finish(accelerator, wrapper, state, processor or tokenizer, processor, eval_corpus, args)
    accelerator.end_training()
    return results


__all__ = [
    "RetrievalArguments",
    "RetrievalTrainingModel",
    "mine_contrastive_negatives",
    "parse_loss_weights",
    "retrieval_stage",
    "run_retrieval_finetuning",
]
