"""`imagebert-curate`: web pages (WARC files, saved HTML folders) -> image-text pairs and a funnel report.

    imagebert-curate --inputs crawl/*.warc.gz --output_dir outputs/lait --num_proc 4
    imagebert-curate --inputs crawl/ --output_dir outputs/lait --runner spark --spark_master local[8]
    spark-submit --master yarn "$(python -c 'import imagebert_hf.curation.cli as m; print(m.__file__)')" \
        --inputs /shared/crawl --output_dir /shared/lait --runner spark

Every stage option is a flag (see `--help`); `--config_file run.json` reads them from a JSON file written by an
earlier run (`config.json` in its output folder), and flags given as well override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field

from ..formats.files import read_json_file
from ..models.imagebert.script_errors import exit_on_error
from .config import STAGE_CLASSES, CurationConfig
from .tally import KEPT, funnel_markdown


@dataclass
class RunArguments:
    """Where to read, where to write, and how to run."""

    inputs: list[str] = field(
        metadata={"help": "WARC files (.warc, .warc.gz), saved HTML pages, or folders of them: paths or fsspec URLs."}
    )
    output_dir: str = field(metadata={"help": "Output folder: data/*.parquet, funnel.{json,md,png}, config.json."})
    runner: str = field(default="local", metadata={"help": "`local` (datasets, several processes) or `spark`."})
    num_proc: int = field(default=1, metadata={"help": "Local runner: worker processes."})
    batch_size: int = field(default=32, metadata={"help": "Records per batch handed to each stage function."})
    rows_per_shard: int = field(default=2000, metadata={"help": "Local runner: rows per output parquet shard."})
    spark_master: str | None = field(
        default=None,
        metadata={"help": "Spark runner: master URL for a new session (e.g. local[8]); unset under spark-submit."},
    )
    num_partitions: int | None = field(
        default=None, metadata={"help": "Spark runner: partitions of the page records."}
    )
    config_file: str | None = field(default=None, metadata={"help": "JSON stage configuration (a run's config.json)."})
    log_level: str = field(default="WARNING", metadata={"help": "Python logging level."})


def parse_args(argv: list[str] | None = None) -> tuple[RunArguments, CurationConfig]:
    """The run's arguments and the stage configuration: the flags, over the values of `--config_file` when it is
    given. Only the merged configuration is checked, so a flag may move a bound that the file's other value must
    respect (`--min_words 50` over a file with `max_words` 100)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((RunArguments, *STAGE_CLASSES.values()))
    parser.description = "LAIT-style curation of web pages into image-text pairs."
    argv = list(sys.argv[1:] if argv is None else argv)
    # Parsed into a namespace, not into the dataclasses: building them would check the flags against the defaults
    # of the other fields rather than against the file's values.
    values, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    values = vars(values)
    run = RunArguments(**{f.name: values[f.name] for f in dataclasses.fields(RunArguments)})
    sections = {name: {f.name: values[f.name] for f in dataclasses.fields(cls)} for name, cls in STAGE_CLASSES.items()}
    if not run.config_file:
        return run, CurationConfig(**{name: cls(**sections[name]) for name, cls in STAGE_CLASSES.items()})
    # The fields given on the command line, whatever the spelling argparse accepted (`--min-words`, `--no_*`, an
    # abbreviation): the destinations set when no default fills in the others.
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_known_args(argv)[0])
    flags = {
        name: {key: value for key, value in section.items() if key in given} for name, section in sections.items()
    }
    expected = "a JSON curation configuration (the config.json written by `CurationConfig.save`)"
    try:
        data = read_json_file(run.config_file, expected)
    except (OSError, ValueError) as error:
        raise type(error)(f"--config_file: {error}") from None
    if isinstance(data, dict):
        for name, section in flags.items():
            # A section that is not a mapping is left for `from_dict` to name.
            if section and isinstance(data.get(name, {}), dict):
                data[name] = {**data.get(name, {}), **section}
    try:
        config = CurationConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        with_flags = " with the flags given" if any(flags.values()) else ""
        raise type(error)(f"--config_file: {run.config_file}{with_flags}: {error}") from None
    return run, config


def check_inputs_given(run: RunArguments) -> None:
    """No `--inputs` is an empty string. The runners refuse one too, with a TypeError (a wrong value in Python), which
    here would end in a traceback; every other check of the paths is the runners' own (`check_run_paths`)."""
    empty = [index for index, item in enumerate(run.inputs) if not item]
    if empty:
        raise ValueError(
            f"--inputs: input {empty[0] + 1} of {len(run.inputs)} is an empty string; expected WARC files, HTML "
            "pages, folders or glob patterns (paths or URLs)."
        )


def main(argv: list[str] | None = None) -> int:
    """Runs `imagebert-curate`; returns 0 on success. A bad input (a missing file, a value the stages reject, an
    output folder among the inputs, inputs that yield not a single page) ends the command with one line naming it
    and exit status 1, leaving an earlier run's output as it was."""
    program = "imagebert-curate"
    missing_extra = (
        "the curation stages and the spark runner need the extras: pip install -e '.[curation,spark]' in the "
        "project's checkout"
    )
    # The configuration's checks raise TypeError for a value of the wrong type (from --config_file); once the run
    # has started, a TypeError is a bug and keeps its traceback.
    with exit_on_error(program, errors=(OSError, TypeError, ValueError), missing_extra=missing_extra):
        run, config = parse_args(argv)
    with exit_on_error(program, missing_extra=missing_extra):
        if run.runner not in ("local", "spark"):
            raise ValueError(f"--runner must be local or spark, got {run.runner!r}")
        check_inputs_given(run)
        logging.basicConfig(level=run.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # What both runners take alike: the pairs are counted, not loaded; a run that reads no page is an error.
        shared = {
            "batch_size": run.batch_size,
            "require_pages": True,
            "load_result": False,
            "output_flag": "--output_dir",
        }
        if run.runner == "local":
            from .pipeline import run_local

            result = run_local(
                run.inputs, run.output_dir, config, num_proc=run.num_proc, rows_per_shard=run.rows_per_shard, **shared
            )
        else:
            from .spark import run_spark

            # The runner starts the session once it has checked every argument.
            result = run_spark(
                run.inputs,
                run.output_dir,
                config,
                num_partitions=run.num_partitions,
                spark_master=run.spark_master,
                **shared,
            )
    # Counted, not loaded: the funnel's kept pairs are the rows written.
    pairs = result.tally.get_count("aggregation", "pair", KEPT)
    summary = {"pairs": pairs, "output_dir": str(result.output_dir), "drops": result.tally.drops()}
    print(json.dumps(summary, indent=2, sort_keys=True))
    print(funnel_markdown(result.tally))
    return 0


__all__ = ["RunArguments", "check_inputs_given", "main", "parse_args"]


if __name__ == "__main__":
    sys.exit(main())
