"""A warm start for the ITM plateau: fit the region embeddings so that the frozen encoder reads an image's regions
as it reads the image's captions, then pretrain from the result.

The recipe's stage-1 model is built as `examples/run_pretraining.py` builds it (from the text checkpoint, region
embeddings new). Everything but the two region projections (`bert.embeddings.region_feature_projection` and
`region_location_projection`) is frozen; an image is the mean of the encoder's outputs over its regions alone, a
caption the mean over its words alone (the MiniLM checkpoint's own sentence embedding), and a symmetric in-batch
contrastive loss pulls each image towards its captions. This is the projector-only alignment stage of LLaVA and
LiMBeR, with the text encoder as the frozen model. A tenth of the images is held out and ranked by this dual
encoder, to show the alignment took.

    OMP_NUM_THREADS=1 python examples/ablations/region_alignment.py \
        --config examples/configs/pretrain_minilm_shared_data.yaml --output_dir outputs/region_alignment
    python examples/run_pretraining.py --config examples/configs/pretrain_minilm_shared_data.yaml \
        --set model.init_from=outputs/region_alignment

The output folder is an `ImageBERTForPreTraining` checkpoint with its tokenizer, and `region_alignment.json` (the
arguments, the loss every `--logging_steps` steps and the held-out RSUM before and after). docs/pretraining.md
("A warm start through the encoder") has what it does to the ITM loss. Exits 1 with one line on stderr when an
argument or file is wrong.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import HfArgumentParser


@dataclass
class RegionAlignmentArguments:
    config: str = field(metadata={"help": "The pretraining recipe (YAML); its model and first stage's sources."})
    output_dir: str = field(metadata={"help": "New folder for the aligned checkpoint (refused if it holds files)."})
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=64, metadata={"help": "Images per step (the in-batch negatives)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate of the two projections."})
    temperature: float = field(default=0.05, metadata={"help": "Temperature of the contrastive loss."})
    held_out_fraction: float = field(default=0.1, metadata={"help": "Share of the images ranked, never trained on."})
    logging_steps: int = field(default=50, metadata={"help": "Log the loss every this many steps."})
    seed: int | None = field(default=None, metadata={"help": "Seed (the recipe's by default)."})
    device: str | None = field(default=None, metadata={"help": "Device to fit on (default: cuda when there is one)."})
    set: list[str] = field(default_factory=list, metadata={"help": "Recipe overrides, as run_pretraining's --set."})


def check_arguments(args: RegionAlignmentArguments) -> None:
    for name in ("max_steps", "batch_size", "logging_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    for name in ("learning_rate", "temperature"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}.")
    if args.device is not None:
        import torch

        try:
            torch.device(args.device)
        except RuntimeError as error:
            raise ValueError(f"--device {args.device!r} is not a device: {error}") from None
    if not 0 < args.held_out_fraction < 1:
        raise ValueError(f"--held_out_fraction must be in (0, 1), got {args.held_out_fraction}.")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"--output_dir {output_dir} already holds files; choose a new folder.")


def images_and_captions(stage, feature_size: int, max_regions: int) -> list[tuple[dict, list[str]]]:
    """Every image of the stage's sources with its region arrays and its captions, in a fixed order."""
    from transformers.utils import logging

    from imagebert_hf.training.pretraining import build_source

    images, missing = [], 0
    for spec in stage.sources:
        source, store = build_source(spec, feature_size)
        captions = {}
        for key, caption in source.pairs:
            captions.setdefault(key, []).append(caption)
        for key, texts in captions.items():
            try:
                record = store[key]
            except KeyError:  # not in the cache, or its extraction failed: pretraining skips it too
                record = None
            if record is None or record.get("error") or not len(record["region_features"]):
                missing += 1
                continue
            regions = {name: record[name][:max_regions] for name in ("region_features", "region_locations")}
            images.append((regions, texts))
    if missing:
        logging.get_logger("imagebert_hf.region_alignment").warning(f"{missing} image(s) without regions skipped.")
    if len(images) < 2:
        raise ValueError(f"the first stage's sources hold {len(images)} image(s) with regions; at least 2 are needed.")
    return images


