"""Pretraining on real photographs with offline weights only, then zero-shot retrieval on held-out images.

Text encoder: the MiniLM package's BERT (6 layers, 384 wide). Regions: the offline EfficientNet-Lite0 extractor over
a 1+4+9+16 grid (30 regions, 1280-d, ImageNet labels for MOC). Data: the bundled Flickr8k train split and the 128
COCO images (../shared/data, never copied). Before pretraining, the region projections are fitted through the frozen
text encoder (the region alignment warm start, `--region_alignment_steps`; its checkpoint is kept in
OUTPUT_DIR/region_alignment and reused). Reports ITM-ranked R@1/5/10 on the Flickr8k dev images against chance.

    python examples/pretrain_shared_data.py --output_dir outputs/minilm_shared_data
    python examples/pretrain_shared_data.py --output_dir outputs/quick --region_alignment_steps 20 \
        --set stages.0.max_steps=10 stages.1.max_steps=20 stages.1.num_epochs=null stages.2.max_steps=20 \
        stages.2.num_epochs=null
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import transformers
from transformers import HfArgumentParser

from imagebert_hf.models.imagebert.configuration_imagebert import check_flag_values
from imagebert_hf.models.imagebert.script_errors import exit_on_error, parse_flags


# The evaluation flags as `check_field`'s (kind, lowest, highest): checked before anything is extracted or trained,
# as they are otherwise first read once pretraining has finished.
FLAG_RULES = {
    "eval_captions_per_image": ("int", 1, None),
    "eval_batch_size": ("int", 1, None),
    "region_alignment_steps": ("int", 0, None),
}


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
    region_alignment_steps: int = field(
        default=300,
        metadata={
            "help": "Steps of the region alignment warm start before pretraining; 0 starts from the recipe's model "
            "as it is. Skipped when the recipe (or --set) names a model.init_from."
        },
    )
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted run in output_dir."})
    set: list[str] = field(
        default_factory=list, metadata={"help": "Recipe overrides, dotted.key=value.", "nargs": "*"}
    )


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_flags(HfArgumentParser(SharedDataArguments), argv)
    check_flag_values(args, FLAG_RULES)
    from accelerate import PartialState

    from imagebert_hf import ImageBERTConfig, ImageBERTProcessor, ImageBERTRoIExtractor
    from imagebert_hf.evaluation import format_metrics_table
    from imagebert_hf.evaluation.zero_shot import chance_metrics, manifest_retrieval_inputs, zero_shot_retrieval
    from imagebert_hf.formats.files import atomic_write_json
    from imagebert_hf.regions import extract_regions
    from imagebert_hf.training import PretrainingRunOptions, load_recipe, run_pretraining
    from imagebert_hf.training.pretraining import check_run_folder, load_tokenizer
    from imagebert_hf.training.region_alignment import (
        REPORT_FILE,
        RegionAlignmentSettings,
        is_aligned_checkpoint,
        run_region_alignment,
    )

    started = time.perf_counter()
    data_dir, cache_dir = Path(args.data_dir), Path(args.cache_dir)
    flickr, coco = data_dir / "flickr8k_trainval" / "captions.jsonl", data_dir / "coco_val2017_128" / "captions.jsonl"
    for manifest in (flickr, coco):
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} not found; point --data_dir at the folder holding the real data.")

    check_run_folder(args.output_dir, args.resume)

    # Every stage's sources read the data and caches given here: found by source name, so a recipe may add stages.
    data_of_source = {
        "flickr8k_train": (flickr, cache_dir / "flickr8k"),
        "coco128": (coco, cache_dir / "coco128"),
    }
    # The recipe and --set are checked here, before anything is extracted or trained (the caches come next).
    # Set as they are (a folder named `exp #2` stays that string); a field --set names keeps --set's value.
    values = {"output_dir": args.output_dir}
    checked = load_recipe(args.config, args.set, check_paths=False)
    model_config = ImageBERTConfig(**checked.model.config)
    cells = sum(n * n for n in args.grid_sizes)
    if cells > model_config.max_regions:
        raise ValueError(
            f"--grid_sizes {' '.join(map(str, args.grid_sizes))}: {cells} cells, more regions than the model keeps "
            f"(model.config.max_regions {model_config.max_regions}), so the last cells of every image would be dropped; "
            f"choose smaller grids or --set model.config.max_regions={cells}."
        )
    for stage_index, stage in enumerate(checked.stages):
        for source_index, source in enumerate(stage.sources):
            if source.name in data_of_source:
                path, cache = data_of_source[source.name]
                where = f"stages.{stage_index}.sources.{source_index}"
                values.update({f"{where}.path": str(path), f"{where}.region_cache": str(cache)})

    extractor = ImageBERTRoIExtractor(grid_sizes=args.grid_sizes, max_regions=sum(n * n for n in args.grid_sizes))
    timings = {}
    for name, manifest in (("flickr8k", flickr), ("coco128", coco)):
        report = extract_regions(manifest, cache_dir / name, extractor, store_class_probs=False)
        timings[f"extract_{name}"] = report.seconds
        print(
            f"regions of {name}: {report.num_extracted} images ({report.num_shards_skipped} shards reused) in {report.seconds:.1f}s"
        )

    if checked.model.processor is None:
        # Each stage's model is published with the extractor its regions came from, so its folder serves photos
        # (`pipeline("image-text-retrieval", model=...)`) with the regions it was trained on.
        processor_dir = Path(args.output_dir) / "processor"
        with PartialState().main_process_first():
            if PartialState().is_main_process:
                processor = ImageBERTProcessor(
                    extractor, load_tokenizer(checked.model), model_config.max_text_length, model_config.max_regions
                )
                processor.save_pretrained(processor_dir)
        values["model.processor"] = str(processor_dir)
    set_by_flag = {override.split("=", 1)[0] for override in args.set}
    recipe = load_recipe(
        args.config, args.set, values={key: value for key, value in values.items() if key not in set_by_flag}
    )
    alignment = None
    if args.region_alignment_steps and recipe.model.init_from is None:
        aligned = Path(args.output_dir) / "region_alignment"
        # Under `accelerate launch` the main process fits it and the others then read its checkpoint.
        with PartialState().main_process_first():
            if is_aligned_checkpoint(aligned):  # an earlier call's (a resumed run starts from the same weights)
                alignment = json.loads((aligned / REPORT_FILE).read_text(encoding="utf-8"))
                fitted_steps = alignment["settings"]["max_steps"]
                if fitted_steps != args.region_alignment_steps:
                    raise ValueError(
                        f"{aligned} was fitted for {fitted_steps} steps, not --region_alignment_steps "
                        f"{args.region_alignment_steps}; pass {fitted_steps} or remove that folder."
                    )
                if alignment.get("seed") != recipe.seed:
                    raise ValueError(
                        f"{aligned} was fitted with seed {alignment.get('seed')}, not this run's seed {recipe.seed}; "
                        "pass that seed or remove that folder."
                    )
            else:
                align_started = time.perf_counter()
                settings = RegionAlignmentSettings(max_steps=args.region_alignment_steps)
                alignment = run_region_alignment(recipe, aligned, settings)
                timings["region_alignment"] = time.perf_counter() - align_started
        print(
            f"region alignment: held-out dual-encoder RSUM {alignment['held_out_rsum_before']:.1f} -> "
            f"{alignment['held_out_rsum_after']:.1f}"
        )
        values["model.init_from"] = str(aligned)
        recipe = load_recipe(
            args.config, args.set, values={key: value for key, value in values.items() if key not in set_by_flag}
        )
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
    if alignment is not None:
        alignment = {key: alignment[key] for key in ("settings", "held_out_rsum_before", "held_out_rsum_after")}
    command = "python examples/pretrain_shared_data.py " + " ".join(map(shlex.quote, argv or sys.argv[1:]))
    summary = {
        "results": results,
        "seed": recipe.seed,
        "seconds": timings,
        "steps_per_stage": run["steps_per_stage"],
        "history": run["history"],
        "region_alignment": alignment,
        "protocol": f"Flickr8k dev, {num_images} images x {len(text_to_image)} captions, every pair scored",
        "command": command,
    }
    atomic_write_json(Path(args.output_dir) / "results.json", summary, indent=1)
    return summary


if __name__ == "__main__":
    with exit_on_error("pretrain_shared_data"):
        main()
