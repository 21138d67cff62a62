"""Model FLOP utilisation (MFU) of an ImageBERT-base pretraining step on a GPU (run by `benchmarks/gpu_checks.sh`).

The step is the one pretraining runs: `ImageBERTForPreTraining` (12 x 768, 2048-d region features, 1600 object
classes) with all four losses and the sparse MLM/MOC/MRFR heads, bf16 autocast, fused AdamW, batches of 256 made by
the real collator from realistic lengths (captions of 8-40 WordPiece tokens plus [CLS] and [SEP], 10-100 regions
log-uniform, as a detector with a confidence threshold gives), grouped by length as the pretraining sampler does
and padded per batch. Each attention backend that runs here is timed eager and under `torch.compile`.

MFU = model FLOP/s / the chip's dense bf16 peak. Model FLOPs are counted from the shapes of each batch: every
matrix product of the encoder, the region projection, the pooler and the heads, forward and backward (the backward
of a product costs twice its forward; the region projection has no input gradient). Two figures: over the padded
batch (the work the kernels are given) and over the real tokens only (what a perfectly unpadded kernel would do).

    python benchmarks/gpu_mfu.py [--batch_size 256] [--steps 20] [--peak_tflops N] [--backends sdpa]
    python benchmarks/gpu_mfu.py --device cpu --dry_run   # a tiny model, one step: checks the script runs
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
import traceback

import numpy as np
import torch

from imagebert_hf.models.imagebert.modeling_imagebert import pretraining_targets


# Dense (not sparse) bf16 tensor-core peaks, in FLOP/s, by a substring of `torch.cuda.get_device_name()`.
DENSE_BF16_PEAK = {
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
}


def chip_peak(name: str) -> float | None:
    for key, value in DENSE_BF16_PEAK.items():  # ordered: "H100 PCIe" before "H100"
        if key in name:
            return value
    return None


class _Tokenizer:
    """The few tokenizer fields the collator reads, for BERT's uncased vocabulary."""

    all_special_ids = [0, 100, 101, 102, 103]
    pad_token_id, mask_token_id = 0, 103

    def __len__(self):
        return 30522


def realistic_features(num_samples: int, config, rng: np.random.Generator) -> list[dict]:
    text = rng.integers(8, 41, size=num_samples)
    regions = np.exp(rng.uniform(np.log(10), np.log(100), size=num_samples)).round().astype(int)
    # Sorted by region count, then caption length: the pretraining sampler's first pass, here over the whole set.
    order = np.lexsort((text, regions))
    features = []
    for i in order:
        count = int(regions[i])
        corners = np.sort(rng.random((count, 4), dtype=np.float32), axis=1)
        area = (corners[:, 2] - corners[:, 0]) * (corners[:, 3] - corners[:, 1])
        features.append(
            {
                "input_ids": [101, *rng.integers(1000, 30000, int(text[i])).tolist(), 102],
                "region_features": rng.random((count, config.region_feature_size), dtype=np.float32),
                "region_locations": np.concatenate([corners, area[:, None]], axis=1),
                "region_class_labels": rng.integers(0, config.num_object_classes, count),
                "image_id": str(i),
            }
        )
    return features


def step_flops(config, batch: dict, padded: bool) -> float:
    """Model FLOPs of one training step (forward + backward) on `batch`."""
    hidden, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    text_mask, region_mask = batch["attention_mask"].bool(), batch["region_attention_mask"].bool()
    if padded:
        batch_size, text_length = text_mask.shape
        lengths = torch.full((batch_size,), text_length + region_mask.shape[1], dtype=torch.float64)
        regions = float(region_mask.numel())
    else:
        lengths = (text_mask.sum(1) + region_mask.sum(1)).double()
        regions = float(region_mask.sum())
    tokens = float(lengths.sum())
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * inner) + 4 * float((lengths**2).sum()) * hidden
    forward = layers * per_layer + 2 * len(lengths) * hidden * hidden  # encoder and pooler
    text_targets, region_targets = pretraining_targets(
        batch["itm_labels"], batch["labels"], batch["masked_regions"], region_mask
    )
    masked_tokens, masked_regions = float(text_targets.sum()), float(region_targets.sum())
    forward += masked_tokens * 2 * hidden * (hidden + config.vocab_size)
    forward += masked_regions * 2 * hidden * (2 * hidden + config.num_object_classes + config.region_feature_size)
    forward += 2 * len(lengths) * hidden * 2  # ITM
    projection = 2 * regions * (config.region_feature_size + config.region_location_size) * hidden
    return 3 * forward + 2 * projection


