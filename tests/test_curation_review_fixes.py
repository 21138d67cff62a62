"""Curation edges: an image stored under the URL a browser requests is found however its page writes it, a run that
fails after its pairs are written leaves an earlier output as it was, a plug-in that cannot score fails before any
page is read, a hostile declared size costs a page nothing, configured function words match in any case, and the
example script leaves the curated pairs on disk."""

import errno
import runpy
import sys
from pathlib import Path

import pytest

from imagebert_hf.curation import CurationConfig, ParseConfig, TextCleaningConfig, run_local, synthetic
from imagebert_hf.curation.image_filters import get_nsfw_detector
from imagebert_hf.curation.inputs import WarcImageResolver, normalize_url
from imagebert_hf.curation.parse import parse_pages
from imagebert_hf.curation.pipeline import (
    OUTPUT_COLUMNS,
    CurationResult,
    check_stage_inputs,
    features_for,
    load_curated,
)
from imagebert_hf.curation.tally import Tally
from imagebert_hf.curation.text_cleaning import check_text

from .test_curation import DictResolver, page_batch, photo_bytes
from .test_curation_reruns_and_overlaps import _config
from .testing_utils import require_module


pytestmark = [require_module("fastwarc"), require_module("resiliparse"), require_module("warcio")]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PHOTO = photo_bytes()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


# An image stored under its percent-encoded URL -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "stored"),
    [
        ("https://ex.com/images/my dog.jpg", "https://ex.com/images/my%20dog.jpg"),
        ("https://ex.com/images/café-dog.jpg", "https://ex.com/images/caf%C3%A9-dog.jpg"),
        ("https://ex.com/images/caf%c3%a9-dog.jpg", "https://ex.com/images/caf%C3%A9-dog.jpg"),
        ("https://ex.com/images/my%20dog.jpg", "https://ex.com/images/my dog.jpg"),
        ("HTTPS://Ex.COM/images/dog.jpg?size=large&q=a b", "https://ex.com/images/dog.jpg?size=large&q=a%20b"),
        ("https://ex.com/%7Euser/dog.jpg#top", "https://ex.com/~user/dog.jpg"),
    ],
)
def test_an_image_stored_under_the_url_a_browser_requests_is_found(tmp_path, requested, stored):
    warc = synthetic.write_warc(tmp_path / "crawl.warc.gz", [(stored, "image/jpeg", PHOTO)])
    assert WarcImageResolver(str(warc)).fetch(requested, 1 << 22) == (PHOTO, None)


def test_escaped_reserved_characters_stay_apart_from_the_characters_themselves():
    # `a%2Fb.jpg` is one file named "a/b.jpg"; `a/b.jpg` is a file in a folder.
    assert normalize_url("https://ex.com/a%2Fb.jpg") != normalize_url("https://ex.com/a/b.jpg")
    assert normalize_url("https://ex.com/x.jpg?a=1%262") != normalize_url("https://ex.com/x.jpg?a=1&2")
    assert normalize_url("https://ex.com/100%.jpg") == "https://ex.com/100%.jpg"
    assert normalize_url("http://[ex.com/x.jpg") == "http://[ex.com/x.jpg"  # no URL: kept as written


def test_a_page_keeps_its_image_stored_under_a_percent_encoded_url(tmp_path):
    page = synthetic.page_html(
        "A day out", "/images/my dog.jpg", alt="A brown dog on a bench", paragraphs=synthetic.FILLER_PARAGRAPHS[:3]
    )
    warc = synthetic.write_warc(
        tmp_path / "crawl.warc.gz",
        [
            ("https://ex.com/walk.html", "text/html; charset=utf-8", page.encode()),
            ("https://ex.com/images/my%20dog.jpg", "image/jpeg", PHOTO),
        ],
    )
    result = run_local([str(warc)], tmp_path / "out", _config())
    assert len(result.dataset) == 1
    assert result.tally.drops("parse", "image").get("image_not_archived") is None


# A failure after the pairs are written ---------------------------------------------------------------------------


