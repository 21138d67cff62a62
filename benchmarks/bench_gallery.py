"""Retrieval over a gallery read from the region cache: resident memory, index build time and text -> images
latency with re-ranking, on a generated gallery of 100k images against the same on 10k.

Per image (kept small so 100k fit this machine): 8 to 16 regions of 64-d features in float16, 5-d locations; the
shortlist embeddings are random 64-d unit vectors (an embedding per image, as the unimodal heads give). Two
`RetrievalCorpus` of the same gallery, one after the other in the same process:

- `mapped`: `RetrievalCorpus.from_region_cache` (its `region_inputs` a `RegionGallery` over the memory-mapped cache:
  a row number and a region count per image); the candidates' regions are read when they are re-ranked;
- `stacked`: `RetrievalCorpus.from_records(..., regions=region_cache_lookup(cache))`, every image's regions padded
  into RAM tensors.

Both are queried through the same `score_pairs` (the cross-encoder's pairs gathered from `region_inputs`), and give
the same scores.

The shortlist index is the retrieval engine's `EmbeddingIndex`, IVF-PQ by default (`--index_type`: `ivfpq`,
`ivf`, `hnsw`, `flat` or a faiss factory string), without the float32 vectors kept beside it; it is saved and
loaded again before the queries, and its size on disk is printed. A query is: search it for the top `--k` images,
read their regions, score the k pairs with a tiny `ImageBERTForImageTextRetrieval` cross-encoder. p50 / p95 over
`--queries` queries, one thread. Resident memory is what building each corpus adds to the process's private RSS
(psutil, after freed memory went back to the system), and for the mapped one also after its queries, with the
pages of the mapped cache files the queries touched apart: those count in RSS too, but they are clean file pages
the operating system drops when memory is short, unlike the stacked tensors.

    python benchmarks/bench_gallery.py                       # 10k and 100k, about 1 GB of temporary disk
    python benchmarks/bench_gallery.py --sizes 5000 50000 --index_type flat --queries 50   # a quick look
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from generated_regions import GeneratedExtractor, image_table

from imagebert_hf.regions import extract_regions, load_region_cache


FEATURES, MAX_REGIONS, EMBEDDING = 64, 16, 64


def rss_mb(file_backed: bool = False) -> float:
    """The process RSS in MB once freed memory went back to the system (so that what a gallery adds is measurable):
    the private (anonymous) part, or with `file_backed` the pages of mapped files, which the system may drop."""
    import contextlib
    import ctypes
    import gc

    import psutil
    import pyarrow

    gc.collect()
    pyarrow.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: freed, unreturned memory then counts too
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    memory = psutil.Process().memory_info()
    shared = getattr(memory, "shared", 0)  # Linux: file-backed and shared pages
    return (shared if file_backed else memory.rss - shared) / 2**20


def build_gallery(folder: Path, num_images: int) -> float:
    table = image_table(num_images)
    start = time.perf_counter()
    extractor = GeneratedExtractor(FEATURES, 10, 8, MAX_REGIONS)
    extract_regions(
        table, folder, extractor, key_column="key", store_class_probs=False, shard_size=10_000, progress=False
    )
    return time.perf_counter() - start


def tiny_cross_encoder():
    from imagebert_hf import ImageBERTConfig, ImageBERTForImageTextRetrieval

    config = ImageBERTConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        region_feature_size=FEATURES, max_regions=MAX_REGIONS, max_text_length=16,
    )  # fmt: skip
    return ImageBERTForImageTextRetrieval(config).eval()


def query_latencies(index, region_inputs, model, num_queries: int, k: int, seed: int = 0):
    """Seconds per query (search, then re-rank the top k from `region_inputs`) and the scores, for comparing."""
    from imagebert_hf.models.imagebert.retrieval_index import score_pairs

    rng = np.random.default_rng(seed)
    text = {"input_ids": torch.from_numpy(rng.integers(5, 99, (1, 12))), "attention_mask": torch.ones(1, 12).long()}
    seconds, scores = [], []
    for _ in range(num_queries):
        query = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((1, EMBEDDING), dtype=np.float32)))
        start = time.perf_counter()
        _, candidates = index.search(query, k)
        scores.append(score_pairs(model, text, region_inputs, candidates[0], torch.zeros(k, dtype=torch.long), k))
        seconds.append(time.perf_counter() - start)
    return np.asarray(seconds), torch.stack(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="gallery sizes")
    parser.add_argument("--queries", type=int, default=200, help="queries timed per gallery")
    parser.add_argument("--k", type=int, default=32, help="candidates re-ranked per query")
    parser.add_argument("--index_type", default="ivfpq", help="EmbeddingIndex type or faiss factory string")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from imagebert_hf.data.retrieval_corpus import RetrievalCorpus, region_cache_lookup
    from imagebert_hf.models.imagebert.retrieval_index import EmbeddingIndex

    model = tiny_cross_encoder()
    warm_up = {
        "region_features": torch.zeros(1, MAX_REGIONS, FEATURES),
        "region_locations": torch.zeros(1, MAX_REGIONS, 5),
    }
    query_latencies(EmbeddingIndex(torch.ones(1, EMBEDDING)), warm_up, model, 2, 1)  # torch's first-call allocations
    print(
        f"one thread; baseline private RSS {rss_mb():.0f} MB; {FEATURES}-d float16 features, 8-{MAX_REGIONS} regions/image"
    )
    folder = Path(tempfile.mkdtemp(prefix="bench_gallery-"))
    results = {}
    try:
        for size in args.sizes:
            written = build_gallery(folder / str(size), size)
            disk = sum(f.stat().st_size for f in (folder / str(size)).rglob("*") if f.is_file()) / 2**20
            records = [{"image_id": f"img{i:07d}", "captions": ["a photo"]} for i in range(size)]
            rng = np.random.default_rng(1)
            embeddings = torch.nn.functional.normalize(
                torch.from_numpy(rng.standard_normal((size, EMBEDDING), dtype=np.float32))
            )
            start = time.perf_counter()
            index = EmbeddingIndex(embeddings, index_type=args.index_type, keep_vectors=False)
            built = time.perf_counter() - start
            index.save(folder / f"index-{size}")
            index_mb = sum(f.stat().st_size for f in (folder / f"index-{size}").rglob("*") if f.is_file()) / 2**20
            start = time.perf_counter()
            index = EmbeddingIndex.load(folder / f"index-{size}")
            loaded = time.perf_counter() - start
            embeddings = None  # the index holds the gallery's search side from here
            before, file_before = rss_mb(), rss_mb(file_backed=True)
            start = time.perf_counter()
            cache = load_region_cache(folder / str(size))
            corpus = RetrievalCorpus.from_region_cache(records, cache, max_regions=MAX_REGIONS)
            opened = time.perf_counter() - start
            mapped_rss = rss_mb() - before
            mapped, mapped_scores = query_latencies(index, corpus.region_inputs, model, args.queries, args.k)
            mapped_after, mapped_file = rss_mb() - before, rss_mb(file_backed=True) - file_before
            corpus = None
            before = rss_mb()
            start = time.perf_counter()
            corpus = RetrievalCorpus.from_records(records, regions=region_cache_lookup(cache), max_regions=MAX_REGIONS)
            stacked_seconds = time.perf_counter() - start
            stacked_rss = rss_mb() - before
            tensors_mb = sum(value.nbytes for value in corpus.region_inputs.values()) / 2**20
            stacked, stacked_scores = query_latencies(index, corpus.region_inputs, model, args.queries, args.k)
            if not torch.equal(mapped_scores, stacked_scores):
                raise AssertionError("the mapped and the stacked gallery gave different scores")
            corpus = cache = None  # released before the next gallery
            results[size] = (mapped_rss, stacked_rss, built, mapped, stacked)
            print(
                f"{size:>7} images: cache {disk:.0f} MB on disk (written in {written:.0f} s); mapped corpus built in "
                f"{opened * 1e3:.0f} ms, {mapped_rss:+.0f} MB RSS ({mapped_after:+.0f} MB after its queries, plus {mapped_file:+.0f} MB of "
                f"mapped cache pages); "
                f"stacked corpus {stacked_seconds:.1f} s, {stacked_rss:+.0f} MB RSS ({tensors_mb:.0f} MB of tensors); "
                f"{index.factory} index built in {built:.2f} s, {index_mb:.1f} MB saved, loaded in "
                f"{loaded * 1e3:.0f} ms; scores identical"
            )
            for name, times in (("mapped", mapped), ("stacked", stacked)):
                print(
                    f"          {name:<8} text -> images, top {args.k} re-ranked: p50 {np.percentile(times, 50) * 1e3:6.1f} ms, "
                    f"p95 {np.percentile(times, 95) * 1e3:6.1f} ms"
                )
            shutil.rmtree(folder / str(size), ignore_errors=True)
        if len(results) >= 2:
            small, large = min(results), max(results)
            grow = large / small
            print(f"growth {small} -> {large} images ({grow:.0f}x):")
            print(f"  RSS added     mapped {results[small][0]:+.0f} -> {results[large][0]:+.0f} MB, stacked "
                  f"{results[small][1]:+.0f} -> {results[large][1]:+.0f} MB")  # fmt: skip
            print(f"  index build  {results[large][2] / max(results[small][2], 1e-9):6.1f}x")
            for label, i in (("mapped p50", 3), ("stacked p50", 4)):
                print(
                    f"  {label:<12} {np.percentile(results[large][i], 50) / np.percentile(results[small][i], 50):6.1f}x"
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
