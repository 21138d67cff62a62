"""How much of a spread over pretraining seeds the dev set itself makes. Scores every (dev image, caption) pair of
each checkpoint with its ITM head, then, for the first caption of each image and for all of them: each checkpoint's
RSUM, their mean and standard deviation, and the part of that deviation a finite set of queries gives on its own.

    OMP_NUM_THREADS=1 python examples/ablations/seed_spread.py --output spread.json --save_scores scores/ \
        --checkpoints RUN_S42/stage3-flickr8k_coco/final RUN_S1/stage3-flickr8k_coco/final RUN_S2/stage3-flickr8k_coco/final

`--scores scores/*.safetensors` reads matrices saved by an earlier call instead of scoring again. The estimate:
resample the dev images (each with its captions) with replacement, recompute every checkpoint's RSUM on each
resample, and take half the variance of the difference between two checkpoints, averaged over the pairs. Two
checkpoints equally good on the population of images still differ on 113 of them by which queries each gets
right; that half-variance is what this adds to each checkpoint's deviation, so the training's own part is what is
left of the observed variance. docs/pretraining.md ("Where the spread comes from") has what it showed. Exits 1 with
one line on stderr when an argument or file is wrong.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser

from imagebert_hf.models.imagebert.script_errors import exit_on_error, parse_flags


KS = (1, 5, 10)


@dataclass
class SeedSpreadArguments:
    output: str = field(metadata={"help": "Where the report (JSON) goes."})
    checkpoints: list[str] = field(
        default_factory=list, metadata={"help": "Checkpoint folders to score, one per seed.", "nargs": "*"}
    )
    scores: list[str] = field(
        default_factory=list,
        metadata={"help": "Score matrices saved by --save_scores, instead of --checkpoints.", "nargs": "*"},
    )
    save_scores: str | None = field(default=None, metadata={"help": "Folder to keep each checkpoint's matrix in."})
    manifest: str = field(
        default="../shared/data/flickr8k_trainval/captions.jsonl", metadata={"help": "The jsonl manifest."}
    )
    region_cache: str = field(default="outputs/regions/flickr8k", metadata={"help": "Its region cache."})
    split: str = field(default="dev", metadata={"help": "The split ranked."})
    captions_per_image: int = field(default=5, metadata={"help": "Captions of each image scored (the first N)."})
    num_resamples: int = field(default=2000, metadata={"help": "Resamples of the dev images."})
    seed: int = field(default=0, metadata={"help": "Seed of the resampling."})
    batch_size: int = field(default=256, metadata={"help": "Pairs per forward pass when scoring."})


def first_captions(scores: torch.Tensor, text_to_image: torch.Tensor, captions: int):
    """The columns of each image's first `captions` captions, in their order, and their caption -> image map."""
    keep = torch.cat([torch.nonzero(text_to_image == image).flatten()[:captions] for image in range(scores.shape[0])])
    keep = keep.sort().values
    return scores[:, keep], text_to_image[keep]


def weighted_rsum(tr_ranks, ir_ranks, image_weights, text_weights) -> float:
    """RSUM (recall@1, 5, 10 both ways, in %) with each query counted `weight` times (a resample's multiplicities)."""
    total = 0.0
    for k in KS:
        total += 100.0 * float((image_weights * (tr_ranks < k)).sum() / image_weights.sum())
        total += 100.0 * float((text_weights * (ir_ranks < k)).sum() / text_weights.sum())
    return total


def spread_report(
    matrices: list[torch.Tensor], text_to_image: torch.Tensor, captions: int, num_resamples: int, seed: int
) -> dict:
    """Each matrix's RSUM over the first `captions` captions of each image, their mean and std over matrices, and the
    std the finite query set adds on its own (the module docstring says how it is estimated)."""
    from imagebert_hf.evaluation.recall import retrieval_ranks

    _, subset_text_to_image = first_captions(matrices[0], text_to_image, captions)
    ranks = [retrieval_ranks(*first_captions(scores, text_to_image, captions)) for scores in matrices]
    num_images = matrices[0].shape[0]
    ones_images = torch.ones(num_images, dtype=torch.float64)
    rsums = [weighted_rsum(tr, ir, ones_images, ones_images[subset_text_to_image]) for tr, ir in ranks]
    generator = np.random.default_rng(seed)
    resampled = np.empty((num_resamples, len(matrices)))
    for row in range(num_resamples):
        counts = np.bincount(generator.integers(0, num_images, num_images), minlength=num_images)
        image_weights = torch.from_numpy(counts.astype(np.float64))
        text_weights = image_weights[subset_text_to_image]
        resampled[row] = [weighted_rsum(tr, ir, image_weights, text_weights) for tr, ir in ranks]
    pair_variances = [
        float(np.var(resampled[:, a] - resampled[:, b]) / 2) for a, b in itertools.combinations(range(len(ranks)), 2)
    ]
    observed = float(np.std(rsums, ddof=1))
    from_queries = float(np.sqrt(np.mean(pair_variances)))
    return {
        "captions_per_image": captions,
        "num_queries": {"image": num_images, "text": int(subset_text_to_image.numel())},
        "rsum": rsums,
        "mean": float(np.mean(rsums)),
        "std": observed,
        "std_from_the_query_set": from_queries,
        "std_left_for_training": float(np.sqrt(max(observed**2 - from_queries**2, 0.0))),
        "resampling_std_of_each_rsum": [float(v) for v in resampled.std(axis=0)],
    }


