"""Reruns and overlapping inputs of the curation runners: every input file is read once whatever the inputs overlap,
the output holds one row per kept `pair_id` (the funnel's kept count), a Spark part is redone when its input or a
model file changed, a configuration changed after it was built is checked again, `--config_file` yields to every
flag given, and a run keeps no copy of its output in the `datasets` cache."""

import json
import time
from pathlib import Path

import pytest

from imagebert_hf.curation import CurationConfig, Tally, run_local, synthetic
from imagebert_hf.curation.cli import main, parse_args
from imagebert_hf.curation.inputs import discover_sources, scan_source
from imagebert_hf.curation.tally import INPUT, KEPT, load_funnel

from .test_curation import photo_bytes
from .testing_utils import require_module


pytestmark = [require_module("fastwarc"), require_module("resiliparse"), require_module("warcio")]

CAPTION = "A television and a plant in the living room"


def _config() -> CurationConfig:
    config = CurationConfig()
    config.images.nsfw_detector = "none"
    config.images.natural_classifier = "none"
    config.relevance.relevance_threshold = 0.0
    config.parse.text_sources = ["alt"]
    return config


def _write_page(folder: Path, alt: str = CAPTION) -> Path:
    """A saved page and its photo under `folder/page_files/`."""
    (folder / "page_files").mkdir(parents=True, exist_ok=True)
    (folder / "page_files" / "photo.jpg").write_bytes(photo_bytes())
    page = synthetic.page_html("Home", "page_files/photo.jpg", alt=alt, paragraphs=synthetic.FILLER_PARAGRAPHS[:3])
    (folder / "page.html").write_text(page)
    return folder


def _site(tmp_path: Path) -> tuple[Path, Path]:
    site = tmp_path / "site"
    return site, _write_page(site / "sub")


def _assert_one_row_per_kept_pair(result) -> None:
    ids = result.dataset["pair_id"]
    assert len(ids) == len(set(ids)) == result.tally.get_count("aggregation", "pair", KEPT) > 0
    tally = result.tally
    assert tally.get_count("aggregation", "pair", INPUT) == tally.get_count("relevance", "pair", KEPT)


def _doubled(discover):
    """`discover_sources` naming every source twice: a page read twice gives records with the same `pair_id`."""

    def discover_twice(inputs):
        sources = discover(inputs)
        return [*sources, *sources]

    return discover_twice


# Overlapping inputs ------------------------------------------------------------------------------------------------


def test_overlapping_inputs_name_each_file_once(tmp_path):
    site, sub = _site(tmp_path)
    (sub / "crawl.warc.gz").write_bytes(b"")
    alone = [(s.kind, s.path, s.root) for s in discover_sources([site])]
    assert alone == [("warc", str(sub / "crawl.warc.gz"), ""), ("html", str(sub / "page.html"), str(site))]
    for inputs in ([site, sub], [sub, site], [f"{site}/**"], [sub / "page.html", site], [site, f"{site}/**/*.html"]):
        # The page keeps the outermost folder given as its root; the photo next to it is no WARC file.
        assert [(s.kind, s.path, s.root) for s in discover_sources(inputs)] == alone, inputs


def test_a_url_pattern_leaves_the_files_of_the_folders_it_matches_as_those_folders_do():
    import fsspec

    fs = fsspec.filesystem("memory")
    try:
        fs.pipe("/curation-overlap/site/sub/page.html", b"<html></html>")
        fs.pipe("/curation-overlap/site/sub/page_files/photo.jpg", b"jpeg")
        sources = discover_sources(["memory://curation-overlap/site/**"])
        assert [(s.kind, s.path) for s in sources] == [("html", "memory://curation-overlap/site/sub/page.html")]
        both = discover_sources(["memory://curation-overlap/site", "memory://curation-overlap/site/sub"])
        assert [(s.path, s.root) for s in both] == [
            ("memory://curation-overlap/site/sub/page.html", "memory://curation-overlap/site")
        ]
        # A file matched by name is still taken as a WARC, whatever it is named.
        assert [s.kind for s in discover_sources(["memory://curation-overlap/site/**/*.jpg"])] == ["warc"]
    finally:
        fs.rm("/curation-overlap", recursive=True)


def test_overlapping_inputs_give_one_row_per_pair(tmp_path):
    site, sub = _site(tmp_path)
    alone = run_local([site], tmp_path / "alone", _config())
    for name, inputs in (("folders", [site, sub]), ("pattern", [f"{site}/**"])):
        result = run_local(inputs, tmp_path / name, _config())
        _assert_one_row_per_kept_pair(result)
        assert result.dataset.to_list() == alone.dataset.to_list()
        assert result.tally == alone.tally


