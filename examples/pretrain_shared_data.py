"""Pretraining on real photographs with offline weights only, then zero-shot retrieval on held-out images.

Text encoder: the MiniLM package's BERT (6 layers, 384 wide). Regions: the offline EfficientNet-Lite0 extractor over
a 1+4+9+16 grid (30 regions, 1280-d, ImageNet labels for MOC). Data: the bundled Flickr8k train split and the 128
COCO images (../shared/data, never copied). Reports ITM-ranked R@1/5/10 on the Flickr8k dev images against chance.

    python examples/pretrain_shared_data.py --output_dir outputs/minilm_shared_data
    python examples/pretrain_shared_data.py --output_dir outputs/quick --set stages.0.max_steps=20 stages.0.num_epochs=null
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import transformers
from transformers import HfArgumentParser


@dataclass
class SharedDataArguments:
    """Settings of the real-data example."""

    output_dir: str = field(default="outputs/minilm_shared_data", metadata={"help": "Run folder."})
    config: str = field(
        default="examples/configs/pretrain_minilm_shared_data.yaml", metadata={"help": "The pretraining recipe."}
    )
    data_dir: str = field(
        default="../shared/data", metadata={"help": "Folder holding flickr8k_trainval/ and coco_val2017_128/."}
    )
    cache_dir: str = field(default="outputs/regions", metadata={"help": "Where the region caches are (re)used."})
    grid_sizes: list[int] = field(
        default_factory=lambda: [1, 2, 3, 4], metadata={"help": "Extraction grid (n x n tilings)."}
    )
    eval_captions_per_image: int = field(
        default=5, metadata={"help": "Captions per dev image in the ranking (5 is the standard protocol)."}
    )
    eval_batch_size: int = field(default=256, metadata={"help": "Pairs per forward pass when scoring."})
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted run in output_dir."})
    set: list[str] = field(
        default_factory=list, metadata={"help": "Recipe overrides, dotted.key=value.", "nargs": "*"}
    )


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(SharedDataArguments).parse_args_into_dataclasses(args=argv)
    from imagebert_hf import ImageBERTConfig, ImageBERTRoIExtractor
    from imagebert_hf.evaluation import format_metrics_table
    from imagebert_hf.evaluation.zero_shot import chance_metrics, manifest_retrieval_inputs, zero_shot_retrieval
    from imagebert_hf.formats.files import atomic_write_json
    from imagebert_hf.regions import extract_regions
    from imagebert_hf.training import PretrainingRunOptions, load_recipe, run_pretraining
    from imagebert_hf.training.pretraining import load_tokenizer

    started = time.perf_counter()
    data_dir, cache_dir = Path(args.data_dir), Path(args.cache_dir)
    flickr, coco = data_dir / "flickr8k_trainval" / "captions.jsonl", data_dir / "coco_val2017_128" / "captions.jsonl"
    for manifest in (flickr, coco):
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} not found; point --data_dir at the folder holding the real data.")

    extractor = ImageBERTRoIExtractor(grid_sizes=args.grid_sizes, max_regions=sum(n * n for n in args.grid_sizes))
    timings = {}
    for name, manifest in (("flickr8k", flickr), ("coco128", coco)):
        report = extract_regions(manifest, cache_dir / name, extractor, store_class_probs=False)
        timings[f"extract_{name}"] = report.seconds
        print(
            f"regions of {name}: {report.num_extracted} images ({report.num_shards_skipped} shards reused) in {report.seconds:.1f}s"
        )

    overrides = [
        f"output_dir={args.output_dir}",
        "stages.0.sources.0.path=" + str(flickr),
        "stages.0.sources.0.region_cache=" + str(cache_dir / "flickr8k"),
        "stages.1.sources.0.path=" + str(flickr),
        "stages.1.sources.0.region_cache=" + str(cache_dir / "flickr8k"),
        "stages.1.sources.1.path=" + str(coco),
        "stages.1.sources.1.region_cache=" + str(cache_dir / "coco128"),
    ] + args.set
    recipe = load_recipe(args.config, overrides)
    train_started = time.perf_counter()
    run = run_pretraining(recipe, PretrainingRunOptions(resume=args.resume))
    timings["pretraining"] = time.perf_counter() - train_started

    # The pretraining heads are not part of the retrieval model; the load report listing them is expected.
    transformers.logging.set_verbosity_error()
    config = ImageBERTConfig.from_pretrained(run["final_model"])
    tokenizer = load_tokenizer(recipe.model)
    text_inputs, region_inputs, text_to_image = manifest_retrieval_inputs(
        flickr, cache_dir / "flickr8k", tokenizer, split="dev", max_text_length=config.max_text_length,
        max_regions=config.max_regions, captions_per_image=args.eval_captions_per_image,
    )  # fmt: skip
    eval_started = time.perf_counter()
    results = {"chance": chance_metrics(text_to_image)}
    for stage_dir in run["stage_dirs"]:
        results["after " + Path(stage_dir).name] = zero_shot_retrieval(
            Path(stage_dir) / "final", text_inputs, region_inputs, text_to_image, batch_size=args.eval_batch_size
        )
    timings["zero_shot"] = time.perf_counter() - eval_started
    timings["total"] = time.perf_counter() - started
    num_images = max(text_to_image) + 1
    print(
        f"\nZero-shot retrieval on the Flickr8k dev images ({num_images} images x {len(text_to_image)} captions), recall in %"
    )
    print(format_metrics_table(results))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    command = "python examples/pretrain_shared_data.py " + " ".join(map(shlex.quote, argv or sys.argv[1:]))
    summary = {
        "results": results,
        "seconds": timings,
        "steps_per_stage": run["steps_per_stage"],
        "history": run["history"],
        "protocol": f"Flickr8k dev, {num_images} images x {len(text_to_image)} captions, every pair scored",
        "command": command,
    }
    atomic_write_json(Path(args.output_dir) / "results.json", summary, indent=1)
    return summary


if __name__ == "__main__":
    main()
