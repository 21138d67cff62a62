"""The Spark runner: the same stage functions as the local runner, over RDD partitions.

Works with a local-mode session (tests, one machine) and on a cluster through `spark-submit`. Input files must be
readable at the same path from every executor (a shared or network file system), because image bytes are read
from the WARC by offset where the page is parsed. The package must be installed on the executors (or shipped
with `--py-files`).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from transformers.utils import logging

from .aggregation import aggregate_image_group, aggregate_text_group
from .config import CurationConfig
from .pipeline import (
    COLUMN_TYPES,
    OUTPUT_COLUMNS,
    STAGES,
    TALLY,
    CurationResult,
    Stage,
    apply_stage,
    finalize_report,
    load_curated,
    scan_sources,
)
from .sources import discover_sources
from .tally import Tally
from .text_cleaning import text_key


logger = logging.get_logger(__name__)


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


def _spark_type(kind: str):
    from pyspark.sql import types as T

    simple = {
        "string": T.StringType(),
        "binary": T.BinaryType(),
        "float64": T.DoubleType(),
        "float32": T.FloatType(),
        "int64": T.LongType(),
    }
    if kind.startswith("list<"):
        return T.ArrayType(simple[kind[5:-1]])
    return simple[kind]


def output_schema():
    from pyspark.sql import types as T

    return T.StructType([T.StructField(name, _spark_type(COLUMN_TYPES[name])) for name in OUTPUT_COLUMNS])


def run_spark(
    inputs: list[str | Path],
    output_dir: str | Path,
    config: CurationConfig | None = None,
    spark=None,
    num_partitions: int | None = None,
    batch_size: int = 32,
) -> CurationResult:
    """Curates WARC files and HTML folders with Spark; same output as `run_local` on the same input.

    Args:
        inputs: WARC files, saved HTML pages, or folders holding either (readable from every executor).
        output_dir: Where `data/*.parquet`, `funnel.{json,md,png}` and `config.json` are written (driver side).
        config: Stage configuration; defaults everywhere when omitted.
        spark: A SparkSession; the active one (e.g. from spark-submit) or a new local one when omitted.
        num_partitions: Partitions for the page records; twice the default parallelism when omitted.
        batch_size: Records per batch handed to a stage function.

    Returns:
        The curated dataset (sorted by `pair_id`), the counts, and the output folder.
    """
    from pyspark import StorageLevel

    if spark is None:
        from pyspark.sql import SparkSession

        spark = SparkSession.getActiveSession() or local_spark_session()
    sc = spark.sparkContext
    config = config or CurationConfig()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if (output_dir / "data").exists():
        shutil.rmtree(output_dir / "data")
    sources = [s.to_dict() for s in discover_sources(inputs)]
    partitions = num_partitions or 2 * sc.defaultParallelism

    rdd = sc.parallelize(sources, max(1, min(len(sources), partitions)))
    rdd = rdd.mapPartitions(lambda it: scan_sources(it, config))
    # Pages of one WARC would otherwise all sit in one partition; spread them before the costly stages.
    rdd = rdd.repartition(partitions)
    for stage in STAGES:
        rdd = rdd.mapPartitions(lambda it, stage=stage: _stage_partition(it, stage, config, batch_size))
    rdd = rdd.persist(StorageLevel.MEMORY_AND_DISK)

    tally = Tally.merge(
        Tally.from_json(t) for t in rdd.filter(lambda r: r[TALLY] is not None).map(lambda r: r[TALLY]).collect()
    )
    records = rdd.filter(lambda r: r[TALLY] is None)
    keys = records.map(
        lambda r: (
            text_key(r["text"]),
            {"pair_id": r["pair_id"], "image_hash": r["image_hash"], "relevance_score": r["relevance_score"]},
        )
    )
    by_text = keys.groupByKey().map(
        lambda kv: aggregate_text_group([{**row, "text_key": kv[0]} for row in kv[1]], config.aggregation)
    )
    by_text = by_text.persist(StorageLevel.MEMORY_AND_DISK)
    by_image = (
        by_text.flatMap(lambda kept_tally: kept_tally[0])
        .map(lambda row: (row["image_hash"], row))
        .groupByKey()
        .map(lambda kv: aggregate_image_group(list(kv[1])))
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    tally.update(Tally.merge(by_text.map(lambda kt: kt[1]).collect()))
    tally.update(Tally.merge(by_image.map(lambda kt: kt[1]).collect()))
    kept = by_image.flatMap(lambda kt: [(row["pair_id"], None) for row in kt[0]])

    final = (
        records.map(lambda r: (r["pair_id"], r))
        .join(kept)
        .map(lambda kv: tuple(kv[1][0][name] for name in OUTPUT_COLUMNS))
        .sortBy(lambda row: row[0])
    )
    spark.createDataFrame(final, schema=output_schema()).write.mode("overwrite").parquet(str(output_dir / "data"))
    for leftover in (output_dir / "data").glob("*.crc"):
        leftover.unlink()
    for leftover in (output_dir / "data").glob(".*.crc"):
        leftover.unlink()
    finalize_report(tally, output_dir, config)
    for cached in (rdd, by_text, by_image):
        cached.unpersist()
    return CurationResult(dataset=load_curated(output_dir), tally=tally, output_dir=output_dir)