def test_a_page_read_twice_gives_one_row_per_pair_id(tmp_path, monkeypatch):
    import imagebert_hf.curation.pipeline as pipeline

    site, _ = _site(tmp_path)
    once = run_local([site], tmp_path / "once", _config())
    monkeypatch.setattr(pipeline, "discover_sources", _doubled(pipeline.discover_sources))
    twice = run_local([site], tmp_path / "twice", _config())
    _assert_one_row_per_kept_pair(twice)
    assert twice.dataset.to_list() == once.dataset.to_list()
    duplicates = twice.tally.get_count("aggregation", "pair", "duplicate_pair_id")
    assert duplicates == once.tally.get_count("relevance", "pair", KEPT) > 0
    assert load_funnel(tmp_path / "twice").get_count("aggregation", "pair", KEPT) == len(twice.dataset)


# Reading a damaged WARC --------------------------------------------------------------------------------------------


def test_a_corrupt_gzip_member_is_one_unreadable_segment(tmp_path):
    page = synthetic.page_html("T", "/a.jpg", alt="A cat on a mat", paragraphs=synthetic.FILLER_PARAGRAPHS[:2])
    records = [(f"https://x.example.com/p{i}.html", "text/html; charset=utf-8", page.encode()) for i in range(5)]
    whole = synthetic.write_warc(tmp_path / "a.warc.gz", records).read_bytes()
    starts = [i for i in range(len(whole)) if whole.startswith(b"\x1f\x8b\x08", i)]
    assert len(starts) == 6  # the warcinfo record, then the five pages
    middle = (starts[3] + starts[4]) // 2  # inside the third page's member
    damaged = whole[:middle] + bytes(b ^ 0xFF for b in whole[middle : middle + 40]) + whole[middle + 40 :]
    (tmp_path / "bad.warc.gz").write_bytes(damaged)
    tally = Tally()
    pages = list(scan_source({"kind": "warc", "path": str(tmp_path / "bad.warc.gz")}, _config().parse, tally))
    assert [page["page_url"].rsplit("/", 1)[-1] for page in pages] == ["p0.html", "p1.html", "p3.html", "p4.html"]
    assert tally.drops("read", "record") == {"not_a_response": 1, "unreadable_segment": 1}
    assert tally.get_count("read", "record", INPUT) == 6


# A configuration changed after it was built ------------------------------------------------------------------------

MUTATIONS = [
    pytest.param("images", "min_side", "400", TypeError, "images.min_side must be an integer", id="string-side"),
    pytest.param("text", "min_words", 50, ValueError, r"text.min_words \(50\) must be at most", id="min-over-max"),
    pytest.param("relevance", "relevance_threshold", 30, ValueError, "relevance.relevance_threshold", id="range"),
]


