"""The Spark runner: the same stage functions as the local runner, over RDD partitions.

Works with a local-mode session (tests, one machine) and on a cluster through `spark-submit`. Inputs and the output
folder may be any fsspec URL the executors can reach (`s3://`, `gs://`, `hdfs://`, `file://`, ...), or local
paths readable at the same path from every executor (a shared or network file system): the driver lists the input
folders through fsspec, and each executor opens the WARC and HTML files it parses by their URL.
Executors read the inputs, write the output files and count what they drop; the driver only plans, and receives
one merged tally per part. The work is cut into parts (groups of input files): a finished part is kept under
`output_dir/parts/` and not redone when the run is started again after a crash. The package must be installed on
the executors (or shipped with `--py-files`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from transformers.utils import logging

from ..formats.files import atomic_write_text, publish_folder
from .aggregation import aggregate_image_group, aggregate_text_group
from .config import CurationConfig, ParseConfig
from .inputs import discover_sources, input_version, open_input, resolver_for
from .parse import _image_src, decode_html
from .pipeline import (
    OUTPUT_COLUMNS,
    REPORT_FILES,
    STAGES,
    TALLY,
    CurationResult,
    Stage,
    apply_stage,
    check_pages_read,
    check_run_paths,
    check_stage_inputs,
    count_duplicate_pairs,
    duplicate_rank,
    finalize_report,
    load_curated,
    publish_report,
    scan_sources,
)
from .tally import Tally
from .text_cleaning import text_key


logger = logging.get_logger(__name__)

DATA_TMP_PREFIX = ".data.tmp-"


def local_spark_session(master: str = "local[2]", app_name: str = "imagebert-curate", shuffle_partitions: int = 4):
    """A local-mode SparkSession tuned for one machine (no UI, few shuffle partitions)."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    # A local session talks only to itself: keep the driver, its block manager and the workers on loopback.
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    return (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", str(shuffle_partitions))
        .config("spark.default.parallelism", str(shuffle_partitions))
        .config("spark.driver.memory", "2g")
        .config("spark.python.worker.reuse", "true")
        .getOrCreate()
    )


def _stage_partition(rows: Iterator[dict], stage: Stage, config: CurationConfig, batch_size: int) -> Iterator[dict]:
    """Feeds a partition to a stage in batches; yields its records and tally rows as dicts."""
    buffer: list[dict] = []

    def flush():
        columns = list(buffer[0]) if buffer else [*stage.columns, TALLY]
        batch = {name: [row.get(name) for row in buffer] for name in columns}
        result = apply_stage(batch, stage, config)
        names = list(result)
        for i in range(len(result[TALLY])):
            yield {name: result[name][i] for name in names}

    for row in rows:
        buffer.append(row)
        if len(buffer) >= batch_size:
            yield from flush()
            buffer = []
    if buffer:
        yield from flush()


def _filesystem(url: str | Path):
    """`(fsspec filesystem, path)` of a local path or URL."""
    from fsspec.core import url_to_fs

    return url_to_fs(str(url))


def _is_local(url: str) -> bool:
    return "://" not in url and "::" not in url


def discover_inputs(inputs: list[str | Path]) -> list[dict]:
    """Sources of local paths and fsspec URLs (files, folders, glob patterns), as the local runner finds them
    (sorted, so reruns are identical).

    Pages are read where they are parsed and their images by offset from the same WARC, so every executor must
    reach each input by the same path or URL: an object store or HDFS URL, or a shared file system. (An in-process
    filesystem such as `memory://` is only visible to executors in the driver's process.)
    """
    return [s.to_dict() for s in discover_sources(inputs)]


def _merge_tallies(rdd) -> Tally:
    """The tally rows of `rdd` summed by Spark: partial sums per partition, combined in a tree; the driver gets one
    tally whatever the input size."""

    def add(total: Tally, row: dict) -> Tally:
        total.update(Tally.from_json(row[TALLY]))
        return total

    def combine(a: Tally, b: Tally) -> Tally:
        a.update(b)
        return a

    return rdd.filter(lambda r: r[TALLY] is not None).treeAggregate(Tally(), add, combine)


