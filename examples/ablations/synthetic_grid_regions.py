"""The generated shapes as the region-count study needs them: images on disk and a grid region cache, so that a
model sees the regions a real extractor gives (cells of a 1+4+9+16 grid) instead of the annotated objects.

    python examples/ablations/synthetic_grid_regions.py --output_dir outputs/synthetic_grid
    OMP_NUM_THREADS=1 python examples/run_pretraining.py \
        --config examples/configs/ablation_region_count_synthetic.yaml --set seed=N model.config.max_regions=R \
        output_dir=runs/regions_R_N

1. writes `--num_images` generated images (seed `--seed`) in the manifest layout of the real data
   (`data/captions.jsonl` + `data/images/`); the last `--test_images` are the `test` split, the others `train`;
2. extracts the offline EfficientNet-Lite0 features of every image over the grid into `regions/`, coarse cells
   first, so that `max_regions` 5, 14 and 30 keep the 1+4, 1+4+9 and 1+4+9+16 grids (the regions of the real-photo
   study in docs/results.md).

A finished output is kept: the manifest is rewritten only when absent, and the extraction resumes or skips.
Exits 1 with one line on stderr when an argument or file is wrong (`exit_on_error`, as the console scripts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import HfArgumentParser

from imagebert_hf.formats.files import check_output_dir
from imagebert_hf.models.imagebert.script_errors import exit_on_error, parse_flags


GRID_SIZES = (1, 2, 3, 4)


@dataclass
class SyntheticGridArguments:
    output_dir: str = field(metadata={"help": "Folder of data/ (manifest and images) and regions/ (the cache)."})
    num_images: int = field(default=900, metadata={"help": "Generated images, the test ones included."})
    test_images: int = field(default=100, metadata={"help": "How many of them (the last) form the test split."})
    seed: int = field(default=0, metadata={"help": "Seed of the generated images."})
    image_size: int = field(default=96, metadata={"help": "Side of a generated image, in pixels."})
    extraction_size: int = field(default=128, metadata={"help": "Side the backbone sees each image at."})


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_flags(HfArgumentParser(SyntheticGridArguments), argv)
    from imagebert_hf import ImageBERTRoIExtractor
    from imagebert_hf.data.synthetic import write_synthetic_manifest
    from imagebert_hf.regions import extract_regions

    with exit_on_error("synthetic_grid_regions"):
        output_dir = check_output_dir(args.output_dir)
        manifest = output_dir / "data" / "captions.jsonl"
        if not 0 < args.test_images < args.num_images:
            raise ValueError(
                f"--test_images must be in [1, num_images), got {args.test_images} with --num_images {args.num_images}."
            )
        if not manifest.is_file():
            manifest = write_synthetic_manifest(
                output_dir / "data",
                args.num_images,
                seed=args.seed,
                image_size=args.image_size,
                test_fraction=args.test_images / args.num_images,
            )
        extractor = ImageBERTRoIExtractor(
            grid_sizes=list(GRID_SIZES),
            max_regions=sum(n * n for n in GRID_SIZES),
            size={"height": args.extraction_size, "width": args.extraction_size},
            batch_size=16,
        )
        report = extract_regions(manifest, output_dir / "regions", extractor, store_class_probs=False)
        if report.num_failed:
            raise ValueError(f"{report.num_failed} images failed: {report.failures[:3]}")
    print(f"{report.num_unique} images, {extractor.region_feature_size}-d grid regions -> {output_dir / 'regions'}")
    return {"manifest": str(manifest), "region_cache": str(output_dir / "regions"), "report": report}


if __name__ == "__main__":
    main()
