"""Retrieval benchmark: cross-encoder throughput, and shortlist + re-rank against full ranking.

    python benchmarks/bench_retrieval.py                # ~3-4 minutes on 2 CPU cores
    python benchmarks/bench_retrieval.py --num_images 200 --shortlist_k 16   # a quick look

1. Cross-encoder pairs/s at the tiny size used below and at the paper's base size (BERT-base, 100 regions of 2048-d
   features, 44 text tokens; a handful of batches only, as the base size is slow on a CPU).
2. A tiny model (2 layers, width 32) is trained for `--train_seconds` on generated images (regions from their
   annotations, no CNN) with the binary loss and the contrastive loss of the shortlist heads; then a gallery of
   `--num_images` held-out images x `--captions_per_image` captions (1,000 x 5,000 by default) is ranked twice:
   full ranking (the cross-encoder on every pair) and shortlist + re-rank (faiss top k per query on the unimodal
   embeddings, then the cross-encoder on those only). Reported: wall time of each, their ratio (target >= 20x),
   and R@1/5/10 of both (target: R@10 within 1 point). The tiny size keeps full ranking of 5M pairs to about a
   minute or two; at the base size it would take hours on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def pairs_per_second(model, text_length: int, num_regions: int, batch_size: int, seconds: float) -> float:
    config = model.config
    inputs = {
        "input_ids": torch.randint(5, config.vocab_size, (batch_size, text_length)),
        "attention_mask": torch.ones(batch_size, text_length, dtype=torch.long),
        "region_features": torch.randn(batch_size, num_regions, config.region_feature_size),
        "region_locations": torch.rand(batch_size, num_regions, 5),
        "region_attention_mask": torch.ones(batch_size, num_regions, dtype=torch.long),
    }
    model.eval()
    with torch.no_grad():
        model(**inputs)
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            model(**inputs)
            done += batch_size
    return done / (time.perf_counter() - start)


def tiny_config(vocab_size: int, feature_size: int):
    from imagebert_hf import ImageBERTConfig

    return ImageBERTConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        region_feature_size=feature_size,
        num_object_classes=24,
        max_regions=4,
        max_text_length=16,
        contrastive_embedding_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def train(model, corpus, seconds: float, batch_size: int, learning_rate: float, seed: int) -> dict:
    from imagebert_hf.data.retrieval_corpus import DataCollatorForImageTextRetrieval, RandomNegativeSampler

    collator = DataCollatorForImageTextRetrieval(corpus, RandomNegativeSampler(corpus, 3, "both", seed=seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start, steps, losses = time.perf_counter(), 0, {}
    while time.perf_counter() - start < seconds:
        batch = collator(torch.randint(corpus.num_texts, (batch_size,), generator=generator).tolist())
        positives = batch.pop("positive_index")
        batch.pop("positive_images")
        outputs = model(**batch)
        text = {k: batch[k][positives] for k in ("input_ids", "attention_mask", "token_type_ids")}
        regions = {k: batch[k][positives] for k in ("region_features", "region_locations", "region_attention_mask")}
        loss = outputs.loss
        # From scratch, the cross-encoder leaves its initial plateau sooner without the contrastive loss pulling the
        # shared encoder, so the shortlist heads join for the last 40% of the time only.
        if time.perf_counter() - start > 0.6 * seconds:
            contrastive = model.contrastive_loss(
                model.get_text_embeddings(**text), model.get_region_embeddings(**regions)
            )
            loss = loss + contrastive
            losses["contrastive"] = round(contrastive.item(), 4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        losses["binary"] = round(outputs.binary_loss.item(), 4)
    return {"steps": steps, "seconds": round(time.perf_counter() - start, 1), "last_losses": losses}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=1000, help="Gallery images (held out from training).")
    parser.add_argument("--captions_per_image", type=int, default=5, help="Captions per gallery image.")
    parser.add_argument("--train_images", type=int, default=600, help="Generated training images.")
    parser.add_argument("--train_seconds", type=float, default=60.0, help="Training time of the tiny model.")
    parser.add_argument("--shortlist_k", type=int, default=32, help="Candidates per query re-ranked.")
    parser.add_argument("--batch_size", type=int, default=1024, help="Pairs per cross-encoder forward pass.")
    parser.add_argument("--skip_base", action="store_true", help="Skip the base-size throughput measurement.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data, the model and the training.")
    parser.add_argument("--json", type=str, default=None, help="Also write the results to this file.")
    args = parser.parse_args()

    from imagebert_hf import ImageBERTConfig, ImageBERTForImageTextRetrieval
    from imagebert_hf.data.retrieval_corpus import RetrievalCorpus
    from imagebert_hf.data.synthetic import make_synthetic_examples, make_synthetic_tokenizer, synthetic_region_record
    from imagebert_hf.evaluation.recall import retrieval_metrics
    from imagebert_hf.evaluation.shortlist import shortlist_rerank
    from imagebert_hf.models.imagebert.retrieval_index import score_all_pairs

    torch.manual_seed(args.seed)
    report: dict = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    tokenizer = make_synthetic_tokenizer()
    config = tiny_config(len(tokenizer), feature_size=24)

    # 1. Throughput.
    report["pairs_per_second_tiny"] = round(pairs_per_second(ImageBERTForImageTextRetrieval(config), 14, 3, 1024, 3))
    if not args.skip_base:
        base = ImageBERTForImageTextRetrieval(ImageBERTConfig())
        report["pairs_per_second_base"] = round(pairs_per_second(base, 44, 100, 16, 8), 1)
        del base
    print(json.dumps(report), flush=True)

    # 2. Data: training images and a held-out gallery from another seed.
    def corpus_of(num_images: int, seed: int, captions: int) -> RetrievalCorpus:
        examples = make_synthetic_examples(num_images, seed=seed, image_size=32, captions_per_image=captions)
        regions = [synthetic_region_record(example, config.region_feature_size) for example in examples]
        return RetrievalCorpus.from_records(examples, tokenizer, regions, config.max_text_length, config.max_regions)

    train_corpus = corpus_of(args.train_images, args.seed + 1, 3)
    gallery = corpus_of(args.num_images, args.seed + 2, args.captions_per_image)
    model = ImageBERTForImageTextRetrieval(config)
    report["training"] = train(model, train_corpus, args.train_seconds, 32, 1e-3, args.seed)
    model.eval()
    print(json.dumps(report["training"]), flush=True)

    # 3. Full ranking vs shortlist + re-rank on the same gallery.
    start = time.perf_counter()
    full = score_all_pairs(model, gallery.text_inputs, gallery.region_inputs, args.batch_size)
    full_seconds = time.perf_counter() - start
    start = time.perf_counter()
    shortlist = shortlist_rerank(model, gallery.text_inputs, gallery.region_inputs, args.shortlist_k, args.batch_size)
    shortlist_seconds = time.perf_counter() - start
    full_metrics = retrieval_metrics(full, gallery.text_to_image)
    shortlist_metrics = retrieval_metrics(shortlist.i2t_scores, gallery.text_to_image, ir_scores=shortlist.t2i_scores)
    report["ranking"] = {
        "gallery": f"{gallery.num_images} images x {gallery.num_texts} texts",
        "full_pairs": gallery.num_images * gallery.num_texts,
        "full_seconds": round(full_seconds, 2),
        "full_pairs_per_second": round(gallery.num_images * gallery.num_texts / full_seconds),
        "shortlist_k": args.shortlist_k,
        "shortlist_pairs": shortlist.num_pairs_scored,
        "shortlist_seconds": round(shortlist_seconds, 2),
        "shortlist_timings": {key: round(value, 2) for key, value in shortlist.timings.items()},
        "speedup": round(full_seconds / shortlist_seconds, 1),
        "full": {key: round(value, 2) for key, value in full_metrics.items()},
        "shortlist": {key: round(value, 2) for key, value in shortlist_metrics.items()},
        "r10_difference": {
            "tr": round(full_metrics["tr_r10"] - shortlist_metrics["tr_r10"], 2),
            "ir": round(full_metrics["ir_r10"] - shortlist_metrics["ir_r10"], 2),
        },
    }
    print(json.dumps(report["ranking"], indent=1), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