def _write_parquet(url_prefix: str, columns: tuple[str, ...]):
    """A `mapPartitionsWithIndex` function writing each partition's rows to `url_prefix-NNNNN.parquet` (fsspec) from
    the executor; yields the row count."""

    def write(index: int, rows: Iterator) -> Iterator[int]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .pipeline import features_for

        schema = features_for(columns, with_tally=False).arrow_schema
        batch = [dict(zip(columns, row)) if isinstance(row, tuple) else row for row in rows]
        table = pa.Table.from_pylist([{name: row[name] for name in columns} for row in batch], schema=schema)
        fs, path = _filesystem(f"{url_prefix}-{index:05d}.parquet")
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        with fs.open(path, "wb") as handle:
            pq.write_table(table, handle)
        yield len(batch)

    return write


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _publish_data(fs, tmp: str, final: str, local: bool) -> None:
    """Puts the fully written folder `tmp` at `final`: `publish_folder` (synced, one rename) on a local disk; on a
    remote filesystem, where a folder cannot be renamed atomically, the earlier folder is removed only now that the
    new one is complete, then the new one is moved in."""
    if local:
        publish_folder(tmp, final)
        return
    if fs.exists(final):
        fs.rm(final, recursive=True)
    fs.mv(tmp, final, recursive=True)


