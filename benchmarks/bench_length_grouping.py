"""Length grouping in the pretraining loader: training samples/s at realistic lengths, end to end.

The real loader (`PretrainingPairDataset`, `MixtureSampler`, the collator, a DataLoader) feeds full training steps
(forward, backward and AdamW) of `ImageBERTForPreTraining` with all four losses, on captions of 8-30 tokens and
10-100 regions per image (log-uniform, as a detector with a confidence threshold gives), half the pairs ITM
negatives. Three layouts, each over the same whole pools of batches:

- `fixed`: every batch padded to 44 tokens + 100 regions (the paper's layout; `pad_to_max_length=True`);
- `longest`: every batch padded to its own longest sample, batches drawn at random (`group_by_length: false`);
- `grouped`: the same, batches grouped by length (`group_by_length: true`, the recipes' default).

Also prints what the grouping itself costs the sampler, per sample.

    python benchmarks/bench_length_grouping.py                 # base size, about 9 minutes on 2 CPU cores
    python benchmarks/bench_length_grouping.py --size small    # a quick look
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from imagebert_hf import ImageBERTConfig, ImageBERTForPreTraining
from imagebert_hf.data.collator import DataCollatorForImageBERTPretraining
from imagebert_hf.data.pair_sources import MixtureSampler, PairSource, PretrainingPairDataset
from imagebert_hf.data.synthetic import make_synthetic_tokenizer
from imagebert_hf.training import build_optimizer


SIZES = {
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024},
}
FEATURE_SIZE, NUM_CLASSES, MAX_REGIONS, MAX_TEXT_LENGTH = 2048, 1600, 100, 44


def realistic_pairs(num_images: int, captions_per_image: int, tokenizer, seed: int = 0):
    """A pair source and region store with realistic lengths: 8-30 word captions, 10-100 regions per image."""
    rng = np.random.default_rng(seed)
    words = [word for word in tokenizer.get_vocab() if word.isalpha()]
    store, pairs = {}, []
    for image in range(num_images):
        key = f"image{image:05d}"
        count = int(np.exp(rng.uniform(np.log(10), np.log(100))).round())
        corners = np.sort(rng.random((count, 4), dtype=np.float32), axis=1)
        area = (corners[:, 2] - corners[:, 0]) * (corners[:, 3] - corners[:, 1])
        store[key] = {
            "region_features": np.maximum(rng.standard_normal((count, FEATURE_SIZE), dtype=np.float32), 0),
            "region_locations": np.concatenate([corners, area[:, None]], axis=1),
            "region_class_labels": rng.integers(0, NUM_CLASSES, count),
        }
        for _ in range(captions_per_image):
            pairs.append((key, " ".join(rng.choice(words, size=int(rng.integers(8, 31))))))
    return PairSource("realistic", pairs), store


def loader(dataset, tokenizer, layout: str, batch_size: int, pool_groups: int, seed: int):
    grouped = layout == "grouped"
    sampler = MixtureSampler(
        dataset.sizes,
        [1.0],
        seed=seed,
        sample_lengths=dataset.sample_lengths if grouped else None,
        group_size=batch_size,
        pool_groups=pool_groups,
    )
    collator = DataCollatorForImageBERTPretraining(
        tokenizer,
        itm_negative_probability=0.0,
        max_text_length=MAX_TEXT_LENGTH,
        max_regions=MAX_REGIONS,
        pad_to_max_length=layout == "fixed",
        seed=seed,
    )
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator)


def train_steps(model, optimizer, batches) -> float:
    start = time.perf_counter()
    for batch in batches:
        loss = model(**batch, sparse_prediction=True).loss  # as pretraining runs call it
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="base", help="model size")
    parser.add_argument("--batch_size", type=int, default=8, help="samples per batch")
    parser.add_argument("--pool_groups", type=int, default=50, help="batches per grouping pool (as the recipes)")
    parser.add_argument("--pools", type=int, default=1, help="whole pools timed per layout")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, size={args.size}")

    tokenizer = make_synthetic_tokenizer()
    source, store = realistic_pairs(num_images=1000, captions_per_image=2, tokenizer=tokenizer)
    dataset = PretrainingPairDataset([source], [store], tokenizer, MAX_TEXT_LENGTH, MAX_REGIONS)
    config = ImageBERTConfig(
        **SIZES[args.size],
        region_feature_size=FEATURE_SIZE,
        num_object_classes=NUM_CLASSES,
        max_regions=MAX_REGIONS,
        max_text_length=MAX_TEXT_LENGTH,
    )
    model = ImageBERTForPreTraining(config).train()
    optimizer = build_optimizer(model, 1e-4)
    num_batches = args.pools * args.pool_groups

    batches = {}
    for layout in ("fixed", "longest", "grouped"):
        iterator = iter(loader(dataset, tokenizer, layout, args.batch_size, args.pool_groups, seed=1))
        batches[layout] = [next(iterator) for _ in range(num_batches)]
    train_steps(model, optimizer, batches["fixed"][:1])  # warm-up: allocator, threads

    throughput = {}
    for layout, layout_batches in batches.items():
        seconds = train_steps(model, optimizer, layout_batches)
        samples = sum(len(batch["input_ids"]) for batch in layout_batches)
        throughput[layout] = samples / seconds
        padded = np.mean([b["input_ids"].shape[1] + b["region_features"].shape[1] for b in layout_batches])
        real = np.mean([b["attention_mask"].sum(1).float().mean() + b["region_attention_mask"].sum(1).float().mean()
                        for b in layout_batches])  # fmt: skip
        print(
            f"  {layout:<8} {samples:4d} samples, mean padded length {padded:6.1f} (real {real:5.1f}): "
            f"{throughput[layout]:6.2f} samples/s"
        )
    print(f"longest in batch / fixed 144:          {throughput['longest'] / throughput['fixed']:.2f}x")
    print(f"grouped by length / fixed 144:         {throughput['grouped'] / throughput['fixed']:.2f}x")
    print(f"grouped by length / longest in batch:  {throughput['grouped'] / throughput['longest']:.2f}x")

    # What grouping costs the sampler: replaying each sample's negative choice and counting its caption's tokens.
    fresh = PretrainingPairDataset([source], [store], tokenizer, MAX_TEXT_LENGTH, MAX_REGIONS)
    sampler = MixtureSampler(
        fresh.sizes, [1.0], seed=0, num_samples=20_000, sample_lengths=fresh.sample_lengths, group_size=8
    )
    plain = MixtureSampler(fresh.sizes, [1.0], seed=0, num_samples=20_000)
    timings = []
    for which in (plain, sampler, sampler):
        start = time.perf_counter()
        which.indices(0)
        timings.append((time.perf_counter() - start) / 20_000 * 1e6)
    step_per_sample = 1e6 / throughput["grouped"]
    print(
        f"sampler: {timings[0]:.1f} us per sample ungrouped; grouped {timings[1]:.1f} us (first epoch, counting "
        f"tokens), {timings[2]:.1f} us after; a grouped training step here takes {step_per_sample:.0f} us per sample"
    )


if __name__ == "__main__":
    main()