def masked_mean(hidden, mask):
    mask = mask[..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(RegionAlignmentArguments).parse_args_into_dataclasses(args=argv)
    import torch
    import torch.nn.functional as F
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers.utils import logging

    from imagebert_hf.evaluation.recall import retrieval_metrics
    from imagebert_hf.formats.files import atomic_write_json
    from imagebert_hf.models.imagebert.region_batching import pad_region_records
    from imagebert_hf.models.imagebert.script_errors import exit_on_error
    from imagebert_hf.training import load_recipe
    from imagebert_hf.training.pretraining import build_model, load_tokenizer

    logger = logging.get_logger("imagebert_hf.region_alignment")
    with exit_on_error("region_alignment"):
        check_arguments(args)
        recipe = load_recipe(args.config, args.set)
        seed = recipe.seed if args.seed is None else args.seed
        set_seed(seed)
        tokenizer = load_tokenizer(recipe.model)
        model = build_model(recipe.model, tokenizer)
        config = model.config
        images = images_and_captions(recipe.stages[0], config.region_feature_size, config.max_regions)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    num_held_out = max(1, round(args.held_out_fraction * len(images)))
    held_out, train = order[:num_held_out], order[num_held_out:]
    if len(train) < 2:
        raise SystemExit(
            f"region_alignment: error: {len(train)} image(s) left to train on; lower --held_out_fraction."
        )
    encoder = model.base_model
    # Dropout off: the frozen encoder is a fixed reader, and the embeddings it is fitted to should not be noisy.
    model.to(device).eval()
    trained = [
        *encoder.embeddings.region_feature_projection.parameters(),
        *encoder.embeddings.region_location_projection.parameters(),
    ]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in trained:
        parameter.requires_grad_(True)

    def embed_images(indices):
        batch = pad_region_records([images[i][0] for i in indices], feature_size=config.region_feature_size)
        batch = {name: value.to(device) for name, value in batch.items()}
        hidden = encoder(**batch).last_hidden_state
        return F.normalize(masked_mean(hidden, batch["region_attention_mask"]), dim=-1)

    @torch.no_grad()
    def embed_texts(texts):
        encoded = tokenizer(
            texts, padding=True, truncation=True, max_length=config.max_text_length, return_tensors="pt"
        ).to(device)
        hidden = encoder(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).last_hidden_state
        return F.normalize(masked_mean(hidden, encoded["attention_mask"]), dim=-1)

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
    report = {"arguments": asdict(args), "seed": seed, "images": len(train), "held_out_images": len(held_out)}
    report["held_out_rsum_before"] = held_out_rsum()
    logger.info(f"held-out dual-encoder RSUM before the alignment: {report['held_out_rsum_before']:.1f}")

    optimizer = torch.optim.Adam(trained, lr=args.learning_rate)
    rng = random.Random(seed)
    targets = torch.arange(min(args.batch_size, len(train)))
    losses = []
    for step in tqdm(range(1, args.max_steps + 1), desc="region alignment", disable=None):
        indices = rng.sample(train, len(targets))
        texts = torch.stack([caption_embeddings[i][rng.randrange(len(images[i][1]))] for i in indices])
        logits = texts @ embed_images(indices).T / args.temperature
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.logging_steps == 0 or step == args.max_steps:
            losses.append({"step": step, "loss": loss.item()})
            logger.info(f"step {step}: contrastive loss {loss.item():.3f}")
    report["losses"] = losses
    report["held_out_rsum_after"] = held_out_rsum()
    logger.info(f"held-out dual-encoder RSUM after the alignment: {report['held_out_rsum_after']:.1f}")

    for parameter in model.parameters():
        parameter.requires_grad_(True)
    # Written whole under a temporary name, then renamed: an interrupted run leaves no half checkpoint to start from.
    output_dir = Path(args.output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    model.cpu().save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    atomic_write_json(partial / "region_alignment.json", report, indent=1)
    if output_dir.exists():
        output_dir.rmdir()  # checked empty before anything ran
    os.replace(partial, output_dir)
    print(json.dumps({key: report[key] for key in ("held_out_rsum_before", "held_out_rsum_after")}))
    return report


if __name__ == "__main__":
    main()
