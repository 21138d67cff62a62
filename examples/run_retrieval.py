"""Fine-tunes ImageBERT for image-text retrieval with Accelerate (binary, multi-class, triplet or a weighted mix).

    # the synthetic demo data, a tiny model, a minute on a CPU
    python examples/run_retrieval.py --synthetic_images 300 --output_dir outputs/retrieval --max_steps 300
    # Flickr30k from a pretrained checkpoint, regions from the cache, hard negatives
    accelerate launch examples/run_retrieval.py --model_name_or_path outputs/pretrain/stage2-cc_sbu/final \
        --train_file dataset_flickr30k.json --region_cache regions/flickr30k --hard_negatives \
        --loss_weights binary=1 --output_dir outputs/flickr30k

The fine-tuning itself (negatives, the contrastive loss of the shortlist heads, checkpoints, resumption, evaluation)
is `imagebert_hf.training.retrieval_finetuning`; this script reads the flags and sets the exit status: 3 when
`--stop_after_steps` stopped the run before its end (resubmit with `--resume`), 1 with one line naming it for a bad
flag or input.
"""

from __future__ import annotations

import sys

from transformers import HfArgumentParser

from imagebert_hf.models.imagebert.script_errors import exit_on_error, parse_flags
from imagebert_hf.training import RetrievalArguments, TrainingStopped, run_retrieval_finetuning


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_flags(HfArgumentParser(RetrievalArguments), argv)
    try:
        return run_retrieval_finetuning(args)
    except TrainingStopped as stop:
        # Exit status 3: what a job scheduler reads as "resubmit with --resume".
        print(f"{stop}; continue with --resume", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    from safetensors import SafetensorError

    # SafetensorError: a damaged weights file (the model's or a checkpoint's).
    with exit_on_error("run_retrieval", errors=(OSError, ValueError, SafetensorError)):
        main()
