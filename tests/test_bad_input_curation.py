"""Bad input at the curation boundary: files named like WARCs that are not are counted in the funnel report
(never silently zero pages), and malformed caption columns of the curation-model training data fail naming
`file:line` and the field."""

import gzip
import json
import os

import pytest

from imagebert_hf.curation import synthetic
from imagebert_hf.curation.config import ParseConfig
from imagebert_hf.curation.inputs import discover_sources, scan_source, warc_signature_problem
from imagebert_hf.curation.tally import KEPT, Tally
from imagebert_hf.formats.manifest import ManifestError


def _html_page() -> bytes:
    page = synthetic.page_html("T", "/a.jpg", alt="A cat on a mat", paragraphs=synthetic.FILLER_PARAGRAPHS[:2])
    return page.encode()


NOT_WARC = [
    ("random.warc", lambda: os.urandom(4096), "not_a_warc_file"),
    ("random.warc.gz", lambda: os.urandom(4096), "not_a_warc_file"),
    ("random.arc", lambda: os.urandom(100), "not_a_warc_file"),
    ("empty.warc", lambda: b"", "empty_file"),
    ("empty.warc.gz", lambda: b"", "empty_file"),
    ("text.warc", lambda: b"this is not a warc file\n" * 100, "not_a_warc_file"),
    ("html.warc", _html_page, "not_a_warc_file"),
    ("gzipped_text.warc.gz", lambda: gzip.compress(b"hello, not a warc\n" * 50), "not_a_warc_file"),
    ("gzipped_html.warc.gz", lambda: gzip.compress(_html_page()), "not_a_warc_file"),
    ("gzip_magic_then_junk.warc.gz", lambda: b"\x1f\x8b\x08" + os.urandom(500), "not_a_warc_file"),
    ("png.warc", lambda: b"\x89PNG\r\n\x1a\n" + os.urandom(200), "not_a_warc_file"),
    ("whitespace.warc", lambda: b"   \n\n  ", "not_a_warc_file"),
]


@pytest.mark.parametrize(("name", "make", "reason"), NOT_WARC, ids=[c[0] for c in NOT_WARC])
def test_a_file_that_is_not_a_warc_is_counted(tmp_path, name, make, reason):
    path = tmp_path / name
    path.write_bytes(make())
    assert warc_signature_problem(str(path)) == reason
    tally = Tally()
    (source,) = discover_sources([path])
    assert list(scan_source(source, ParseConfig(), tally)) == []
    assert tally.get_count("read", "file", reason) == 1


@pytest.mark.parametrize("gzipped", [True, False], ids=["warc.gz", "warc"])
def test_a_real_warc_is_read(tmp_path, gzipped):
    records = [("https://x.example.com/p.html", "text/html; charset=utf-8", _html_page())] * 2
    path = synthetic.write_warc(tmp_path / ("a.warc.gz" if gzipped else "a.warc"), records, gzip=gzipped)
    assert warc_signature_problem(str(path)) is None
    tally = Tally()
    (source,) = discover_sources([path])
    assert len(list(scan_source(source, ParseConfig(), tally))) == 2
    assert tally.get_count("read", "record", KEPT) == 2 and not tally.drops("read", "file")


def test_the_funnel_report_names_the_non_warc_files(tmp_path):
    from imagebert_hf.curation.pipeline import run_local

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a.warc").write_bytes(os.urandom(2048))
    (inputs / "b.warc.gz").write_bytes(os.urandom(2048))
    (inputs / "c.warc").write_bytes(b"")
    result = run_local([inputs], tmp_path / "out")
    assert len(result.dataset) == 0
    assert result.tally.get_count("read", "file", "not_a_warc_file") == 2
    assert result.tally.get_count("read", "file", "empty_file") == 1
    report = (tmp_path / "out" / "funnel.md").read_text()
    assert "| read | file | dropped: not_a_warc_file | 2 |" in report
    assert "| read | file | dropped: empty_file | 1 |" in report


BAD_CAPTION_LINES = [
    ("captions a string", {"image": "a.jpg", "captions": "A dog."}, "'captions'"),
    ("captions missing", {"image": "a.jpg"}, "'captions'"),
    ("caption empty", {"image": "a.jpg", "captions": ["A dog.", ""]}, "captions[1]"),
    ("caption a number", {"image": "a.jpg", "captions": [3]}, "captions[0]"),
    ("image missing", {"captions": ["A dog."]}, "'image'"),
    ("image outside the folder", {"image": "../a.jpg", "captions": ["A dog."]}, "'image'"),
]


@pytest.mark.parametrize(("line", "field"), [c[1:] for c in BAD_CAPTION_LINES], ids=[c[0] for c in BAD_CAPTION_LINES])
def test_malformed_training_captions_name_file_line_and_field(tmp_path, line, field):
    from imagebert_hf.curation.fitting import load_captioned_images

    good = {"image": "a.jpg", "captions": ["A dog."], "split": "train"}
    (tmp_path / "captions.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ManifestError) as info:
        load_captioned_images(tmp_path, with_stats=False)
    assert str(info.value).startswith(f"{tmp_path / 'captions.jsonl'}:2: ") and field in str(info.value)


def test_training_captions_stay_lists_of_captions(tmp_path):
    from imagebert_hf.curation.fitting import load_captioned_images

    lines = [
        {"image": "a.jpg", "captions": ["A dog.", "A pet."], "split": "train"},
        {"image": "b.jpg", "caption": "X"},
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    items = load_captioned_images(tmp_path, with_stats=False)
    assert [item.captions for item in items] == [["A dog.", "A pet."], ["X"]]
    assert [item.split for item in items] == ["train", "val"] and items[0].path == tmp_path / "a.jpg"


@pytest.mark.parametrize(("data", "named"), [(b"", "empty file"), (b"<html>", "not a recognised image format")])
def test_photo_statistics_names_an_unusable_file(tmp_path, data, named):
    from imagebert_hf.curation.fitting import photo_statistics

    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=rf"{path.name}: {named}"):
        photo_statistics(path)
    with pytest.raises(ValueError, match="missing.jpg"):
        photo_statistics(tmp_path / "missing.jpg")
