"""The region alignment warm start: fit the region embeddings so that the frozen encoder reads an image's regions
as it reads the image's captions, before pretraining starts from the result.

A recipe's stage-1 model is built as `run_pretraining` builds it (from the text checkpoint, region embeddings new).
Everything but the two region projections (`bert.embeddings.region_feature_projection` and
`region_location_projection`) is frozen; an image is the mean of the encoder's outputs over its regions alone, a
caption the mean over its words alone (the MiniLM checkpoint's own sentence embedding), and a symmetric in-batch
contrastive loss pulls each image towards its captions. This is the projector-only alignment stage of LLaVA and
LiMBeR, with the text encoder as the frozen model. A share of the images is held out and ranked by this dual
encoder before and after, to show the alignment took.

Without it, the new region projections give the encoder inputs it has never read, and the ITM loss of a
MiniLM-initialised model sits at ln 2 for hundreds of steps (docs/pretraining.md, "A warm start through the
encoder").
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers.utils import logging

from ..data.pair_sources import region_arrays
from ..evaluation.recall import retrieval_metrics
from ..formats.files import atomic_write_json, publish_folder
from ..models.imagebert.processing_imagebert import tokenize_as_text
from ..models.imagebert.region_batching import pad_region_records
from .pretraining import build_model, build_source, load_tokenizer
from .recipe import Recipe, StageSpec


logger = logging.get_logger(__name__)

REPORT_FILE = "region_alignment.json"
# The projections the alignment fits; every other parameter stays as the recipe's model starts.
ALIGNED_MODULES = ("region_feature_projection", "region_location_projection")


@dataclass
class RegionAlignmentSettings:
    """How long and how the region projections are fitted (each field's help says what it sets)."""

    max_steps: int = field(default=300, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=64, metadata={"help": "Images per step (the in-batch negatives)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate of the two projections."})
    temperature: float = field(default=0.05, metadata={"help": "Temperature of the contrastive loss."})
    held_out_fraction: float = field(
        default=0.1, metadata={"help": "Share of the images ranked before and after, never trained on."}
    )
    logging_steps: int = field(default=50, metadata={"help": "Log the loss every this many steps."})
    device: str | None = field(default=None, metadata={"help": "Device to fit on (default: cuda when there is one)."})

    def check(self) -> None:
        """Raises ValueError naming the first setting out of its range."""
        for name in ("max_steps", "batch_size", "logging_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer of at least 1, got {value!r}.")
        for name in ("learning_rate", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}.")
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(f"held_out_fraction must be in (0, 1), got {self.held_out_fraction!r}.")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError as error:
                raise ValueError(f"device {self.device!r} is not a device: {error}") from None


def is_aligned_checkpoint(folder: str | Path) -> bool:
    """Whether `folder` holds a finished alignment (it is published whole, so its report means it is complete)."""
    return (Path(folder) / REPORT_FILE).is_file() and (Path(folder) / "config.json").is_file()


def images_and_captions(stage: StageSpec, feature_size: int, max_regions: int) -> list[tuple[dict, list[str]]]:
    """Every image of the stage's sources with its region arrays and its captions, in a fixed order."""
    images, missing = [], 0
    for spec in stage.sources:
        source, store = build_source(spec, feature_size)
        captions = {}
        for key, caption in source.pairs:
            captions.setdefault(key, []).append(caption)
        for key, texts in captions.items():
            try:
                regions = region_arrays(store, key, max_regions)
            except (KeyError, ValueError):  # not in the cache, or its extraction failed: pretraining skips it too
                missing += 1
                continue
            images.append(({name: regions[name] for name in ("region_features", "region_locations")}, texts))
    if missing:
        logger.warning(f"{missing} image(s) without regions skipped.")
    if len(images) < 2:
        raise ValueError(f"the first stage's sources hold {len(images)} image(s) with regions; at least 2 are needed.")
    return images


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask[..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def align_region_embeddings(
    model, tokenizer, images: list[tuple[dict, list[str]]], settings: RegionAlignmentSettings, seed: int
) -> dict[str, Any]:
    """Fits the model's two region projections in place (see the module docstring); returns the report: the settings,
    the loss every `logging_steps` steps and the held-out dual-encoder RSUM before and after."""
    settings.check()
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    num_held_out = max(1, round(settings.held_out_fraction * len(images)))
    held_out, train = order[:num_held_out], order[num_held_out:]
    if len(train) < 2:
        raise ValueError(f"{len(train)} image(s) left to train on after holding some out; lower held_out_fraction.")
    config, encoder = model.config, model.base_model
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Dropout off: the frozen encoder is a fixed reader, and the embeddings it is fitted to should not be noisy.
    was_training = model.training
    model.to(device).eval()
    fitted = [parameter for name in ALIGNED_MODULES for parameter in getattr(encoder.embeddings, name).parameters()]
    requires_grad = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    model.requires_grad_(False)
    for parameter in fitted:
        parameter.requires_grad_(True)

    def embed_images(indices):
        batch = pad_region_records([images[i][0] for i in indices], feature_size=config.region_feature_size)
        batch = {name: value.to(device) for name, value in batch.items()}
        hidden = encoder(**batch).last_hidden_state
        return F.normalize(_masked_mean(hidden, batch["region_attention_mask"]), dim=-1)

    @torch.no_grad()
    def embed_texts(texts):
        encoded = tokenize_as_text(
            tokenizer,
            texts,
            name="caption",
            padding=True,
            truncation=True,
            max_length=config.max_text_length,
            return_tensors="pt",
        ).to(device)
        hidden = encoder(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).last_hidden_state
        return F.normalize(_masked_mean(hidden, encoded["attention_mask"]), dim=-1)

    @torch.no_grad()
    def held_out_rsum() -> float:
        image_embeddings = torch.cat([embed_images(held_out[i : i + 64]) for i in range(0, len(held_out), 64)])
        text_embeddings = embed_texts([images[i][1][0] for i in held_out])
        scores = image_embeddings @ text_embeddings.T
        return retrieval_metrics(scores.cpu(), torch.arange(len(held_out)))["rsum"]

    # The captions' embeddings do not change (the encoder is frozen): computed once.
    caption_embeddings = {}
    for index in tqdm(train, desc="caption embeddings", disable=None):
        caption_embeddings[index] = embed_texts(images[index][1])
    report = {"settings": asdict(settings), "seed": seed, "images": len(train), "held_out_images": len(held_out)}
    report["held_out_rsum_before"] = held_out_rsum()
    logger.info(f"held-out dual-encoder RSUM before the alignment: {report['held_out_rsum_before']:.1f}")

    optimizer = torch.optim.Adam(fitted, lr=settings.learning_rate)
    rng = random.Random(seed)
    targets = torch.arange(min(settings.batch_size, len(train)), device=device)
    losses = []
    for step in tqdm(range(1, settings.max_steps + 1), desc="region alignment", disable=None):
        indices = rng.sample(train, len(targets))
        texts = torch.stack([caption_embeddings[i][rng.randrange(len(images[i][1]))] for i in indices])
        logits = texts @ embed_images(indices).T / settings.temperature
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % settings.logging_steps == 0 or step == settings.max_steps:
            losses.append({"step": step, "loss": loss.item()})
            logger.info(f"step {step}: contrastive loss {loss.item():.3f}")
    report["losses"] = losses
    report["held_out_rsum_after"] = held_out_rsum()
    logger.info(f"held-out dual-encoder RSUM after the alignment: {report['held_out_rsum_after']:.1f}")

    for name, parameter in model.named_parameters():
        parameter.requires_grad_(requires_grad[name])
    model.train(was_training)
    return report


def check_output_folder(output_dir: str | Path) -> None:
    """Refuses a folder that already holds files (checked before any work, so nothing is overwritten)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"{output_dir} already holds files; choose a new folder for the region alignment.")


def run_region_alignment(
    recipe: Recipe, output_dir: str | Path, settings: RegionAlignmentSettings | None = None, seed: int | None = None
) -> dict[str, Any]:
    """Builds the recipe's stage-1 model, aligns its region projections on the first stage's images and publishes
    the checkpoint, its tokenizer and `region_alignment.json` in `output_dir`, whole or not at all. A run starts from
    it with `model.init_from=output_dir`. Returns the report."""
    settings = settings or RegionAlignmentSettings()
    settings.check()
    check_output_folder(output_dir)
    seed = recipe.seed if seed is None else seed
    set_seed(seed)
    tokenizer = load_tokenizer(recipe.model)
    model = build_model(recipe.model, tokenizer)
    images = images_and_captions(recipe.stages[0], model.config.region_feature_size, model.config.max_regions)
    report = align_region_embeddings(model, tokenizer, images, settings, seed)

    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    model.cpu().save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    atomic_write_json(partial / REPORT_FILE, report, indent=1)
    publish_folder(partial, output_dir)  # an empty folder given as output_dir is replaced; a full one was refused
    return report


__all__ = [
    "ALIGNED_MODULES",
    "REPORT_FILE",
    "RegionAlignmentSettings",
    "align_region_embeddings",
    "check_output_folder",
    "images_and_captions",
    "is_aligned_checkpoint",
    "run_region_alignment",
]
