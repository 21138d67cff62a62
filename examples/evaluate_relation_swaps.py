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

from transformers import HfArgumentParser

from imagebert_hf.evaluation.relation_swaps import (
    RelationSwapArguments,
    format_relation_swap_table,
    run_relation_swap_evaluation,
)


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(RelationSwapArguments).parse_args_into_dataclasses(args=argv)
    try:
        summary = run_relation_swap_evaluation(args)
    except (ValueError, OSError) as error:
        print(f"evaluate_relation_swaps: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"{summary['probe']} relation swaps, {summary['images']} images, model {summary['model']}")
    print(format_relation_swap_table(summary["results"]))
    return summary


if __name__ == "__main__":
    main()
