"""The relation-swap probe: does the model prefer an image's true caption to the same words with the two objects
(or their colours) exchanged? Scored with the cross-encoder (ITM head) and the dual-encoder heads, against chance.

    # generated shapes, skipping the 800 images the learning-quality recipe trains on
    python examples/evaluate_relation_swaps.py --model_name_or_path outputs/learning_quality_synthetic/stage1-shapes/final \
        --probe synthetic --num_images 500 --synthetic_first_index 800
    # real photos: COCO boxes in a clear left/right relation ("a dog to the left of a person" vs the swap)
    python examples/evaluate_relation_swaps.py --model_name_or_path ckpt --probe manifest \
        --manifest ../shared/data/coco_val2017_128/captions.jsonl --region_cache regions/coco128

Prints one Markdown table (share of probes whose true caption wins, Wilson 95% interval) and, with --output_file,
writes the results as JSON. The probe itself is `imagebert_hf.evaluation.relation_swaps`; this script only reads
the flags. Exits 1 with one line on stderr when an argument or file is wrong.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field

from transformers import HfArgumentParser

from imagebert_hf.formats.files import check_folder_or_hub_id
from imagebert_hf.models.imagebert.script_errors import parse_flags


@dataclass
class RelationSwapArguments:
    """The flags; `imagebert_hf.evaluation.relation_swaps.run_relation_swap_evaluation` takes them by name."""

    model_name_or_path: str = field(
        metadata={
            "help": "An ImageBERT folder (pretraining final/ or a fine-tuned retrieval model) with its tokenizer."
        }
    )
    probe: str = field(
        default="synthetic",
        metadata={"help": "'synthetic': generated shapes, regions from their annotations; 'manifest': real photos."},
    )
    num_images: int = field(default=500, metadata={"help": "synthetic: how many images to generate and probe."})
    synthetic_seed: int = field(default=0, metadata={"help": "synthetic: the generator seed of the images."})
    synthetic_first_index: int = field(
        default=0,
        metadata={
            "help": "synthetic: index of the first image. Skip the images the model trained on: a recipe source "
            "with num_images N and this seed trained on images 0..N-1, so pass N."
        },
    )
    manifest: str | None = field(
        default=None, metadata={"help": "manifest: a jsonl manifest with boxes and labels (COCO's captions.jsonl)."}
    )
    region_cache: str | None = field(
        default=None, metadata={"help": "manifest: the region cache of its images (imagebert-extract-regions)."}
    )
    # relation_swaps.MIN_AREA_FRACTION, written out so that --help loads no torch (a test holds them equal).
    min_area_fraction: float = field(
        default=0.01, metadata={"help": "manifest: smallest share of the image each box of a pair covers."}
    )
    scorers: str = field(
        default="cross_encoder,dual_encoder",
        metadata={"help": "Comma-separated, some of cross_encoder (ITM head) and dual_encoder (shortlist heads)."},
    )
    batch_size: int = field(default=256, metadata={"help": "Pairs (or inputs) per forward pass."})
    output_file: str | None = field(default=None, metadata={"help": "Also write the results to this JSON file."})


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_flags(HfArgumentParser(RelationSwapArguments), argv)
    # Imported once the flags are read, so that --help answers without loading torch.
    from imagebert_hf.evaluation.relation_swaps import format_relation_swap_table, run_relation_swap_evaluation

    try:
        check_folder_or_hub_id(args.model_name_or_path, "--model_name_or_path", "an ImageBERT model folder")
        summary = run_relation_swap_evaluation(**asdict(args))
    except (ValueError, OSError) as error:
        print(f"evaluate_relation_swaps: error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"{summary['probe']} relation swaps, {summary['images']} images, model {summary['model']}")
    print(format_relation_swap_table(summary["results"]))
    return summary


if __name__ == "__main__":
    main()
