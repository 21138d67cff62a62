"""The main job (`make demo`): ImageBERT end to end on a CPU, with no download and no external data.

1. Generates the shapes dataset (images of coloured shapes whose captions describe them) as a jsonl manifest, with
   a held-out test split, and a "web" copy of the training captions where half are corrupted.
2. Extracts regions with the offline EfficientNet-Lite0 extractor over each image's object boxes and the whole
   image, into a region cache.
3. Pretrains a tiny ImageBERT in two stages, the noisy captions first and the clean ones second (MLM, MOC, MRFR,
   ITM), with the same code and recipe format as full-size runs.
4. Scores every (image, caption) pair of the test split with the ITM head (zero-shot, no fine-tuning) and prints
   R@1/5/10 next to chance, after each stage.
5. Saves the loss curves and a recall plot.

    python examples/demo.py --output_dir outputs/demo
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import HfArgumentParser

from imagebert_hf.formats.files import check_output_dir
from imagebert_hf.models.imagebert.configuration_imagebert import SEED_RULE, check_flag_values
from imagebert_hf.models.imagebert.script_errors import exit_on_error, parse_flags


@dataclass
class DemoArguments:
    """Settings of the demo; the defaults take a few minutes on two CPU cores."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where data, cache, models and plots go."})
    num_train_images: int = field(default=800, metadata={"help": "Generated training images."})
    num_test_images: int = field(default=100, metadata={"help": "Held-out images for zero-shot retrieval."})
    image_size: int = field(default=96, metadata={"help": "Side of the generated images, in pixels."})
    extraction_size: int = field(default=128, metadata={"help": "Backbone input side for region extraction."})
    caption_noise: float = field(default=0.5, metadata={"help": "Share of corrupted captions in the noisy stage."})
    noisy_steps: int = field(default=600, metadata={"help": "Optimizer steps of stage 1 (noisy captions)."})
    clean_steps: int = field(default=900, metadata={"help": "Optimizer steps of stage 2 (clean captions)."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate of both stages."})
    hidden_size: int = field(default=128, metadata={"help": "Width of the tiny model."})
    num_hidden_layers: int = field(default=3, metadata={"help": "Layers of the tiny model."})
    seed: int = field(default=0, metadata={"help": "Seed of data generation, initialisation and training."})
    report_to: str = field(default="tensorboard", metadata={"help": "'tensorboard' or 'none'."})
    num_threads: int = field(
        default=1,
        metadata={
            "help": "Torch CPU threads. The tiny model's matrices are too small to gain from more, and extra threads "
            "slow everything down badly when the cores are shared."
        },
    )


# Every numeric setting's rule as `check_field`'s (kind, lowest, highest). Generated images are at least 32 pixels a
# side, the backbone's input too (it downsamples by 32); the demo needs held-out images to rank.
_RULES = {
    **dict.fromkeys(
        (
            "num_train_images",
            "num_test_images",
            "noisy_steps",
            "clean_steps",
            "batch_size",
            "num_hidden_layers",
            "num_threads",
        ),
        ("int", 1, None),
    ),
    **dict.fromkeys(("image_size", "extraction_size"), ("int", 32, None)),
    "caption_noise": ("float", 0.0, 1.0),
    "learning_rate": ("positive", None, None),
    "hidden_size": ("int", 4, None),
    "seed": SEED_RULE,
}
NUM_ATTENTION_HEADS = 4


def check_arguments(args: DemoArguments) -> None:
    """Raises `ValueError` naming the flag when a setting cannot work, before anything is written."""
    check_flag_values(args, _RULES)
    if args.hidden_size % NUM_ATTENTION_HEADS:
        raise ValueError(
            f"--hidden_size must be a multiple of the {NUM_ATTENTION_HEADS} attention heads, got {args.hidden_size}."
        )
    if args.report_to not in ("tensorboard", "none"):
        raise ValueError(f"--report_to must be 'tensorboard' or 'none', got {args.report_to!r}.")
    check_output_dir(args.output_dir)


def log(message: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)


def extract_demo_regions(manifest: Path, cache_dir: Path, extraction_size: int) -> dict:
    """Regions over the annotated object boxes plus the whole image, through the region cache."""
    import datasets

    from imagebert_hf import ImageBERTRoIExtractor
    from imagebert_hf.formats.manifest import read_manifest
    from imagebert_hf.regions import extract_regions

    records = read_manifest(manifest)
    table = datasets.Dataset.from_dict(
        {
            "image": [str(record.image_path) for record in records],
            "key": [record.image for record in records],
            "boxes": [
                [list(box) for box in record.boxes] + [[0.0, 0.0, float(record.width), float(record.height)]]
                for record in records
            ],
        }
    )
    extractor = ImageBERTRoIExtractor(size={"height": extraction_size, "width": extraction_size}, batch_size=16)
    report = extract_regions(
        table, cache_dir, extractor, key_column="key", boxes_column="boxes", store_class_probs=False, shard_size=256
    )
    if report.num_failed:
        raise RuntimeError(f"region extraction failed for {report.num_failed} images: {report.failures[:3]}")
    return {
        "images": report.num_extracted,
        "seconds": report.seconds,
        "feature_size": extractor.region_feature_size,
        "extractor": extractor,
    }


def save_processor(extractor, output_dir: Path, max_text_length: int, max_regions: int) -> Path:
    """The tokenizer and extractor as one `ImageBERTProcessor`, shipped with every stage's model.

    Given no boxes, the extractor pools a grid instead of the annotated objects the demo trains on.
    """
    from imagebert_hf import ImageBERTProcessor
    from imagebert_hf.data.synthetic import make_synthetic_tokenizer

    processor = ImageBERTProcessor(extractor, make_synthetic_tokenizer(), max_text_length, max_regions)
    processor.save_pretrained(output_dir)
    return output_dir


def demo_recipe(args: DemoArguments, data_dir: Path, cache_dir: Path, feature_size: int, num_classes: int) -> dict:
    def stage(name: str, manifest: str, steps: int) -> dict:
        return {
            "name": name,
            "sources": [
                {
                    "name": name,
                    "type": "manifest",
                    "path": str(data_dir / manifest),
                    "splits": ["train"],
                    "region_cache": str(cache_dir),
                }
            ],
            "max_steps": steps,
            "per_device_train_batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "warmup_ratio": 0.05,
            "weight_decay": 0.01,
        }

    return {
        "output_dir": str(Path(args.output_dir) / "pretraining"),
        "seed": args.seed,
        "checkpointing_steps": 200,
        "save_total_limit": 1,
        "logging_steps": 5,
        "report_to": args.report_to,
        "model": {
            "tokenizer": "synthetic",
            "config": {
                "hidden_size": args.hidden_size,
                "num_hidden_layers": args.num_hidden_layers,
                "num_attention_heads": NUM_ATTENTION_HEADS,
                "intermediate_size": 4 * args.hidden_size,
                "max_position_embeddings": 64,
                "max_text_length": 24,
                "max_regions": 4,
                "region_feature_size": feature_size,
                "num_object_classes": num_classes,
                # A model this small underfits; dropout only delays the moment ITM starts to learn.
                "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0,
                "contrastive_embedding_size": 32,
            },
        },
        "stages": [
            stage("noisy_web", "captions_noisy.jsonl", args.noisy_steps),
            stage("clean", "captions.jsonl", args.clean_steps),
        ],
    }


def read_arguments(argv: list[str] | None = None) -> DemoArguments:
    (args,) = parse_flags(HfArgumentParser(DemoArguments), argv)
    check_arguments(args)
    return args


def main(argv: list[str] | None = None) -> dict:
    return run_demo(read_arguments(argv))


def run_demo(args: DemoArguments) -> dict:
    logging.basicConfig(level=logging.WARNING)
    # Saving a model with tied MLM weights makes accelerate warn at every checkpoint; nothing is lost.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    torch.set_num_threads(args.num_threads)
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    # The demo owns these folders: a second `make demo` starts them afresh instead of resuming a finished run.
    for name in ("data", "regions", "processor", "pretraining"):
        if (output_dir / name).exists():
            print(f"removing the earlier demo's {output_dir / name}")
            shutil.rmtree(output_dir / name)

    from imagebert_hf.data.synthetic import make_synthetic_tokenizer, write_synthetic_manifest
    from imagebert_hf.data.web_noise import corrupted_captions, write_noisy_manifest
    from imagebert_hf.evaluation import format_metrics_table
    from imagebert_hf.models.imagebert.roi_offline_weights import OFFLINE_NUM_CLASSES
    from imagebert_hf.training import recipe_from_dict, run_pretraining

    data_dir = output_dir / "data"
    total = args.num_train_images + args.num_test_images
    manifest = write_synthetic_manifest(
        data_dir, total, seed=args.seed, image_size=args.image_size, test_fraction=args.num_test_images / total
    )
    noise = corrupted_captions(args.caption_noise, args.seed)
    write_noisy_manifest(manifest, data_dir / "captions_noisy.jsonl", noise, splits=["train"])
    log(f"generated {total} images ({args.num_test_images} held out) in {data_dir}", started)

    cache_dir = output_dir / "regions"
    extraction = extract_demo_regions(manifest, cache_dir, args.extraction_size)
    log(f"extracted regions of {extraction['images']} images in {extraction['seconds']:.1f}s -> {cache_dir}", started)

    recipe_dict = demo_recipe(args, data_dir, cache_dir, extraction["feature_size"], OFFLINE_NUM_CLASSES)
    model_config = recipe_dict["model"]["config"]
    recipe_dict["model"]["processor"] = str(
        save_processor(
            extraction.pop("extractor"),
            output_dir / "processor",
            model_config["max_text_length"],
            model_config["max_regions"],
        )
    )
    run = run_pretraining(recipe_from_dict(recipe_dict, where="demo recipe"))
    log(f"pretrained {run['steps_per_stage']} steps -> {run['final_model']}", started)

    from imagebert_hf import ImageBERTConfig, ImageBERTForImageTextRetrieval
    from imagebert_hf.evaluation.plots import plot_recall_bars
    from imagebert_hf.evaluation.zero_shot import chance_metrics, manifest_retrieval_inputs, zero_shot_retrieval

    # The pretraining heads are not part of the retrieval model; the load report listing them is expected.
    transformers.logging.set_verbosity_error()
    config = ImageBERTConfig.from_pretrained(run["final_model"])
    text_inputs, region_inputs, text_to_image = manifest_retrieval_inputs(
        manifest, cache_dir, make_synthetic_tokenizer(), split="test", max_text_length=config.max_text_length
    )
    torch.manual_seed(args.seed)
    results = {
        "chance": chance_metrics(text_to_image),
        "untrained": zero_shot_retrieval(
            ImageBERTForImageTextRetrieval(config), text_inputs, region_inputs, text_to_image
        ),
    }
    for stage_dir in run["stage_dirs"]:
        results["after " + Path(stage_dir).name] = zero_shot_retrieval(
            Path(stage_dir) / "final", text_inputs, region_inputs, text_to_image
        )
    log("zero-shot retrieval done", started)

    print()
    print(
        f"Zero-shot retrieval, {args.num_test_images} held-out images x {len(text_to_image)} captions "
        "(TR: image -> text, IR: text -> image; recall in %)"
    )
    print(format_metrics_table(results))
    plot_recall_bars(results, output_dir / "retrieval.png", title="zero-shot retrieval on held-out synthetic images")
    summary = {
        "results": results,
        "seconds": time.perf_counter() - started,
        "extraction": extraction,
        "steps_per_stage": run["steps_per_stage"],
        "final_model": run["final_model"],
        "args": vars(args),
    }
    (output_dir / "results.json").write_text(json.dumps(summary, indent=1))
    print()
    print(f"plots: {Path(recipe_dict['output_dir']) / 'losses.png'}, {output_dir / 'retrieval.png'}")
    print(f"models: {', '.join(str(Path(d) / 'final') for d in run['stage_dirs'])}")
    log("demo finished", started)
    return summary


if __name__ == "__main__":
    with exit_on_error("demo"):
        arguments = read_arguments()
    # Imported once the flags are read: `--help` and a refused flag need none of the training stack.
    from imagebert_hf.training import TooManyFailedRecords

    with exit_on_error("demo", errors=(OSError, ValueError, TooManyFailedRecords)):
        run_demo(arguments)
