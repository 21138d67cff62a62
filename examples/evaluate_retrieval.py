"""Image-text retrieval evaluation: TR/IR R@1/5/10 and RSUM, zero-shot (a pretraining checkpoint, ITM head) or
fine-tuned, by full ranking or shortlist + re-rank.

    # COCO 5k test and its 1k protocol (5 folds of 1,000 images, averaged)
    python examples/evaluate_retrieval.py --model_name_or_path outputs/coco/final --dataset coco \
        --karpathy_file dataset_coco.json --region_cache regions/coco --output_dir outputs/eval-coco
    # Flickr30k 1k test, shortlist of 128 per query then cross-encoder re-ranking
    python examples/evaluate_retrieval.py --model_name_or_path outputs/f30k/final --dataset flickr30k \
        --karpathy_file dataset_flickr30k.json --region_cache regions/f30k --shortlist_k 128 --output_dir out
    # any jsonl manifest split (e.g. ../shared/data/flickr8k_trainval, split dev)
    python examples/evaluate_retrieval.py --model_name_or_path ckpt --dataset manifest \
        --manifest ../shared/data/flickr8k_trainval/captions.jsonl --split dev --region_cache regions/f8k --output_dir out

Texts are tokenized once and regions read once from the cache (`--corpus_cache` keeps both for the next run);
writes `results.json` (the input of `imagebert_hf.evaluation.hub.build_model_card`), recall@K curves, score
histograms and, with `--model_card`, a filled model card. The evaluation itself is
`imagebert_hf.evaluation.full_ranking`; this script only reads the flags. A bad flag or input ends it with one line
naming it and exit status 1.
"""

from __future__ import annotations

from accelerate import PartialState
from transformers import HfArgumentParser

from imagebert_hf.evaluation.full_ranking import EvaluationArguments, run_retrieval_evaluation
from imagebert_hf.models.imagebert.script_errors import exit_on_error, parse_flags


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_flags(HfArgumentParser(EvaluationArguments), argv)
    evaluation = run_retrieval_evaluation(args)
    # Torn down here, as the training scripts' `end_training` does: a process group left to the interpreter's exit
    # can abort a process that has finished its work (gloo's threads), and the launcher then reports a failure.
    PartialState().destroy_process_group()
    return evaluation


if __name__ == "__main__":
    from safetensors import SafetensorError

    # SafetensorError: a damaged weights file.
    with exit_on_error("evaluate_retrieval", errors=(OSError, ValueError, SafetensorError)):
        main()