def measure(backend: str, compiled: bool, args, batches, config) -> dict:
    from imagebert_hf import ImageBERTForPreTraining

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = ImageBERTForPreTraining(config).to(device).train()
    model.set_attn_implementation(backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if compiled else model

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = forward(**batch, sparse_prediction=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for batch in batches:  # warm-up over every shape: compiles (and recompiles once for dynamic sizes)
        step(batch)
    synchronize(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed = [batches[i % len(batches)] for i in range(args.steps)]
    start = time.perf_counter()
    for batch in timed:
        step(batch)
    synchronize(device)
    seconds = time.perf_counter() - start
    padded = sum(step_flops(config, b, padded=True) for b in timed) / seconds
    real = sum(step_flops(config, b, padded=False) for b in timed) / seconds
    samples = sum(len(b["input_ids"]) for b in timed) / seconds
    return {
        "backend": backend,
        "compiled": compiled,
        "samples_per_s": samples,
        "model_tflops_padded": padded / 1e12,
        "model_tflops_real_tokens": real / 1e12,
        "warmup_s": warmup_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=256, help="samples per step")
    parser.add_argument("--num_batches", type=int, default=8, help="distinct length-grouped batches cycled through")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak, if the chip is not known")
    parser.add_argument("--no_compile", action="store_true", help="time eager only")
    parser.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="attention backends to time (default: eager, sdpa, and flash when installed)",
    )
    parser.add_argument("--device", default="cuda", help="torch device; the MFU needs a GPU, cpu only with --dry_run")
    parser.add_argument(
        "--dry_run", action="store_true", help="a tiny model, batch 4, one step, eager: checks the script"
    )
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_mfu.py: --device cuda but no CUDA device is available (use --device cpu --dry_run).")
    if torch.device(args.device).type != "cuda" and not args.dry_run:
        raise SystemExit(f"gpu_mfu.py measures a GPU; got --device {args.device} without --dry_run.")
    if args.dry_run:
        args.batch_size, args.num_batches, args.steps, args.no_compile = 4, 2, 1, True

    from imagebert_hf import ImageBERTConfig
    from imagebert_hf.data.collator import DataCollatorForImageBERTPretraining

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    peak = args.peak_tflops * 1e12 if args.peak_tflops else chip_peak(name)
    print(
        f"device: {name}; dense bf16 peak: {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s; torch {torch.__version__}"
    )
    size = (
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
        if args.dry_run
        else {}
    )
    config = ImageBERTConfig(**size)
    collator = DataCollatorForImageBERTPretraining(_Tokenizer(), seed=0)
    features = realistic_features(args.batch_size * args.num_batches, config, np.random.default_rng(0))
    batches = [
        {key: value.to(args.device) for key, value in collator(features[i : i + args.batch_size]).items()}
        for i in range(0, len(features), args.batch_size)
    ]
    mean_length = np.mean([b["input_ids"].shape[1] + b["region_features"].shape[1] for b in batches])
    print(f"batch {args.batch_size}, {len(batches)} length-grouped batches, mean padded length {mean_length:.1f}")

    backends = ["eager", "sdpa"]
    if importlib.util.find_spec("flash_attn") is not None:
        backends.append("flash_attention_2")
    backends = args.backends or backends
    rows = []
    for backend in backends:
        for compiled in (False,) if args.no_compile else (False, True):
            try:
                row = measure(backend, compiled, args, batches, config)
            except Exception as error:  # noqa: BLE001 - report and go on to the other configurations
                # The last frames say where (a compiler bug reads differently from a shape bug in the model).
                where = "".join(traceback.format_exception(error)[-4:])
                print(f"{backend} compiled={compiled} failed: {error!r}\n{where}", flush=True)
                continue
            if peak:
                row["mfu_padded"] = row["model_tflops_padded"] * 1e12 / peak
                row["mfu_real_tokens"] = row["model_tflops_real_tokens"] * 1e12 / peak
            rows.append(row)
            print(json.dumps(row), flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print("\n| backend | compile | samples/s | model TFLOP/s (padded) | MFU (padded) | MFU (real tokens) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['backend']} | {row['compiled']} | {row['samples_per_s']:.0f} | {row['model_tflops_padded']:.0f} "
            f"| {row.get('mfu_padded', float('nan')):.1%} | {row.get('mfu_real_tokens', float('nan')):.1%} |"
        )
    if rows and peak:
        best = max(rows, key=lambda row: row["mfu_padded"])
        print(f"best: {best['backend']}, compile={best['compiled']}: MFU {best['mfu_padded']:.1%} (target >= 40%)")


if __name__ == "__main__":
    main()
