"""BUTD extraction throughput: the bottom-up-attention Visual Genome Faster R-CNN (`backend="butd"`).

Measures images/s at batch 1 and batch 8 with random weights (the cost of the network, not the quality of its
boxes: no checkpoint can be downloaded where this runs), on photo-sized inputs (480 x 640, resized to 600 x 800 as
the detector does), against the offline default extractor (EfficientNet-Lite0 over the 91-cell grid) measured in
the same run. The RoI head (res5 at 14 x 14 on every proposal) dominates the cost, so the proposal count is a flag:
on CPU the default is 50 proposals per image to keep the run to a few minutes; `--proposals 300` is the detector's
own setting (and the default on CUDA).

Runs on COCO images from ../shared/data when present (upscaled to 480 x 640), else on generated images. About seven
minutes on two heavily loaded CPU cores (load average 10); `--single 1` saves one image of batch 1.

    python benchmarks/bench_butd.py [--proposals 50] [--device cpu] [--images 8]
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
PHOTO_SIZE = (640, 480)


def load_images(count: int, coco_dir: Path) -> tuple[list[Image.Image], str]:
    files = sorted((coco_dir / "images").glob("*.jpg"))[:count] if (coco_dir / "images").is_dir() else []
    if len(files) == count:
        return [Image.open(path).convert("RGB").resize(PHOTO_SIZE) for path in files], "COCO (upscaled)"
    rng = np.random.default_rng(0)
    size = (PHOTO_SIZE[1], PHOTO_SIZE[0], 3)
    return [Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)) for _ in range(count)], "generated"


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument(
        "--proposals", type=int, default=None, help="RPN proposals per image (default 50 on CPU, 300 on CUDA)"
    )
    parser.add_argument("--images", type=int, default=8, help="images of the batch-8 measurement")
    parser.add_argument("--single", type=int, default=2, help="images timed one by one for batch 1")
    parser.add_argument("--coco_dir", type=Path, default=COCO_DIR, help="folder with images/")
    args = parser.parse_args()
    proposals = args.proposals or (300 if args.device.startswith("cuda") else 50)

    from imagebert_hf import ImageBERTRoIExtractor

    images, source = load_images(max(args.images, args.single), args.coco_dir)
    butd = ImageBERTRoIExtractor(
        backend="butd",
        detector_weights=None,
        detector_kwargs={"rpn_post_nms_top_n": proposals},
        return_class_probs=False,
        device=args.device,
    )
    baseline = ImageBERTRoIExtractor(return_class_probs=False, device=args.device)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def run(extractor, batch, batch_size):
        extractor.extract(batch, batch_size=batch_size)
        sync()

    # Build both models and warm up.
    run(butd, images[:1], 1)
    run(baseline, images[:1], 1)
    print(
        f"device {args.device}, torch threads {torch.get_num_threads()}; {source} images {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}, "
        f"BUTD input {butd.size}, {proposals} proposals per image, random weights"
    )
    rates = {}
    for name, extractor in (("butd", butd), ("default (EfficientNet-Lite0 grid)", baseline)):
        single = images[: args.single]
        rates[name, 1] = len(single) / timed(lambda: [run(extractor, [image], 1) for image in single])
        rates[name, 8] = args.images / timed(lambda: run(extractor, images[: args.images], 8))
    print(f"{'extractor':<36}{'batch':>6}{'images/s':>10}{'s/image':>9}")
    for (name, batch_size), rate in rates.items():
        print(f"{name:<36}{batch_size:>6}{rate:>10.3f}{1 / rate:>9.2f}")
    default = "default (EfficientNet-Lite0 grid)"
    for batch_size in (1, 8):
        print(
            f"batch {batch_size}: BUTD costs {rates[default, batch_size] / rates['butd', batch_size]:.1f}x the default extractor"
        )
    print(f"BUTD batch 8 / batch 1 speed-up: {rates['butd', 8] / rates['butd', 1]:.2f}x")
    print(
        json.dumps(
            {"proposals": proposals, "images_per_s": {f"{n} batch {b}": round(r, 4) for (n, b), r in rates.items()}}
        )
    )


if __name__ == "__main__":
    main()