def _saved_page(folder: Path) -> Path:
    (folder / "page_files").mkdir(parents=True)
    (folder / "page_files" / "photo.jpg").write_bytes(PHOTO)
    page = synthetic.page_html(
        "Home", "page_files/photo.jpg", alt="A brown dog on a bench", paragraphs=synthetic.FILLER_PARAGRAPHS[:3]
    )
    (folder / "page.html").write_text(page)
    return folder


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_report_that_cannot_be_written_leaves_the_earlier_output_as_it_was(tmp_path, monkeypatch):
    from imagebert_hf.curation import tally as tally_module

    site, out = _saved_page(tmp_path / "site"), tmp_path / "out"
    run_local([site], out, _config(), load_result=False)
    before = _snapshot(out)
    config = _config()
    config.text.min_words = 30  # a run that keeps no pair: its data/ would differ from the first run's
    monkeypatch.setattr(tally_module, "funnel_chart", _full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        run_local([site], out, config, load_result=False)
    assert _snapshot(out) == before
    assert sorted(path.name for path in out.iterdir()) == [
        "config.json",
        "data",
        "funnel.json",
        "funnel.md",
        "funnel.png",
    ]


@require_module("pyspark")
def test_the_spark_runner_leaves_the_earlier_output_when_its_report_fails(tmp_path, monkeypatch, spark):
    from imagebert_hf.curation import tally as tally_module
    from imagebert_hf.curation.spark import run_spark

    site, out = _saved_page(tmp_path / "site"), tmp_path / "out"
    run_spark([str(site)], str(out), _config(), spark=spark, load_result=False)
    before = {name: data for name, data in _snapshot(out).items() if not name.startswith("parts")}
    config = _config()
    config.text.min_words = 30
    monkeypatch.setattr(tally_module, "funnel_chart", _full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        run_spark([str(site)], str(out), config, spark=spark, load_result=False)
    assert {name: data for name, data in _snapshot(out).items() if not name.startswith("parts")} == before


# Plug-ins that cannot score ---------------------------------------------------------------------------------------


class PredictsInstead:
    """A scorer whose method has another name."""

    def predict(self, images, stats):
        return [0.0] * len(images)


class NeedsThreshold:
    def __init__(self, threshold):
        self.threshold = threshold

    def score(self, images, stats):
        return [0.0] * len(images)


class CountsBuilds:
    built = 0

    def __init__(self):
        type(self).built += 1

    def score(self, images, stats):
        return [0.0] * len(images)


@pytest.mark.parametrize(
    ("field", "plugin", "message"),
    [
        ("nsfw_detector", "PredictsInstead", r"is a type without a callable `score`"),
        ("nsfw_detector", "NeedsThreshold", r"cannot be built without arguments \(.*threshold"),
        ("natural_classifier", "PredictsInstead", r"is a type without a callable `score`"),
        ("natural_classifier", "NeedsThreshold", r"cannot be built without arguments \(.*threshold"),
    ],
)
def test_a_plugin_that_cannot_score_fails_before_any_page_is_read(tmp_path, field, plugin, message):
    site = _saved_page(tmp_path / "site")
    config = _config()
    setattr(config.images, field, f"{__name__}:{plugin}")
    with pytest.raises(ValueError, match=rf"^images\.{field}: the plug-in '{__name__}:{plugin}' {message}") as info:
        run_local([site], tmp_path / "out", config)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_the_cli_names_a_plugin_without_score_in_one_line(tmp_path):
    from imagebert_hf.curation.cli import main

    site = _saved_page(tmp_path / "site")
    with pytest.raises(SystemExit) as info:
        main(
            [
                "--inputs",
                str(site),
                "--output_dir",
                str(tmp_path / "out"),
                "--nsfw_detector",
                f"{__name__}:PredictsInstead",
            ]
        )
    message = info.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith("imagebert-curate: error: images.nsfw_detector: the plug-in ")
    assert not (tmp_path / "out").exists()


def test_the_check_builds_no_plugin_and_the_stage_builds_it_once():
    """The check reads the class: a constructor run in the runner's process (a GPU context) would be inherited by
    the workers it forks, where it cannot be used."""
    get_nsfw_detector.cache_clear()
    CountsBuilds.built = 0
    config = CurationConfig()
    config.images.nsfw_detector = f"{__name__}:CountsBuilds"
    config.images.natural_classifier = "none"
    check_stage_inputs(config)
    assert CountsBuilds.built == 0
    assert isinstance(get_nsfw_detector(config.images.nsfw_detector), CountsBuilds)
    assert get_nsfw_detector(config.images.nsfw_detector) is get_nsfw_detector(config.images.nsfw_detector)
    assert CountsBuilds.built == 1


# Hostile declared sizes --------------------------------------------------------------------------------------------

GOOD_PAGE = synthetic.page_html(
    "A day out",
    "/photos/main.jpg",
    alt="A dog catching a frisbee in a park",
    paragraphs=synthetic.FILLER_PARAGRAPHS[:3],
)


@pytest.mark.parametrize(
    "extra",
    [
        '<img src="/x/other.jpg" width="%s" height="300">' % ("9" * 400),
        '<img src="/x/other.jpg" width="400" height="%spx">' % ("9" * 5000),
        '<img src="/x/other.jpg" style="width:%spx">' % ("9" * 400),
        '<img src="/x/other.jpg" style="height:%s.5px; width: 400px">' % ("9" * 5000),
    ],
)
def test_a_hostile_declared_size_costs_the_page_nothing(extra):
    html = GOOD_PAGE.replace("<h1>", extra + "<h1>")
    resolver = DictResolver({"https://news.example.com/photos/main.jpg": PHOTO})
    out, tally = parse_pages(page_batch(html), ParseConfig(), resolver)
    assert out["image_url"] == ["https://news.example.com/photos/main.jpg"]
    assert tally.drops("parse", "page") == {}


def test_a_declared_size_of_many_digits_counts_as_undeclared():
    from resiliparse.parse.html import HTMLTree

    from imagebert_hf.curation.parse import declared_size

    def size(attributes: str):
        return declared_size(HTMLTree.parse(f"<body><img src=a.jpg {attributes}></body>").body.query_selector("img"))

    assert size('width="640" height="0000480px"') == (640, 480)
    assert size('width="999999" height="1234567"') == (999999, None)
    assert size('width="640" style="width:%spx; height: 200.9px"' % ("9" * 400)) == (640, 200)


# Function words given in capitals ----------------------------------------------------------------------------------


def test_function_words_match_in_any_case():
    text = "Der Hund sitzt auf der Bank im Park"
    lower = TextCleaningConfig(function_words=["der", "die", "das", "auf", "im"], max_rare_word_ratio=1.0)
    capitalised = TextCleaningConfig(function_words=["Der", "Die", "Das", "Auf", "Im"], max_rare_word_ratio=1.0)
    assert check_text(text, capitalised) == check_text(text, lower) == (None, 0.125)


def test_capitalised_function_words_are_exempt_from_the_repetition_rule():
    text = "Die Katze und die Maus und die Hunde auf die Bank"
    config = TextCleaningConfig(function_words=["Die", "Und", "Auf"], max_rare_word_ratio=1.0)
    assert check_text(text, config)[0] is None
    assert check_text(text, TextCleaningConfig(function_words=["und", "auf"], max_rare_word_ratio=1.0))[0] == (
        "repeated_words"
    )


# The example script ------------------------------------------------------------------------------------------------


def test_curate_lait_leaves_the_pairs_on_disk_and_shows_a_few(monkeypatch, tmp_path, capsys):
    from datasets import Dataset

    module = runpy.run_path(str(EXAMPLES / "curate_lait.py"))
    received = []

    def fake_runner(inputs, output_dir, config, **kwargs):
        received.append(kwargs)
        rows = {name: [] for name in OUTPUT_COLUMNS}
        for index in range(5):
            for name in OUTPUT_COLUMNS:
                rows[name].append(None)
            rows["pair_id"][-1], rows["text"][-1] = f"{index:024d}", f"caption {index}"
            rows["image_url"][-1], rows["relevance_score"][-1] = f"https://ex.com/{index}.jpg", 0.5
        data = Path(output_dir) / "data"
        data.mkdir(parents=True)
        table = Dataset.from_dict(rows, features=features_for(OUTPUT_COLUMNS, with_tally=False))
        table.to_parquet(str(data / "part-00000-of-00001.parquet"))
        return CurationResult(dataset=None, tally=Tally(), output_dir=Path(output_dir))

    module["main"].__globals__["run_local"] = fake_runner
    monkeypatch.setattr(
        sys, "argv", ["curate_lait.py", "--inputs", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    )
    module["main"]()
    assert [kwargs.get("load_result") for kwargs in received] == [False]
    printed = capsys.readouterr().out
    assert "num_rows: 5" in printed
    assert "'caption 0'  <- https://ex.com/0.jpg" in printed and "'caption 2'" in printed
    assert "'caption 3'" not in printed
    assert len(load_curated(tmp_path / "out")) == 5


def test_the_image_stage_reads_every_image_the_parse_stage_fetched(monkeypatch):
    """`parse.max_image_bytes` may exceed the loader's default file limit (64 MiB): the image stage must not drop
    what the parse stage kept as `file_too_large`."""
    from imagebert_hf.curation import image_filters
    from imagebert_hf.models.imagebert import roi_image_loading

    seen = {}

    def load_image(data, **limits):
        seen.update(limits)
        return roi_image_loading.load_image(data, **limits)

    monkeypatch.setattr(image_filters, "load_image", load_image)
    data = b"\xff" * (roi_image_loading.DEFAULT_MAX_FILE_BYTES + 1)
    image, _, _, reason = image_filters.decode_image(data, CurationConfig().images)
    assert image is None and reason != "file_too_large" and seen["max_file_bytes"] >= len(data)


def test_a_batch_of_pages_asks_for_its_warc_once(tmp_path, monkeypatch):
    """Finding a page's WARC asks a store for the file's version (a HEAD request on S3): once per batch and source,
    not once per page."""
    from imagebert_hf.curation import inputs

    pages = [
        (
            f"https://ex.com/{i}.html",
            "text/html; charset=utf-8",
            synthetic.page_html(
                f"Day {i}",
                f"/images/{i}.jpg",
                alt="A brown dog on a bench",
                paragraphs=synthetic.FILLER_PARAGRAPHS[:3],
            ).encode(),
        )
        for i in range(5)
    ]
    photos = [(f"https://ex.com/images/{i}.jpg", "image/jpeg", PHOTO) for i in range(5)]
    warc = str(synthetic.write_warc(tmp_path / "crawl.warc.gz", pages + photos))
    versions = []
    monkeypatch.setattr(inputs, "input_version", lambda path: versions.append(path) or (0, 0))
    rows = list(inputs.scan_source({"kind": "warc", "path": warc}, ParseConfig(), Tally()))
    batch = {name: [row[name] for row in rows] for name in rows[0]}
    records, tally = parse_pages(batch, ParseConfig())
    assert len(rows) == 5 and len(records["image_url"]) == 5 and versions == [warc]
