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
writes `results.json` (the input of `imagebert_hf.evaluation.hub.build_model_card`), recall@K curves, score histograms and,
with `--model_card`, a filled model card.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from imagebert_hf.data.retrieval import (
    RetrievalCorpus,
    load_karpathy_split,
    load_manifest_records,
    region_cache_lookup,
)
from imagebert_hf.evaluation.plots import plot_recall_curves, plot_score_histograms
from imagebert_hf.evaluation.retrieval import format_metrics_table, retrieval_metrics
from imagebert_hf.evaluation.scoring import score_all_pairs
from imagebert_hf.evaluation.shortlist import shortlist_rerank


DATASETS = ("coco", "flickr30k", "manifest", "synthetic")


@dataclass
class EvaluationArguments:
    """Flags of `examples/evaluate_retrieval.py`."""

    output_dir: str = field(metadata={"help": "Where results.json, plots and the model card go."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Retrieval or pretraining checkpoint (a pretraining one is zero-shot)."}
    )
    dataset: str = field(default="manifest", metadata={"help": f"One of {DATASETS}."})
    karpathy_file: str | None = field(default=None, metadata={"help": "dataset_coco.json or dataset_flickr30k.json."})
    image_root: str | None = field(default=None, metadata={"help": "Folder the Karpathy image paths start from."})
    manifest: str | None = field(default=None, metadata={"help": "A jsonl manifest (dataset=manifest)."})
    split: str = field(default="test", metadata={"help": "Split to evaluate."})
    region_cache: str | None = field(default=None, metadata={"help": "Region cache folder of the split's images."})
    corpus_cache: str | None = field(
        default=None, metadata={"help": "A .pt file keeping the tokenized texts and stacked regions between runs."}
    )
    max_images: int | None = field(default=None, metadata={"help": "Evaluate only the first images (quick runs)."})
    synthetic_images: int = field(default=100, metadata={"help": "Generated images for dataset=synthetic."})
    batch_size: int = field(default=256, metadata={"help": "Pairs per cross-encoder forward pass."})
    shortlist_k: int | None = field(
        default=None, metadata={"help": "Also rank with a unimodal shortlist of k candidates per query + re-ranking."}
    )
    index_type: str = field(default="flat", metadata={"help": "Shortlist index: flat (exact), ivf or hnsw."})
    model_card: bool = field(default=False, metadata={"help": "Write README.md, a model card with these results."})
    model_id: str = field(default="imagebert-base", metadata={"help": "Name of the model in the card."})


def protocols(dataset: str, num_images: int) -> list[tuple[str, str | None, int]]:
    """(name, dataset_config, num_folds) of each standard protocol the split supports."""
    if dataset == "coco" and num_images % 1000 == 0 and num_images >= 5000:
        return [("MS-COCO 1k", "1k", num_images // 1000), ("MS-COCO 5k", "5k", 1)]
    if dataset == "coco":
        return [("MS-COCO", None, 1)]
    if dataset == "flickr30k":
        return [("Flickr30k 1k", "1k", 1)]
    return [(dataset, None, 1)]


def load_corpus(args: EvaluationArguments, tokenizer, config) -> RetrievalCorpus:
    if args.corpus_cache and Path(args.corpus_cache).is_file():
        return RetrievalCorpus(**torch.load(args.corpus_cache, weights_only=False))
    if args.dataset == "synthetic":
        from imagebert_hf.data.synthetic import make_synthetic_examples, synthetic_region_record

        # A seed the training script never uses for its images, so the evaluation set is held out.
        examples = make_synthetic_examples(args.synthetic_images, seed=1234, image_size=32)
        regions = [synthetic_region_record(example, config.region_feature_size) for example in examples]
        corpus = RetrievalCorpus.from_records(examples, tokenizer, regions, config.max_text_length, config.max_regions)
    else:
        if args.region_cache is None:
            raise ValueError("give --region_cache (extract the regions once with imagebert-extract-regions).")
        if args.dataset in ("coco", "flickr30k"):
            if args.karpathy_file is None:
                raise ValueError(f"--dataset {args.dataset} needs --karpathy_file.")
            records = load_karpathy_split(args.karpathy_file, args.split, args.image_root, args.max_images)
        elif args.dataset == "manifest":
            if args.manifest is None:
                raise ValueError("--dataset manifest needs --manifest.")
            records = load_manifest_records(args.manifest, args.split, args.max_images)
        else:
            raise ValueError(f"--dataset must be one of {DATASETS}, got {args.dataset!r}.")
        from imagebert_hf.regions.feature_cache import load_region_cache

        cache = load_region_cache(args.region_cache)
        # The standard protocols use 5 captions per image (a few COCO images have 6 or 7).
        captions = 5 if args.dataset in ("coco", "flickr30k") else None
        corpus = RetrievalCorpus.from_records(
            records, tokenizer, region_cache_lookup(cache), config.max_text_length, config.max_regions, captions
        )
    if args.corpus_cache:
        Path(args.corpus_cache).parent.mkdir(parents=True, exist_ok=True)
        torch.save(corpus.__dict__, args.corpus_cache)
    return corpus


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(EvaluationArguments).parse_args_into_dataclasses(args=argv)
    from transformers import AutoTokenizer

    from imagebert_hf import ImageBERTForImageTextRetrieval

    if args.model_name_or_path is None:
        raise ValueError("give --model_name_or_path (a retrieval or pretraining checkpoint).")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = ImageBERTForImageTextRetrieval.from_pretrained(args.model_name_or_path).eval()
    if torch.cuda.is_available():
        model.cuda()
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    corpus = load_corpus(args, tokenizer, model.config)
    print(f"{corpus.num_images} images, {corpus.num_texts} texts: {corpus.num_images * corpus.num_texts:,} pairs")

    start = time.perf_counter()
    scores = score_all_pairs(model, corpus.text_inputs, corpus.region_inputs, args.batch_size)
    full_seconds = time.perf_counter() - start
    split = args.split
    results, table, runs = [], {}, {"full ranking": (scores, corpus.text_to_image)}
    for name, config_name, folds in protocols(args.dataset, corpus.num_images):
        metrics = retrieval_metrics(scores, corpus.text_to_image, num_folds=folds)
        results.append(
            {
                "dataset_name": name,
                "dataset_type": args.dataset,
                "dataset_config": config_name,
                "dataset_split": split,
                "metrics": metrics,
                "ranking": "full",
                "seconds": round(full_seconds, 2),
            }
        )
        table[f"{name} (full)"] = metrics
    if args.shortlist_k:
        start = time.perf_counter()
        shortlist = shortlist_rerank(
            model, corpus.text_inputs, corpus.region_inputs, args.shortlist_k, args.batch_size, args.index_type
        )
        seconds = time.perf_counter() - start
        metrics = retrieval_metrics(shortlist.i2t_scores, corpus.text_to_image, ir_scores=shortlist.t2i_scores)
        table[f"{args.dataset} (shortlist k={args.shortlist_k})"] = metrics
        results.append(
            {
                "dataset_name": args.dataset,
                "dataset_type": args.dataset,
                "dataset_split": split,
                "metrics": metrics,
                "ranking": f"shortlist k={args.shortlist_k}",
                "seconds": round(seconds, 2),
                "pairs_scored": shortlist.num_pairs_scored,
            }
        )
        runs[f"shortlist k={args.shortlist_k}"] = (shortlist.i2t_scores, corpus.text_to_image, shortlist.t2i_scores)
    print(format_metrics_table(table))
    plot_recall_curves(runs, output_dir / "recall_at_k.png", title=f"{args.dataset} {split}")
    plot_score_histograms(scores, corpus.text_to_image, output_dir / "score_histogram.png")
    with open(output_dir / "results.json", "w", encoding="utf-8") as handle:
        json.dump({"model": args.model_name_or_path, "results": results}, handle, indent=1)
    if args.model_card:
        from imagebert_hf.evaluation.hub import build_model_card

        card_results = [r for r in results if r["ranking"] == "full"]
        build_model_card(card_results, model_id=args.model_id, config=model.config).save(output_dir / "README.md")
    return {"results": results, "table": table}


if __name__ == "__main__":
    main()