@pytest.mark.parametrize(("section", "name", "value", "error", "says"), MUTATIONS)
def test_a_field_set_after_the_config_was_built_is_checked_before_a_run(tmp_path, section, name, value, error, says):
    site, _ = _site(tmp_path)
    config = _config()
    setattr(getattr(config, section), name, value)
    with pytest.raises(error, match=says):
        run_local([site], tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


@require_module("pyspark")
def test_the_spark_runner_checks_a_changed_config_before_starting(tmp_path, monkeypatch):
    from imagebert_hf.curation import spark

    def no_session(*args, **kwargs):
        raise AssertionError("a session was started")

    monkeypatch.setattr(spark, "local_spark_session", no_session)
    site, _ = _site(tmp_path)
    config = _config()
    config.text.min_words = 50
    with pytest.raises(ValueError, match=r"text.min_words \(50\) must be at most"):
        spark.run_spark([site], tmp_path / "out", config)
    config = _config()
    config.images = {"min_side": 300}
    with pytest.raises(TypeError, match="images must be a ImageFilterConfig"):
        spark.run_spark([site], tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


# What a run keeps of its output ------------------------------------------------------------------------------------


def test_a_local_run_keeps_no_copy_of_its_output_in_the_datasets_cache(tmp_path):
    site, _ = _site(tmp_path)
    result = run_local([site], tmp_path / "out", _config())
    assert len(result.dataset) == 1 and result.dataset.cache_files == []
    unloaded = run_local([site], tmp_path / "out", _config(), load_result=False)
    assert unloaded.dataset is None and unloaded.tally == result.tally


def test_the_command_counts_the_pairs_without_loading_them(tmp_path, monkeypatch, capsys):
    import imagebert_hf.curation.pipeline as pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("the output was loaded")

    monkeypatch.setattr(pipeline, "load_curated", no_loading)
    site, _ = _site(tmp_path)
    lenient = ["--nsfw_detector", "none", "--natural_classifier", "none", "--relevance_threshold", "0"]
    assert main(["--inputs", str(site), "--output_dir", str(tmp_path / "out"), *lenient]) == 0
    printed = capsys.readouterr().out
    assert '"pairs": 1' in printed and "| aggregation | pair | kept | 1 |" in printed


# --config_file and the flags given with it -------------------------------------------------------------------------

FLAG_SPELLINGS = [
    pytest.param(["--min_words", "5"], ("text", "min_words"), 5, id="underscores"),
    pytest.param(["--min_words=5"], ("text", "min_words"), 5, id="equals"),
    pytest.param(["--min-words", "5"], ("text", "min_words"), 5, id="dashes"),
    pytest.param(["--no_require_function_word"], ("text", "require_function_word"), False, id="no-underscores"),
    pytest.param(["--no-drop-url-like"], ("text", "drop_url_like"), False, id="no-dashes"),
    pytest.param(["--drop_url_like", "false"], ("text", "drop_url_like"), False, id="bool-value"),
    pytest.param(["--relevance_thr", "0.9"], ("relevance", "relevance_threshold"), 0.9, id="abbreviation"),
]


@pytest.mark.parametrize(("flags", "field", "wanted"), FLAG_SPELLINGS)
def test_a_flag_given_in_any_spelling_wins_over_the_config_file(tmp_path, flags, field, wanted):
    path = tmp_path / "run.json"
    CurationConfig().save(path)
    base = ["--inputs", "crawl/", "--output_dir", str(tmp_path / "out")]
    for argv in (base + flags, base + ["--config_file", str(path), *flags]):
        _, config = parse_args(argv)
        assert getattr(getattr(config, field[0]), field[1]) == wanted, argv
    # The file's other values stay.
    data = CurationConfig().to_dict()
    data["text"]["max_chars"] = 250
    path.write_text(json.dumps(data))
    _, config = parse_args([*base, "--config_file", str(path), *flags])
    assert config.text.max_chars == 250


def test_flags_are_checked_against_the_config_files_values(tmp_path):
    data = CurationConfig().to_dict()
    data["text"].update(max_words=100, max_chars=1000)
    path = tmp_path / "long.json"
    path.write_text(json.dumps(data))
    base = ["--inputs", "crawl/", "--output_dir", str(tmp_path / "out"), "--config_file", str(path)]
    _, config = parse_args([*base, "--min_words", "50"])
    assert (config.text.min_words, config.text.max_words) == (50, 100)
    # A file whose values hold only with the flags given with it.
    data["text"].update(min_words=50, max_words=40)
    path.write_text(json.dumps(data))
    _, config = parse_args([*base, "--max_words", "100"])
    assert (config.text.min_words, config.text.max_words) == (50, 100)
    with pytest.raises(ValueError, match=r"--config_file: .*long\.json with the flags given: text\.min_words \(50\)"):
        parse_args([*base, "--min_chars", "20"])


# Spark reruns ------------------------------------------------------------------------------------------------------


def test_model_versions_follow_the_files_the_config_names(tmp_path):
    from imagebert_hf.curation.image_filters import load_packaged_model
    from imagebert_hf.curation.spark import _model_versions

    model = load_packaged_model("relevance.json")
    model.save(tmp_path / "relevance.json")
    (tmp_path / "vocab.txt").write_text("a\nthe\ncat\n")
    config = _config()
    config.relevance.relevance_model_path = str(tmp_path / "relevance.json")
    config.text.vocabulary = str(tmp_path / "vocab.txt")
    first = _model_versions(config)
    assert _model_versions(config) == first
    model.intercept += 1.0
    model.save(tmp_path / "relevance.json")
    retrained = _model_versions(config)
    assert retrained["relevance.relevance_model_path"] != first["relevance.relevance_model_path"]
    (tmp_path / "vocab.txt").write_text("a\nthe\ncat\ndog\n")
    assert _model_versions(config)["text.vocabulary"] != retrained["text.vocabulary"]
    assert _model_versions(_config()) != first  # the packaged files


@require_module("pyspark")
def test_a_spark_rerun_redoes_a_part_whose_input_was_rewritten(spark, tmp_path):
    from imagebert_hf.curation.spark import run_spark

    site = _write_page(tmp_path / "site")
    first = run_spark([site], tmp_path / "out", _config(), spark=spark, num_partitions=1)
    assert first.dataset["text"] == [CAPTION]
    time.sleep(0.01)  # a new modification time, besides a new size
    _write_page(site, alt="A brown dog sleeping on a sofa in the living room")
    again = run_spark([site], tmp_path / "out", _config(), spark=spark, num_partitions=1)
    local = run_local([site], tmp_path / "local", _config())
    assert again.dataset["text"] == local.dataset["text"] == ["A brown dog sleeping on a sofa in the living room"]
    assert again.tally == local.tally


@require_module("pyspark")
def test_the_spark_runner_writes_one_row_per_pair_id(spark, tmp_path, monkeypatch):
    import imagebert_hf.curation.pipeline as pipeline
    import imagebert_hf.curation.spark as spark_runner

    site, _ = _site(tmp_path)
    monkeypatch.setattr(pipeline, "discover_sources", _doubled(pipeline.discover_sources))
    monkeypatch.setattr(spark_runner, "discover_sources", _doubled(spark_runner.discover_sources))
    local = run_local([site], tmp_path / "local", _config())
    result = spark_runner.run_spark([site], tmp_path / "out", _config(), spark=spark, num_partitions=2)
    _assert_one_row_per_kept_pair(result)
    assert result.dataset.to_list() == local.dataset.to_list()
    assert result.tally == local.tally and result.tally.get_count("aggregation", "pair", "duplicate_pair_id") > 0
