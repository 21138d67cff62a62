"""Train the two small models of the curation pipeline from a folder of captioned photos.

1. The natural-photo classifier (stage 2): photos against generated non-photos (charts, logos, banners, text).
2. The weak relevance model (stage 4): true captions against mismatched captions and generic web prose.

Both are logistic regressions saved as JSON; pass them to the pipeline with `--natural_model_path` and
`--relevance_model_path` (or write them over the packaged defaults with `--output_dir` pointing there).

    python examples/train_curation_models.py --data_dir ../shared/data/flickr8k_trainval \
        --eval_dir ../shared/data/coco_val2017_128 --output_dir outputs/curation_models

Every flag is checked before any image is read; a bad flag or input ends the script with one line naming it and exit
status 1, and no model file is written unless both models trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import HfArgumentParser

from imagebert_hf.curation.fitting import (
    graphic_statistics,
    load_captioned_images,
    ranking_accuracy,
    train_natural_photo_model,
    train_relevance_model,
)
from imagebert_hf.formats.files import check_output_dir
from imagebert_hf.models.imagebert.script_errors import exit_on_error, parse_flags


@dataclass
class TrainingArguments:
    data_dir: str = field(metadata={"help": "Folder with captions.jsonl and images (training photos and captions)."})
    output_dir: str = field(metadata={"help": "Where natural_photo.json and relevance.json are written."})
    eval_dir: str | None = field(
        default=None, metadata={"help": "Optional second captions.jsonl folder to evaluate on."}
    )
    num_graphics: int = field(default=800, metadata={"help": "Generated non-photos used as negatives."})
    relevance_c: float = field(default=0.01, metadata={"help": "Inverse L2 strength of the relevance model."})
    seed: int = field(default=0, metadata={"help": "Seed for the generated graphics and the negative sampling."})


def check_arguments(args: TrainingArguments) -> Path:
    """Every flag, before any image is read or any file written; returns the output folder."""
    # Here, not at the top: the model config's module imports torch, which `--help` does not need.
    from imagebert_hf.models.imagebert.configuration_imagebert import check_field

    for flag, folder in (("--data_dir", args.data_dir), ("--eval_dir", args.eval_dir)):
        if folder is None:
            continue
        if not str(folder).strip() or not Path(folder).is_dir():
            found = "not a folder" if Path(folder).exists() else "no such folder"
            raise FileNotFoundError(
                f"{flag} {folder!r}: {found}; expected a folder holding captions.jsonl and its images."
            )
        if not (Path(folder) / "captions.jsonl").is_file():
            raise FileNotFoundError(
                f"{flag} {folder}: no captions.jsonl in it; expected a folder of captioned images."
            )
    check_field("--num_graphics", args.num_graphics, "int", 1, None)
    check_field("--relevance_c", args.relevance_c, "positive", None, None)
    check_field("--seed", args.seed, "int", 0, None)
    return check_output_dir(args.output_dir)


def main() -> None:
    (args,) = parse_flags(HfArgumentParser(TrainingArguments))
    output_dir = check_arguments(args)

    # Photos and their statistics; the dev split (when the folder has one) is held out for the report.
    images = load_captioned_images(args.data_dir)
    train = [item for item in images if item.split == "train"] or images
    held_out = [item for item in images if item.split != "train" and item not in train]
    if args.eval_dir:
        held_out += load_captioned_images(args.eval_dir)
    # Negatives pair each caption with another image: one image has none to pair with.
    if len(train) < 2:
        raise ValueError(f"--data_dir {args.data_dir}: {len(train)} training image(s); expected at least 2.")
    if len(held_out) == 1:
        raise ValueError(
            "the held-out images (--eval_dir and --data_dir's non-train split) number 1; expected 0 or 2+."
        )

    # Natural-photo classifier: photos against generated graphics, evaluated on unseen ones of each.
    natural = train_natural_photo_model(
        np.stack([item.stats for item in train]), graphic_statistics(args.num_graphics, seed=args.seed)
    )
    report = {}
    if held_out:
        photos = natural.predict_proba(np.stack([item.stats for item in held_out]))
        graphics = natural.predict_proba(graphic_statistics(200, seed=args.seed + 1000))
        report["natural_photo"] = {
            "held_out_photos_kept": float((photos >= 0.5).mean()),
            "held_out_graphics_kept": float((graphics >= 0.5).mean()),
        }

    # Weak relevance model: ranking accuracy of true over mismatched captions on held-out photos.
    relevance = train_relevance_model(train, c=args.relevance_c, seed=args.seed)
    if held_out:
        report["relevance"] = {"held_out_ranking_accuracy": ranking_accuracy(relevance, held_out, seed=args.seed)}
    # Both files are written once both models trained: a failure leaves the output folder as it was.
    natural.save(output_dir / "natural_photo.json")
    relevance.save(output_dir / "relevance.json")

    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    with exit_on_error("train_curation_models"):
        main()
