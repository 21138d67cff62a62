"""Curate web pages into LAIT-style image-text pairs, then look at what survived and why the rest did not.

    python examples/curate_lait.py --inputs crawl/*.warc.gz --output_dir outputs/lait
    python examples/curate_lait.py --output_dir outputs/lait_demo            # builds a small demo crawl first
    spark-submit examples/curate_lait.py --inputs /shared/crawl --output_dir /shared/lait --runner spark

Without `--inputs`, the script writes a demo crawl around the COCO photos in ../shared/data (three WARC files and
a folder of saved pages, with logos, ads, tracking pixels, spam alt texts, tiny images, a decompression bomb, a
German page, a corrupt WARC segment and duplicates) into `OUTPUT_DIR/demo_crawl/` and curates it into
`OUTPUT_DIR/pairs/`; with `--inputs` the pairs go into `--output_dir` itself, which may be an fsspec URL
(`s3://bucket/lait`) for the Spark runner. A bad flag or input ends the script with one line naming it and exit
status 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from imagebert_hf.curation import (
    AggregationConfig,
    CurationConfig,
    ImageFilterConfig,
    ParseConfig,
    RelevanceConfig,
    TextCleaningConfig,
    load_curated,
    run_local,
    run_spark,
    synthetic,
)
from imagebert_hf.curation.tally import funnel_markdown
from imagebert_hf.formats.files import check_output_dir
from imagebert_hf.models.imagebert.script_errors import exit_on_error, parse_flags


@dataclass
class ExampleArguments:
    output_dir: str = field(metadata={"help": "Output folder (parquet shards, funnel report, config)."})
    inputs: list[str] = field(default_factory=list, metadata={"help": "WARC files or HTML folders; demo when empty."})
    runner: str = field(default="local", metadata={"help": "`local` or `spark`."})
    num_proc: int = field(default=1, metadata={"help": "Processes of the local runner."})
    data_dir: str = field(
        default="../shared/data/coco_val2017_128", metadata={"help": "Captioned photos for the demo crawl."}
    )


def demo_inputs(data_dir: Path, output_dir: Path) -> list[str]:
    records = [json.loads(line) for line in (data_dir / "captions.jsonl").read_text().splitlines()]
    photos = [
        ((data_dir / r["image"]).read_bytes(), r["captions"])
        for r in records
        if min(r["width"], r["height"]) > 300 and max(r["width"], r["height"]) <= 3 * min(r["width"], r["height"])
    ]
    return synthetic.build_corpus(output_dir / "demo_crawl", photos[: synthetic.PHOTOS_NEEDED])["inputs"]


def main() -> None:
    # 1. Every stage option is a flag: --min_side, --nsfw_threshold, --max_rare_word_ratio, ...
    parser = HfArgumentParser(
        (ExampleArguments, ParseConfig, ImageFilterConfig, TextCleaningConfig, RelevanceConfig, AggregationConfig)
    )
    args, parse, images, text, relevance, aggregation = parse_flags(parser)
    config = CurationConfig(parse, images, text, relevance, aggregation)
    # A local folder is checked here; an fsspec URL (s3://, hdfs://) is passed on as written, for the runner.
    remote = "://" in args.output_dir
    output_dir = args.output_dir if remote else str(check_output_dir(args.output_dir))
    if args.runner not in ("local", "spark"):
        raise ValueError(f"--runner must be local or spark, got {args.runner!r}")

    # 2. Inputs: a real crawl, curated into --output_dir; or the demo crawl, written locally into its demo_crawl/
    #    and curated into its pairs/ (a run's output must lie apart from its inputs).
    if not args.inputs and remote:
        raise ValueError(f"--output_dir {args.output_dir} is a URL; the demo crawl is written locally: give --inputs.")
    inputs = args.inputs or demo_inputs(Path(args.data_dir), Path(output_dir))
    if not args.inputs:
        output_dir = str(Path(output_dir) / "pairs")

    # 3. Run the five stages: locally with datasets, or on Spark (the active session under spark-submit). Inputs
    #    that yield not a single page end the run with their counts by reason, rather than with zero pairs. The
    #    pairs, image bytes included, stay on disk rather than being read back into this process's memory.
    if args.runner == "spark":
        result = run_spark(inputs, output_dir, config, require_pages=True, load_result=False)
    else:
        result = run_local(inputs, output_dir, config, num_proc=args.num_proc, require_pages=True, load_result=False)

    # 4. The result: a datasets.Dataset of image bytes, text, URLs and per-stage scores, memory-mapped from disk.
    pairs = load_curated(output_dir)
    print(pairs)
    for row in pairs.select(range(min(3, len(pairs)))):
        print(f"{row['relevance_score']:.2f}  {row['text']!r}  <- {row['image_url']}")

    # 5. The funnel: what each stage received, kept and dropped, by reason (also funnel.{json,md,png} beside the data).
    print(funnel_markdown(result.tally))


if __name__ == "__main__":
    with exit_on_error("curate_lait"):
        main()
