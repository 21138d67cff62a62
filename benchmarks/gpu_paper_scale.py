"""Paper-scale costs for GPU-hour estimates (run on a GPU): ImageBERT-base pretraining steps and region extraction.

- Pretraining: BERT-base ImageBERT (12 x 768), 44 text tokens + 100 regions of 2048-d features, 1600 object classes,
  all four losses, AdamW; batches made by the real collator; fp32 and bf16 autocast; per-GPU batch 12 (the paper's
  48 over 4 GPUs) and 48. Reports samples/s and peak GPU memory.
- Extraction: images/s of torchvision's Faster R-CNN R50-FPN (random weights: the cost, not the boxes, matters;
  the paper's detector is a ResNet-101 Faster R-CNN, about 1.5x the backbone cost) at 600 x 1000, and of the
  offline EfficientNet-Lite0 backbone with RoIAlign over 100 boxes at 384 x 384.

    python benchmarks/gpu_paper_scale.py
    python benchmarks/gpu_paper_scale.py --device cpu --dry_run   # tiny sizes, one step each: checks the script
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def timed(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def pretraining(device: str, batch_size: int, dtype: torch.dtype | None, repeats: int, tiny: bool = False) -> dict:
    from imagebert_hf import ImageBERTConfig, ImageBERTForPreTraining
    from imagebert_hf.data.collator import DataCollatorForImageBERTPretraining

    class Tokenizer:
        all_special_ids = [0, 100, 101, 102, 103]
        pad_token_id, mask_token_id = 0, 103

        def __len__(self):
            return 30522

    size = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    config = ImageBERTConfig(**(size if tiny else {}))
    model = ImageBERTForPreTraining(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    rng = np.random.default_rng(0)
    collator = DataCollatorForImageBERTPretraining(Tokenizer(), seed=0)
    # Captions of 13 words average about 16 WordPiece tokens; LAIT-style pairs, padded per batch.
    features = [
        {
            "input_ids": [101, *rng.integers(1000, 30000, int(rng.integers(10, 42))).tolist(), 102],
            "region_features": rng.random((100, 2048), dtype=np.float32),
            "region_locations": rng.random((100, 5), dtype=np.float32),
            "region_class_labels": rng.integers(0, 1600, 100),
            "image_id": str(i),
        }
        for i in range(batch_size * 4)
    ]
    batches = [
        {k: v.to(device) for k, v in collator(features[i : i + batch_size]).items()}
        for i in range(0, len(features), batch_size)
    ]
    position = [0]

    def step():
        batch = batches[position[0] % len(batches)]
        position[0] += 1
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
    seconds = timed(step, warmup=1 if tiny else 10, repeats=repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    torch.cuda.empty_cache() if device == "cuda" else None
    return {
        "batch": batch_size,
        "dtype": str(dtype).replace("torch.", "") if dtype else "fp32",
        "samples_per_s": batch_size / seconds,
        "peak_gib": peak,
    }


def extraction(device: str, repeats: int, tiny: bool = False) -> list[dict]:
    import timm
    import torchvision
    from torchvision.ops import roi_align

    results = []
    detector = (
        torchvision.models.detection.fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, box_detections_per_img=100, min_size=600, max_size=1000
        )
        .to(device)
        .eval()
    )
    images = [torch.rand(3, 600, 800, device=device) for _ in range(1 if tiny else 8)]
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        seconds = timed(lambda: detector(images), warmup=0 if tiny else 2, repeats=repeats)
    name = f"Faster R-CNN R50-FPN 600x800, batch {len(images)}"
    results.append({"extractor": name, "images_per_s": len(images) / seconds})

    backbone = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(4,))
    backbone = backbone.to(device).eval()
    count = 2 if tiny else 32
    batch = torch.rand(count, 3, 384, 384, device=device)
    boxes = [torch.rand(100, 4, device=device).sort(dim=1).values * 384 for _ in range(count)]
    boxes = [
        torch.stack([b[:, 0], b[:, 1], b[:, 2].clamp(min=b[:, 0] + 8), b[:, 3].clamp(min=b[:, 1] + 8)], 1)
        for b in boxes
    ]

    def lite0():
        feature_map = backbone(batch)[-1]
        return roi_align(feature_map, boxes, output_size=7, spatial_scale=1 / 32, aligned=True).mean((2, 3))

    with torch.inference_mode():
        seconds = timed(lite0, warmup=0 if tiny else 2, repeats=repeats)
    results.append(
        {
            "extractor": f"EfficientNet-Lite0 + RoIAlign, 100 boxes, 384x384, batch {count}",
            "images_per_s": count / seconds,
        }
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--dry_run", action="store_true", help="a tiny model, batch 2, one step each: checks the script"
    )
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_paper_scale.py: --device cuda but no CUDA device is available.")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    repeats = 1 if args.dry_run else 30 if device == "cuda" else 2
    rows = []
    for batch_size in (2,) if args.dry_run else (12, 48):
        for dtype in (None, torch.bfloat16):
            try:
                rows.append(pretraining(device, batch_size, dtype, repeats, tiny=args.dry_run))
            except Exception as error:  # noqa: BLE001 - report and go on to the other measurements
                print(f"pretraining batch {batch_size} {dtype} failed: {error!r}", flush=True)
                continue
            print(json.dumps(rows[-1]), flush=True)
    extract = extraction(device, repeats=5 if device == "cuda" and not args.dry_run else 1, tiny=args.dry_run)
    print(f"\ndevice: {name}")
    print("| ImageBERT-base pretraining step | samples/s | peak GPU memory (GiB) |\n|---|---|---|")
    for row in rows:
        print(f"| batch {row['batch']}, {row['dtype']} | {row['samples_per_s']:.0f} | {row['peak_gib']:.1f} |")
    print("\n| region extraction | images/s |\n|---|---|")
    for row in extract:
        print(f"| {row['extractor']} | {row['images_per_s']:.0f} |")


if __name__ == "__main__":
    main()
