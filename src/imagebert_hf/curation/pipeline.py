"""The stage list, record schemas, and the local runner (`datasets` map with several processes).

Stages are pure functions `stage(batch, config) -> (kept_batch, tally)` over columns of records. Runners never
look inside them: they feed batches, and carry each batch's counts to the end as a "tally row" (a record whose
only non-null column is `_tally`). Tally rows pass through later stages untouched, so counting needs no shared
state between processes and works the same in `datasets` workers and Spark executors.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import math
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from transformers.utils import logging

from ..formats.files import atomic_write_bytes, atomic_write_text, check_output_dir, publish_folder
from .aggregation import aggregate
from .config import STAGE_CLASSES, CurationConfig, check_stage_config
from .image_filters import ADDED_COLUMNS, check_plugin, filter_images, get_natural_classifier
from .inputs import PAGE_COLUMNS, check_output_apart, discover_sources, is_url, scan_source
from .parse import IMAGE_COLUMNS, parse_pages
from .relevance import load_relevance_model, score_relevance
from .tally import INPUT, KEPT, Tally, write_funnel_report
from .text_cleaning import PAIR_COLUMNS, clean_texts, load_vocabulary, text_key


logger = logging.get_logger(__name__)

TALLY = "_tally"

# The local runner's work folder (`curation-work-*` in the output folder) holds this file, naming the unpublished
# data folder it writes: a rerun removes a killed run's folders by it, and nothing else of the output folder.
WORK_PREFIX = "curation-work-"
WORK_MARKER = ".imagebert-curate-work.json"
_DATA_TMP_NAME = re.compile(r"\.data\.tmp-\d+-[0-9a-f]{8}")
# What the runners write into `data/` (local: part-00000-of-00004.parquet; Spark: part-00000.parquet).
_OWN_DATA_FILE = re.compile(r"part-\d{5}(-of-\d{5})?\.parquet")
# The report beside `data/`, in the order it is published: `funnel.json`, which reruns and `load_funnel` read, last.
REPORT_FILES = ("config.json", "funnel.png", "funnel.md", "funnel.json")

# Column types, shared by the local runner (datasets Features) and the Spark runner (its own StructType).
COLUMN_TYPES: dict[str, str] = {
    "page_id": "string",
    "page_url": "string",
    "source": "string",
    "html": "binary",
    "charset": "string",
    "image_id": "string",
    "image_url": "string",
    "image": "binary",
    "dom_score": "float64",
    "language_rank": "float64",
    "texts": "list<string>",
    "text_sources": "list<string>",
    "image_hash": "string",
    "width": "int64",
    "height": "int64",
    "nsfw_score": "float64",
    "natural_score": "float64",
    "image_stats": "list<float32>",
    "pair_id": "string",
    "text": "string",
    "text_source": "string",
    "rare_word_ratio": "float64",
    "relevance_score": "float64",
    TALLY: "string",
}

FILTERED_COLUMNS = (*IMAGE_COLUMNS, *ADDED_COLUMNS)
SCORED_COLUMNS = (*PAIR_COLUMNS, "relevance_score")
OUTPUT_COLUMNS = (
    "pair_id",
    "image",
    "text",
    "image_url",
    "page_url",
    "source",
    "text_source",
    "image_hash",
    "width",
    "height",
    "dom_score",
    "language_rank",
    "natural_score",
    "nsfw_score",
    "rare_word_ratio",
    "relevance_score",
)


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable
    config_attr: str
    columns: tuple[str, ...]


STAGES = (
    Stage("parse", parse_pages, "parse", IMAGE_COLUMNS),
    Stage("images", filter_images, "images", FILTERED_COLUMNS),
    Stage("text", clean_texts, "text", PAIR_COLUMNS),
    Stage("relevance", score_relevance, "relevance", SCORED_COLUMNS),
)


def features_for(columns: tuple[str, ...], with_tally: bool = True):
    """`datasets.Features` of a record schema, plus the tally column unless `with_tally` is False."""
    from datasets import Features, List, Value

    def feature(kind: str):
        if kind.startswith("list<"):
            return List(Value(kind[5:-1]))
        return Value(kind)

    names = (*columns, TALLY) if with_tally else columns
    return Features({name: feature(COLUMN_TYPES[name]) for name in names})


def tally_row(columns: tuple[str, ...], tally: Tally) -> dict:
    row = dict.fromkeys(columns)
    row[TALLY] = tally.to_json()
    return row


def apply_stage(batch: dict[str, list], stage: Stage, config: CurationConfig) -> dict[str, list]:
    """Runs one stage on a batch that may hold tally rows; returns its records, the tally rows and one new tally."""
    tallies = batch.get(TALLY) or [None] * len(next(iter(batch.values())))
    data_idx = [i for i, t in enumerate(tallies) if t is None]
    data = {k: [v[i] for i in data_idx] for k, v in batch.items() if k != TALLY}
    out, tally = stage.fn(data, getattr(config, stage.config_attr))
    n_out = len(out[stage.columns[0]])
    passed = [t for t in tallies if t is not None]
    result = {name: list(out[name]) + [None] * (len(passed) + 1) for name in stage.columns}
    result[TALLY] = [None] * n_out + passed + [tally.to_json()]
    return result


def scan_sources(sources: Iterable[dict], config: CurationConfig) -> Iterator[dict]:
    """Page rows of every source, then one tally row per source; shared by the local and the Spark runner."""
    for source in sources:
        tally = Tally()
        try:
            for row in scan_source(source, config.parse, tally):
                yield {**row, TALLY: None}
        except Exception as err:  # a file that cannot be opened at all is counted, not fatal
            logger.warning("could not read %s: %r", source.get("path"), err)
            tally.drop("read", "file", "unreadable_file")
        yield tally_row(PAGE_COLUMNS, tally)


@dataclass
class CurationResult:
    """What a run produced: the curated dataset, its counts, and where both were written."""

    dataset: object
    tally: Tally
    output_dir: Path


def _write_parquet_shards(dataset, data_dir: Path, rows_per_shard: int, tmp: Path) -> None:
    """Writes the shards into the temporary folder `tmp` next to `data_dir`, then publishes it in one rename: a run
    that fails or is killed leaves the previous run's `data/` as it was."""
    tmp.mkdir()
    try:
        n_shards = max(1, math.ceil(len(dataset) / rows_per_shard))
        for index in range(n_shards):
            shard = dataset.shard(n_shards, index, contiguous=True)
            shard.to_parquet(str(tmp / f"part-{index:05d}-of-{n_shards:05d}.parquet"))
        publish_folder(tmp, data_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_curated(output_dir: str | Path, cache_dir: str | None = None, keep_in_memory: bool = False):
    """Loads the curated pairs written by either runner as a `datasets.Dataset`, in `pair_id` order.

    Args:
        output_dir: The run's output folder: a local path or an fsspec URL.
        cache_dir: Where `datasets` writes the Arrow copy it memory-maps; its cache when omitted.
        keep_in_memory: Read the shards into memory instead, writing no copy anywhere (for results that fit in
            memory).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from fsspec.core import url_to_fs

    output_dir = str(output_dir).removeprefix("file://")
    fs, root = url_to_fs(output_dir)
    paths = sorted(fs.glob(f"{root.rstrip('/')}/data/*.parquet"))

    def metadata(path: str):
        with fs.open(path, "rb") as handle:
            return pq.read_metadata(handle)

    # A run that kept nothing writes one empty shard, which `datasets` cannot read back.
    if sum(metadata(path).num_rows for path in paths) == 0:
        empty = {name: [] for name in OUTPUT_COLUMNS}
        return Dataset.from_dict(empty, features=features_for(OUTPUT_COLUMNS, with_tally=False))
    if keep_in_memory:
        tables = []
        for path in paths:
            with fs.open(path, "rb") as handle:
                tables.append(pq.read_table(handle))
        return Dataset(InMemoryTable(pa.concat_tables(tables)))
    files = [f"{output_dir.rstrip('/')}/data/{posixpath.basename(path)}" for path in paths]
    return Dataset.from_parquet(files, cache_dir=cache_dir)


class NoPagesError(ValueError):
    """No input yielded a single page: every file was unreadable, not a WARC, or held no HTML response. `tally`
    holds the counts."""

    def __init__(self, message: str, tally: Tally):
        super().__init__(message)
        self.tally = tally


def check_pages_read(tally: Tally, output_dir) -> None:
    """Raises `NoPagesError` with the read stage's counts by reason when no page was read at all."""
    if tally.get_count("read", "record", KEPT):
        return
    reasons = [
        f"{row['unit']}/{row['reason']}: {row['count']}"
        for row in tally.rows()
        if row["stage"] == "read" and row["reason"] not in (INPUT, KEPT)
    ]
    raise NoPagesError(
        f"no input yielded a single page to curate (read: {', '.join(reasons) or 'nothing'}); no data or report "
        f"was written to {output_dir}.",
        tally,
    )


def check_data_replaceable(fs, data_path: str, flag: str = "output_dir") -> None:
    """A run replaces its output folder's `data/` as a whole: raises ValueError naming `flag` when `data/` holds
    anything the runners did not write (a user's own `data/` folder), or is a file."""
    if not fs.exists(data_path):
        return
    if not fs.isdir(data_path):
        raise ValueError(f"{flag}: {data_path} is a file; a run writes its pairs to a data/ folder there.")
    foreign = sorted(
        entry["name"].rstrip("/").rsplit("/", 1)[-1]
        for entry in fs.ls(data_path, detail=True)
        if entry["type"] != "file" or not _OWN_DATA_FILE.fullmatch(entry["name"].rstrip("/").rsplit("/", 1)[-1])
    )
    if foreign:
        raise ValueError(
            f"{flag}: {data_path} holds {foreign[0]!r}"
            + (f" and {len(foreign) - 1} more entries" if len(foreign) > 1 else "")
            + " that no curation run wrote; a run replaces data/ as a whole, so choose another "
            f"{flag} or move that folder away."
        )


def check_run_paths(inputs: list[str | Path], output_dir: str | Path, flag: str = "output_dir") -> list[dict]:
    """The sources of `inputs` (`discover_sources`), once the output folder is known to be usable: named, not a file,
    apart from every input, without a `data/` of someone else's (a run replaces its `data/`). Both runners call it
    before anything is read or written; errors name the output folder as `flag` (the command's `--output_dir`)."""
    from fsspec.core import url_to_fs

    # An empty path is the current folder to the OS: the run would write, and replace data/, there.
    if output_dir is None or not str(output_dir).strip():
        check_output_dir(output_dir, flag)  # raises, naming `flag`
    fs, root = url_to_fs(str(output_dir))
    if fs.exists(root) and not fs.isdir(root):
        raise NotADirectoryError(f"{flag} {output_dir} exists and is not a folder.")
    # Every input is found before the output folder is touched: a missing input leaves an earlier run's output intact.
    sources = [source.to_dict() for source in discover_sources(inputs)]
    check_output_apart(inputs, output_dir, flag)
    check_data_replaceable(fs, f"{root.rstrip('/')}/data", flag)
    return sources


def _remove_stale_work(output_dir: Path) -> None:
    """Removes what a killed local run left in `output_dir`: its marked work folder and the data folder it names."""
    for work in output_dir.glob(f"{WORK_PREFIX}*"):
        marker = work / WORK_MARKER
        if work.is_symlink() or not marker.is_file():
            continue
        try:
            recorded = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(recorded, dict) or recorded.get("tool") != "imagebert-curate":
            continue
        data_tmp = recorded.get("data_tmp")
        if isinstance(data_tmp, str) and _DATA_TMP_NAME.fullmatch(data_tmp):
            stale = output_dir / data_tmp
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def duplicate_rank(row: dict) -> tuple:
    """Which of several records of one `pair_id` is kept (the lowest), by content: both runners keep the same one
    whatever order their workers produce them in."""
    return (-row["relevance_score"], row["source"] or "", row["page_url"] or "", row["image_url"] or "")


def count_duplicate_pairs(tally: Tally, duplicates: int) -> None:
    """The records of a `pair_id` other than the one kept (`duplicate_rank`) are counted in and dropped by the
    aggregation (`duplicate_pair_id`): the output holds one row per kept `pair_id`, so the funnel's kept count is its
    number of rows."""
    tally.add("aggregation", "pair", INPUT, duplicates)
    tally.drop("aggregation", "pair", "duplicate_pair_id", duplicates)


def finalize_report(tally: Tally, output_dir: Path, config: CurationConfig) -> None:
    """Writes `config.json` and the funnel report (`REPORT_FILES`) into `output_dir`, each file atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "config.json", json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    write_funnel_report(tally, output_dir)


def publish_report(staged: Path, output_dir: Path) -> None:
    """Moves the report files `finalize_report` wrote into `staged` to `output_dir`, one rename each (a copy written
    atomically from another filesystem), `funnel.json` last: the runners render the report before they publish
    `data/`, so a report that cannot be written leaves an earlier run's output as it was."""
    for name in REPORT_FILES:
        try:
            os.replace(staged / name, output_dir / name)
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
            atomic_write_bytes(output_dir / name, (staged / name).read_bytes())


def check_run_settings(num_proc, batch_size, rows_per_shard) -> None:
    """The runner's counts must be positive integers (checked before anything is read or written)."""
    for name, value in (("num_proc", num_proc), ("batch_size", batch_size), ("rows_per_shard", rows_per_shard)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_config(config: CurationConfig) -> None:
    """Checks every section of `config` again, as its constructor did: a field set after the configuration was built
    (`config.images.min_side = 400`) is checked by nothing else, and a bad one would be counted as a drop reason for
    every record of an otherwise successful run. Errors name the field (`images.min_side`)."""
    if not isinstance(config, CurationConfig):
        raise TypeError(f"config must be a CurationConfig, got {type(config).__name__}.")
    for name, cls in STAGE_CLASSES.items():
        section = getattr(config, name)
        if not isinstance(section, cls):
            raise TypeError(f"{name} must be a {cls.__name__}, got {section!r} ({type(section).__name__}).")
        check_stage_config(section)


def check_stage_inputs(config: CurationConfig) -> None:
    """Checks every field of `config` (`check_config`), then what the stages read besides the pages, before a runner
    touches its output folder: the languages against those the detector can return, the vocabulary, the model
    files, and that plug-in scorers' classes take no argument and have a `score` method. Inside the stages a failure would be counted as
    a dropped record (every record), or would end the run only once every page is parsed. Errors name the field
    (`text.vocabulary`, the flag without `--`)."""
    from resiliparse.parse.lang import supported_langs

    check_config(config)

    # `unknown` is what the detector returns for a page it cannot place.
    known = [*supported_langs(), "unknown"]
    unknown = sorted(set(config.parse.languages) - set(known))
    if unknown:
        raise ValueError(
            f"parse.languages must be codes of resiliparse's language detector, got {config.parse.languages!r} "
            f"(unknown: {unknown}); known codes: {', '.join(known)}."
        )
    images = config.images
    checks = [
        ("text.vocabulary", lambda: load_vocabulary(config.text.vocabulary, config.text.vocabulary_size)),
        ("relevance.relevance_model_path", lambda: load_relevance_model(config.relevance.relevance_model_path)),
    ]
    if images.natural_classifier == "default":
        checks.append(
            ("images.natural_model_path", lambda: get_natural_classifier("default", images.natural_model_path))
        )
    elif images.natural_classifier != "none":
        checks.append(("images.natural_classifier", lambda: check_plugin(images.natural_classifier)))
    if images.nsfw_detector == "nudenet":
        # A missing extra raises ModuleNotFoundError, which the scripts turn into the extras to install.
        checks.append(("images.nsfw_detector", lambda: importlib.import_module("nudenet")))
    elif images.nsfw_detector != "none":
        checks.append(("images.nsfw_detector", lambda: check_plugin(images.nsfw_detector)))
    for name, check in checks:
        try:
            check()
        except OSError as error:
            raise type(error)(f"{name}: {error}") from None
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None


def run_local(
    inputs: list[str | Path],
    output_dir: str | Path,
    config: CurationConfig | None = None,
    num_proc: int = 1,
    batch_size: int = 32,
    rows_per_shard: int = 2000,
    require_pages: bool = False,
    load_result: bool = True,
    output_flag: str = "output_dir",
) -> CurationResult:
    """Curates WARC files and HTML folders on one machine with `datasets`.

    Args:
        inputs: WARC files, saved HTML pages, folders holding either, or glob patterns: local paths or any fsspec
            URL (`s3://`, `hdfs://`, `memory://`, ...), read through fsspec.
        output_dir: The local folder where `data/*.parquet`, `funnel.{json,md,png}` and `config.json` are written.
        config: Stage configuration; defaults everywhere when omitted.
        num_proc: Worker processes for reading and for every stage.
        batch_size: Records per batch handed to a stage function.
        rows_per_shard: Rows per output parquet shard.
        require_pages: Raise `NoPagesError` (a ValueError), writing nothing, when no input yields a single page,
            rather than write an empty result and its funnel.
        load_result: Read the curated pairs back into memory as a `datasets.Dataset` for the result (no copy is
            written anywhere); False: `dataset` is None, for outputs larger than memory (`load_curated` memory-maps
            them later, through the `datasets` cache).
        output_flag: How refusals of `output_dir` name it (`imagebert-curate` passes `--output_dir`).

    Returns:
        The curated dataset (sorted by `pair_id`) unless `load_result` is False, the counts, and the output folder.

    Raises:
        TypeError, ValueError: a field of `config` is of the wrong type or out of range, including one set after the
            configuration was built (checked before anything is read or written).
        ValueError: `output_dir` is empty, is an input, lies inside one or contains one, or its `data/` holds files
            no run wrote (checked before anything is read or written).
    """
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    config = config or CurationConfig()
    check_run_settings(num_proc, batch_size, rows_per_shard)
    check_stage_inputs(config)
    output_dir = str(output_dir).removeprefix("file://")
    if is_url(output_dir):
        raise ValueError(
            f"the local runner writes to a local folder, got {output_flag}={str(output_dir)!r}; write to an fsspec "
            "URL with the Spark runner (run_spark, --runner spark), or copy the folder afterwards."
        )
    sources = check_run_paths(inputs, output_dir, output_flag)
    output_dir = Path(output_dir).expanduser()
    # The previous `data/` is replaced only once the new one is complete (one rename).
    created = [folder for folder in (output_dir, *output_dir.parents) if not folder.exists()]
    output_dir.mkdir(parents=True, exist_ok=True)
    # One local run per output folder: a work folder found here was left by a killed run.
    _remove_stale_work(output_dir)
    work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=output_dir))
    data_tmp = output_dir / f".data.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        atomic_write_text(work / WORK_MARKER, json.dumps({"tool": "imagebert-curate", "data_tmp": data_tmp.name}))
        ds = Dataset.from_generator(
            scan_sources,
            features=features_for(PAGE_COLUMNS),
            gen_kwargs={"sources": sources, "config": config},
            num_proc=max(1, min(num_proc, len(sources))) if len(sources) > 1 else None,
            cache_dir=str(work),
        )
        for stage in STAGES:
            ds = ds.map(
                apply_stage,
                batched=True,
                batch_size=batch_size,
                fn_kwargs={"stage": stage, "config": config},
                remove_columns=ds.column_names,
                features=features_for(stage.columns),
                num_proc=num_proc if num_proc > 1 and len(ds) > 1 else None,
                load_from_cache_file=False,
                desc=f"curation: {stage.name}",
            )

        key_columns = ["pair_id", "image_hash", "text", "relevance_score", "source", "page_url", "image_url"]
        keys = ds.select_columns([*key_columns, TALLY])
        tally = Tally()
        # Each pair_id's record (its row in `ds`, its rank) and key: one per pair_id goes on to the aggregation.
        chosen: dict[str, tuple[int, tuple, dict]] = {}
        index, records = 0, 0
        for batch in keys.iter(batch_size=10_000):
            for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
                if row[TALLY] is not None:
                    tally.update(Tally.from_json(row[TALLY]))
                else:
                    records += 1
                    rank = duplicate_rank(row)
                    if row["pair_id"] not in chosen or rank < chosen[row["pair_id"]][1]:
                        key = {
                            "pair_id": row["pair_id"],
                            "image_hash": row["image_hash"],
                            "text_key": text_key(row["text"]),
                            "relevance_score": row["relevance_score"],
                        }
                        chosen[row["pair_id"]] = (index, rank, key)
                index += 1
        if require_pages:
            check_pages_read(tally, output_dir)
        count_duplicate_pairs(tally, records - len(chosen))
        kept_ids, agg_tally = aggregate([key for _, _, key in chosen.values()], config.aggregation)
        tally.update(agg_tally)
        ds = ds.select(sorted(chosen[pid][0] for pid in kept_ids))
        ds = ds.select_columns(list(OUTPUT_COLUMNS)).sort("pair_id")
        # The report is rendered before `data/` is published and moved beside it after, by renames alone: a run
        # that fails (a full disk, a chart that cannot be drawn) changes nothing of an earlier output.
        report = work / "report"
        finalize_report(tally, report, config)
        _write_parquet_shards(ds, output_dir / "data", rows_per_shard, data_tmp)
        publish_report(report, output_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for folder in created:  # the folders this call created, when nothing was written into them
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    shutil.rmtree(work, ignore_errors=True)
    dataset = load_curated(output_dir, keep_in_memory=True) if load_result else None
    return CurationResult(dataset=dataset, tally=tally, output_dir=output_dir)


__all__ = [
    "CurationResult",
    "NoPagesError",
    "OUTPUT_COLUMNS",
    "STAGES",
    "Stage",
    "TALLY",
    "apply_stage",
    "check_config",
    "check_data_replaceable",
    "check_pages_read",
    "check_run_paths",
    "check_run_settings",
    "check_stage_inputs",
    "count_duplicate_pairs",
    "duplicate_rank",
    "features_for",
    "finalize_report",
    "load_curated",
    "publish_report",
    "run_local",
    "scan_sources",
]