def score_checkpoint(path: str, args) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoTokenizer

    from imagebert_hf import ImageBERTConfig
    from imagebert_hf.evaluation.zero_shot import manifest_retrieval_inputs, zero_shot_scores

    config = ImageBERTConfig.from_pretrained(path)
    text_inputs, region_inputs, text_to_image = manifest_retrieval_inputs(
        args.manifest, args.region_cache, AutoTokenizer.from_pretrained(path), split=args.split,
        max_text_length=config.max_text_length, max_regions=config.max_regions,
        captions_per_image=args.captions_per_image,
    )  # fmt: skip
    scores = zero_shot_scores(path, text_inputs, region_inputs, text_to_image, batch_size=args.batch_size)
    return scores, torch.tensor(text_to_image)


def read_scores(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(path)
    if set(tensors) != {"scores", "text_to_image"}:
        raise ValueError(f"{path} is not a score file of this script: tensors {sorted(tensors)}.")
    return tensors["scores"].float(), tensors["text_to_image"].long()


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_flags(HfArgumentParser(SeedSpreadArguments), argv)
    from safetensors.torch import save

    from imagebert_hf.formats.files import atomic_write_bytes, atomic_write_json

    with exit_on_error("seed_spread"):
        if bool(args.checkpoints) == bool(args.scores):
            raise ValueError("pass either --checkpoints or --scores.")
        names = args.checkpoints or args.scores
        if len(names) < 2:
            raise ValueError(f"a spread needs at least 2 runs, got {len(names)}.")
        if args.captions_per_image < 1 or args.num_resamples < 2:
            raise ValueError(
                f"--captions_per_image must be at least 1 and --num_resamples at least 2, got "
                f"{args.captions_per_image} and {args.num_resamples}."
            )
        for name in names:
            if not Path(name).exists():
                raise FileNotFoundError(f"{name} not found.")
            # Every folder is checked before the first is scored, so that a bad one late in the list fails before
            # --save_scores replaces a matrix an earlier call kept.
            if args.checkpoints and not (Path(name) / "config.json").is_file():
                raise FileNotFoundError(f"{name} is not a checkpoint folder: it has no config.json.")
        matrices, text_to_image = [], None
        for index, name in enumerate(names):
            scores, mapping = score_checkpoint(name, args) if args.checkpoints else read_scores(name)
            if text_to_image is not None and not torch.equal(mapping, text_to_image):
                raise ValueError(f"{name} ranks other captions than {names[0]} (its caption -> image map differs).")
            text_to_image = mapping
            matrices.append(scores)
            if args.checkpoints and args.save_scores:
                folder = Path(args.save_scores)
                folder.mkdir(parents=True, exist_ok=True)
                data = save({"scores": scores.contiguous(), "text_to_image": mapping.contiguous()})
                atomic_write_bytes(folder / f"run{index}.safetensors", data)
        most = int(torch.bincount(text_to_image).min())
        report = {
            "runs": names,
            "by_captions": [
                spread_report(matrices, text_to_image, captions, args.num_resamples, args.seed)
                for captions in sorted({1, min(args.captions_per_image, most)})
            ],
            "num_resamples": args.num_resamples,
        }
        atomic_write_json(args.output, report, indent=1)
    for row in report["by_captions"]:
        print(
            f"{row['captions_per_image']} caption(s) per image: RSUM "
            + ", ".join(f"{value:.1f}" for value in row["rsum"])
            + f"; {row['mean']:.1f} +- {row['std']:.1f}, of which the query set alone ~{row['std_from_the_query_set']:.1f}"
        )
    return report


if __name__ == "__main__":
    main()
