"""Throughput of the curation pipeline: pages/s per core for parsing and for the whole pipeline, locally and on
Spark local mode, against a naive BeautifulSoup parse of the same pages measured in the same run.

    python benchmarks/bench_curation.py                 # about 2-3 minutes on 2 cores
    python benchmarks/bench_curation.py --pages 1000 --no_spark

Pages are generated around real photos from ../shared/data when present, else around generated images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from imagebert_hf.curation import CurationConfig, Tally, parse_pages, run_local, synthetic
from imagebert_hf.curation.inputs import discover_sources, scan_source


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco_val2017_128"


def photos(n: int) -> list[tuple[bytes, list[str]]]:
    if (SHARED / "captions.jsonl").is_file():
        records = [json.loads(line) for line in (SHARED / "captions.jsonl").read_text().splitlines()]
        return [((SHARED / r["image"]).read_bytes(), r["captions"]) for r in records[:n]]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        arr = (rng.random((60, 80, 3)) * 255).astype(np.uint8)
        data = synthetic.encode_image(Image.fromarray(arr).resize((640, 480), Image.Resampling.BICUBIC))
        out.append((data, [f"A picture of a colourful scene number {i} in the park"]))
    return out


def build_warcs(folder: Path, n_pages: int, n_files: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    pool = photos(128)
    per_file = -(-n_pages // n_files)
    paths = []
    for f in range(n_files):
        records = []
        for i in range(f * per_file, min(n_pages, (f + 1) * per_file)):
            data, captions = pool[i % len(pool)]
            host = f"site{i % 17}.example.com"
            html = synthetic.page_html(
                f"Story {i}",
                f"/photos/{i}.jpg",
                alt=captions[i % len(captions)],
                caption=captions[(i + 1) % len(captions)],
                paragraphs=synthetic.FILLER_PARAGRAPHS[i % 3 :][:2],
                extra_images=[f"/thumbs/{i}-{k}.jpg" for k in range(i % 20)],
            )
            records.append((f"https://{host}/story/{i}.html", "text/html; charset=utf-8", html.encode()))
            records.append((f"https://{host}/photos/{i}.jpg", "image/jpeg", data))
        paths.append(str(synthetic.write_warc(folder / f"bench-{f:03d}.warc.gz", records)))
    return paths


def read_pages(inputs: list[str], config: CurationConfig) -> list[dict]:
    tally = Tally()
    return [row for source in discover_sources(inputs) for row in scan_source(source, config.parse, tally)]


def resiliparse_dom(pages: list[dict]) -> int:
    """The same work as `naive_bs4` with the libraries stage 1 uses: decode, parse, visible text, image attributes."""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding
    from resiliparse.parse.html import HTMLTree

    found = 0
    for page in pages:
        tree = HTMLTree.parse(bytes_to_str(page["html"], page["charset"] or detect_encoding(page["html"])))
        extract_plain_text(tree)
        for img in tree.body.query_selector_all("img"):
            found += bool(img.getattr("src")) + bool(img.getattr("alt"))
    return found


def naive_bs4(pages: list[dict]) -> int:
    """What a first attempt looks like: decode as UTF-8, BeautifulSoup's pure-Python parser, walk the images."""
    from bs4 import BeautifulSoup

    found = 0
    for page in pages:
        soup = BeautifulSoup(page["html"].decode("utf-8", "replace"), "html.parser")
        soup.get_text(" ")
        for img in soup.find_all("img"):
            found += bool(img.get("src")) + bool(img.get("alt"))
    return found


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=160, help="Number of generated pages.")
    parser.add_argument("--files", type=int, default=4, help="Number of WARC files they are spread over.")
    parser.add_argument("--num_proc", type=int, default=2, help="Processes (and Spark local cores) for parallel runs.")
    parser.add_argument("--no_spark", action="store_true", help="Skip the Spark local-mode measurements.")
    args = parser.parse_args()

    config = CurationConfig()
    rows: list[tuple[str, int, float]] = []  # (what, cores, pages per second)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = build_warcs(tmp / "warcs", args.pages, args.files)
        pages = read_pages(inputs, config)  # warms the OS cache and the imports
        n = len(pages)
        batch = {key: [p[key] for p in pages] for key in pages[0]}
        parse_pages({k: v[:5] for k, v in batch.items()}, config.parse)  # builds the WARC image indexes once

        t, _ = timed(read_pages, inputs, config)
        rows.append(("read WARC records (fastwarc)", 1, n / t))
        t, (out, _) = timed(parse_pages, batch, config.parse)
        rows.append(("parse: resiliparse + dominant image + texts", 1, n / t))
        t, _ = timed(resiliparse_dom, pages)
        rows.append(("DOM + text + img attributes: resiliparse", 1, n / t))
        t, _ = timed(naive_bs4, pages)
        rows.append(("DOM + text + img attributes: naive BeautifulSoup", 1, n / t))
        t, _ = timed(run_local, inputs, tmp / "local1", config, num_proc=1)
        rows.append(("whole pipeline, local (datasets)", 1, n / t))
        t, _ = timed(run_local, inputs, tmp / "localN", config, num_proc=args.num_proc)
        rows.append(("whole pipeline, local (datasets)", args.num_proc, n / t))

        if not args.no_spark:
            from imagebert_hf.curation.pipeline import STAGES, scan_sources
            from imagebert_hf.curation.spark import _stage_partition, local_spark_session, run_spark

            spark = local_spark_session(f"local[{args.num_proc}]", shuffle_partitions=args.num_proc * 2)
            spark.sparkContext.setLogLevel("ERROR")
            sc = spark.sparkContext
            sources = [s.to_dict() for s in discover_sources(inputs)]

            def spark_parse() -> int:
                rdd = sc.parallelize(sources, len(sources)).mapPartitions(lambda it: scan_sources(it, config))
                return rdd.mapPartitions(lambda it: _stage_partition(it, STAGES[0], config, 32)).count()

            spark_parse()  # starts and warms the Python workers
            t, _ = timed(spark_parse)
            rows.append(("read + parse, Spark local mode", args.num_proc, n / t))
            t, _ = timed(run_spark, inputs, tmp / "spark", config, spark=spark, num_partitions=args.num_proc * 2)
            rows.append(("whole pipeline, Spark local mode", args.num_proc, n / t))
            spark.stop()

    print(f"\n{n} pages, {os.cpu_count()} CPU cores visible, python {sys.version.split()[0]}\n")
    print(f"| {'measurement':<50} | cores | pages/s | pages/s per core |")
    print(f"|{'-' * 52}|------:|--------:|-----------------:|")
    for what, cores, rate in rows:
        print(f"| {what:<50} | {cores:>5} | {rate:>7.1f} | {rate / cores:>16.1f} |")
    per_core = {(what, cores): rate / cores for what, cores, rate in rows}
    naive = per_core[("DOM + text + img attributes: naive BeautifulSoup", 1)]
    same_work = per_core[("DOM + text + img attributes: resiliparse", 1)]
    stage = per_core[("parse: resiliparse + dominant image + texts", 1)]
    print(f"\nsame parsing work, resiliparse / naive BeautifulSoup: {same_work / naive:.1f}x")
    print(f"whole stage 1 (also language, DOM features, image reads) / naive BeautifulSoup: {stage / naive:.2f}x")
    local = per_core[("whole pipeline, local (datasets)", args.num_proc)]
    local1 = per_core[("whole pipeline, local (datasets)", 1)]
    print(f"local parallel efficiency with {args.num_proc} processes: {local / local1:.2f}")
    if not args.no_spark:
        spark_rate = per_core[("whole pipeline, Spark local mode", args.num_proc)]
        print(f"Spark local mode / local datasets, whole pipeline per core: {spark_rate / local:.2f}")


if __name__ == "__main__":
    main()