def _read_parquet(url: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    fs, path = _filesystem(url)
    with fs.open(path, "rb") as handle:
        yield from pq.read_table(handle).to_pylist()


def _part_name(part: int) -> str:
    return f"part-{part:05d}"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _distribution_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _model_versions(config: CurationConfig) -> dict:
    """What the stages read besides the pages and the configuration, by content: the vocabulary, the relevance and
    natural-photo models (given or packaged), plug-in scorers' modules, and the package. A part finished with other
    ones is redone, although its configuration reads the same (a model retrained at the same path)."""
    from importlib import resources

    def packaged(name: str) -> str:
        return _digest((resources.files(__package__) / "weights" / name).read_bytes())

    def user_file(path: str) -> str:
        return _digest(Path(path).read_bytes())

    def plugin(spec: str) -> str:
        module = importlib.import_module(spec.partition(":")[0])
        path = getattr(module, "__file__", None)
        return user_file(path) if path else spec

    images, text, relevance = config.images, config.text, config.relevance
    versions = {
        "imagebert_hf": _distribution_version("imagebert_hf"),
        "text.vocabulary": (
            f"wordfreq {_distribution_version('wordfreq')}"
            if text.vocabulary == "wordfreq"
            else user_file(text.vocabulary)
        ),
        "relevance.relevance_model_path": (
            packaged("relevance.json")
            if relevance.relevance_model_path is None
            else user_file(relevance.relevance_model_path)
        ),
    }
    if images.natural_classifier == "default":
        versions["images.natural_model_path"] = (
            packaged("natural_photo.json")
            if images.natural_model_path is None
            else user_file(images.natural_model_path)
        )
    elif images.natural_classifier != "none":
        versions["images.natural_classifier"] = plugin(images.natural_classifier)
    if images.nsfw_detector == "nudenet":
        versions["images.nsfw_detector"] = f"nudenet {_distribution_version('nudenet')}"
    elif images.nsfw_detector != "none":
        versions["images.nsfw_detector"] = plugin(images.nsfw_detector)
    return versions


def _aggregation_key(record: dict) -> dict:
    """The small key record of a pair that the aggregation groups."""
    return {
        "pair_id": record["pair_id"],
        "image_hash": record["image_hash"],
        "text_key": text_key(record["text"]),
        "relevance_score": record["relevance_score"],
    }


def _lower_ranked(a: tuple, b: tuple) -> tuple:
    """Of two `(rank, key, count)` of one pair_id: the lower-ranked key, and both counts."""
    rank, key, _ = min(a, b, key=lambda item: item[0])
    return rank, key, a[2] + b[2]


def _source_version(path: str) -> list[str] | None:
    """The version of an input file (`input_version`); None when it cannot be read now, which its scan counts."""
    try:
        return [str(mark) for mark in input_version(path)]
    except OSError:
        return None


def _page_images(path: str, config: ParseConfig) -> list | None:
    """The images a saved page may read from files next to it (`resolver_for`): `[src, file, version...]` of each
    `<img>` the parse stage looks at, `[src]` alone when no file is there now. Its part's plan holds them, for the
    page's own version does not change when an image is rewritten beside it. None for a page that cannot be read
    or parsed (its parse counts why)."""
    from resiliparse.parse.html import HTMLTree

    try:
        with open_input(path) as handle:
            html = handle.read(config.max_page_bytes + 1)
        if len(html) > config.max_page_bytes:
            return []  # skipped unread by the scan
        tree = HTMLTree.parse(decode_html(html, None))
        nodes = tree.body.query_selector_all("img") if tree.body is not None else []
        resolver = resolver_for(path, config.max_resyncs_per_file)
        found = []
        for index in range(min(len(nodes), config.max_images_per_page)):
            src = _image_src(nodes[index])
            if src:
                found.append([src, *(resolver.image_version(src) or [])])
        return found
    except Exception:  # the plan records it as unreadable; the part's parse counts the page
        return None


def _images_plan(sc, sources: list[dict], config: ParseConfig, num_partitions: int) -> list:
    """`[page, _page_images(page)]` of the part's saved pages, read by the executors (which reach the inputs)."""
    pages = [source["path"] for source in sources if source["kind"] == "html"]
    if not pages:
        return []
    rdd = sc.parallelize(pages, max(1, min(len(pages), num_partitions)))
    return rdd.map(lambda page: [page, _page_images(page, config)]).collect()


def _run_part(sc, sources: list[dict], part_url: str, config, num_partitions: int, batch_size: int) -> Tally:
    """Scans and runs the stages on one part's sources; executors write its records; returns its tally."""
    from pyspark import StorageLevel

    rdd = sc.parallelize(sources, max(1, min(len(sources), num_partitions)))
    rdd = rdd.mapPartitions(lambda it: scan_sources(it, config))
    # Pages of one WARC would otherwise all sit in one partition; spread them before the costly stages.
    rdd = rdd.repartition(num_partitions)
    for stage in STAGES:
        rdd = rdd.mapPartitions(lambda it, stage=stage: _stage_partition(it, stage, config, batch_size))
    rdd = rdd.persist(StorageLevel.MEMORY_AND_DISK)
    tally = _merge_tallies(rdd)
    rdd.filter(lambda r: r[TALLY] is None).mapPartitionsWithIndex(
        _write_parquet(f"{part_url}/records", OUTPUT_COLUMNS)
    ).sum()
    rdd.unpersist()
    return tally


def run_spark(
    inputs: list[str | Path],
    output_dir: str | Path,
    config: CurationConfig | None = None,
    spark=None,
    num_partitions: int | None = None,
    batch_size: int = 32,
    sources_per_part: int = 64,
    load_result: bool = True,
    require_pages: bool = False,
    spark_master: str | None = None,
    output_flag: str = "output_dir",
) -> CurationResult:
    """Curates WARC files and HTML folders with Spark; same output as `run_local` on the same input.

    The input files are cut into parts of `sources_per_part`; each part is scanned, parsed, filtered and scored
    on the executors, which write its records to `output_dir/parts/part-N/`, and is marked done (`_SUCCESS`) with
    its tally. A rerun skips a finished part when its input files are unchanged (size and modification time, or the
    store's version), and so are the image files its saved pages reference, the configuration, the model and
    vocabulary files it names and the package version; otherwise the part is redone. Deduplication by text and by
    image then runs over all parts' records, and the executors write the curated pairs to `output_dir/data/`, one
    row per kept `pair_id`.

    Args:
        inputs: WARC files, saved HTML pages, folders holding either, or glob patterns: local paths or any fsspec
            URL, readable from every executor.
        output_dir: A local folder or an fsspec URL: `data/*.parquet` (pair_id order), `funnel.{json,md,png}`,
            `config.json`, and `parts/` (what a rerun reuses; delete it to start over).
        config: Stage configuration; defaults everywhere when omitted.
        spark: A SparkSession; the active one (e.g. from spark-submit) or a new local one when omitted.
        num_partitions: Partitions for the page records; twice the default parallelism when omitted.
        batch_size: Records per batch handed to a stage function.
        sources_per_part: Input files per part (the unit of resumption).
        load_result: Read the curated pairs into the driver's memory as a `datasets.Dataset` for the result (no
            copy is written anywhere); False: `dataset` is None, for outputs too large for the driver.
        require_pages: Raise `NoPagesError` (a ValueError), leaving `data/` and the report files as they were, when
            no input yields a single page, rather than write an empty result.
        spark_master: The master URL of the local session started when `spark` is omitted and none is active
            (`local[2]` when None); it starts only once every argument has been checked.
        output_flag: How refusals of `output_dir` name it (`imagebert-curate` passes `--output_dir`).

    Returns:
        The curated dataset (sorted by `pair_id`) unless `load_result` is False, the counts, and the output folder.
    """
    from pyspark import StorageLevel

    config = config or CurationConfig()
    # Everything is checked and the inputs found before a session starts or the output folder is touched.
    for name, value in (("batch_size", batch_size), ("sources_per_part", sources_per_part)):
        _check_positive(name, value)
    if num_partitions is not None:
        _check_positive("num_partitions", num_partitions)
    check_stage_inputs(config)
    sources = check_run_paths(inputs, output_dir, output_flag)
    output_url = str(output_dir).rstrip("/") or str(output_dir)
    fs, root = _filesystem(output_url)
    settings = json.dumps(config.to_dict(), sort_keys=True, default=str)
    versions = _model_versions(config)
    if spark is None:
        from pyspark.sql import SparkSession

        spark = SparkSession.getActiveSession() or local_spark_session(spark_master or "local[2]")
    sc = spark.sparkContext
    partitions = num_partitions or 2 * sc.defaultParallelism
    fs.makedirs(root, exist_ok=True)
    # The unpublished data folder lives in the runner's own `parts/`: a killed run's is removed by its name there,
    # and nothing else of the output folder.
    for stale in fs.glob(f"{root}/parts/{DATA_TMP_PREFIX}*"):
        fs.rm(stale, recursive=True)

    tally = Tally()
    parts = [sources[i : i + sources_per_part] for i in range(0, len(sources), sources_per_part)]
    for index, part_sources in enumerate(parts):
        part_url = f"{output_url}/parts/{_part_name(index)}"
        part_path = f"{root}/parts/{_part_name(index)}"
        # A part is reused only for the same files, unchanged since (size and modification time, or the store's
        # version), the same images beside its saved pages, the same configuration and the same models.
        sources_plan = [[s["path"], _source_version(s["path"])] for s in part_sources]
        images_plan = _images_plan(sc, part_sources, config.parse, partitions)
        plan = {"sources": sources_plan, "images": images_plan, "config": settings, "versions": versions}
        done = f"{part_path}/_SUCCESS"
        if fs.exists(done) and json.loads(fs.cat(done))["plan"] == plan:
            tally.update(Tally.from_json(json.loads(fs.cat(done))["tally"]))
            logger.info("part %d of %d already done; skipping it", index + 1, len(parts))
            continue
        if fs.exists(part_path):
            fs.rm(part_path, recursive=True)
        part_tally = _run_part(sc, part_sources, part_url, config, partitions, batch_size)
        # Written last (atomically on a local disk; one object on a store): a part without it is redone.
        marker = json.dumps({"plan": plan, "tally": part_tally.to_json()})
        if _is_local(output_url):
            atomic_write_text(done, marker)
        else:
            fs.pipe(done, marker.encode())
        tally.update(part_tally)

    if require_pages:
        check_pages_read(tally, output_url)
    record_files = sorted(
        f"{output_url}/parts/{_part_name(i)}/{Path(f).name}"
        for i in range(len(parts))
        for f in fs.glob(f"{root}/parts/{_part_name(i)}/records-*.parquet")
    )
    records = sc.parallelize(record_files, max(1, min(len(record_files), partitions))).flatMap(_read_parquet)
    records = records.persist(StorageLevel.MEMORY_AND_DISK)
    # One key per pair_id goes on to the aggregation (the lowest `duplicate_rank`, as in the local runner); the other
    # records of that pair_id are counted as duplicates.
    by_pair = (
        records.map(lambda r: (r["pair_id"], (duplicate_rank(r), _aggregation_key(r), 1)))
        .reduceByKey(_lower_ranked)
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    count_duplicate_pairs(tally, by_pair.map(lambda kv: kv[1][2] - 1).sum())
    by_text = (
        by_pair.map(lambda kv: (kv[1][1]["text_key"], kv[1][1]))
        .groupByKey()
        .map(lambda kv: aggregate_text_group(list(kv[1]), config.aggregation))
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    by_image = (
        by_text.flatMap(lambda kept_tally: kept_tally[0])
        .map(lambda row: (row["image_hash"], row))
        .groupByKey()
        .map(lambda kv: aggregate_image_group(list(kv[1])))
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    tally.update(_merge_tallies(by_text.map(lambda kt: {TALLY: kt[1].to_json()})))
    tally.update(_merge_tallies(by_image.map(lambda kt: {TALLY: kt[1].to_json()})))
    kept = by_image.flatMap(lambda kt: [(row["pair_id"], None) for row in kt[0]])
    final = (
        records.map(lambda r: (r["pair_id"], r))
        .join(kept)
        .mapValues(lambda pair: pair[0])
        .reduceByKey(lambda a, b: min(a, b, key=duplicate_rank))
        .values()
        .sortBy(lambda r: r["pair_id"])
    )
    # The executors write the new `data/` under a temporary name; it replaces the earlier one only once complete.
    # The report is rendered first and put beside it after: a run that fails changes nothing of an earlier output.
    tmp_name = f"parts/{DATA_TMP_PREFIX}{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as report_dir:
        finalize_report(tally, Path(report_dir), config)
        try:
            final.mapPartitionsWithIndex(_write_parquet(f"{output_url}/{tmp_name}/part", OUTPUT_COLUMNS)).sum()
            fs.makedirs(f"{root}/{tmp_name}", exist_ok=True)  # an RDD without partitions writes no file
            _publish_data(fs, f"{root}/{tmp_name}", f"{root}/data", local=_is_local(output_url))
        except BaseException:
            if fs.exists(f"{root}/{tmp_name}"):
                fs.rm(f"{root}/{tmp_name}", recursive=True)
            raise
        if _is_local(output_url):
            publish_report(Path(report_dir), Path(root))
        else:
            for name in REPORT_FILES:
                fs.put(f"{report_dir}/{name}", f"{root}/{name}")  # one object each: a store shows all of it or none
    for cached in (records, by_pair, by_text, by_image):
        cached.unpersist()
    # Read into the driver's memory: no second copy of the output in the `datasets` cache.
    dataset = load_curated(output_url, keep_in_memory=True) if load_result else None
    return CurationResult(dataset=dataset, tally=tally, output_dir=Path(root))


__all__ = ["discover_inputs", "local_spark_session", "run_spark"]
