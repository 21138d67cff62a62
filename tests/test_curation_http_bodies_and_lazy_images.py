"""HTTP bodies a WARC stores as sent (chunked, gzip, deflate, br) are decoded before a page is parsed or an image
read, within the size limits; Common Crawl's decoded bodies are left as they are; an ARC file is counted and named;
and a lazy-loaded image is found by the URL a lazy loader swaps in, not by its placeholder."""

import gzip
import logging
import sys
import tracemalloc
import zlib
from pathlib import Path

import pytest
from PIL import Image

from imagebert_hf.curation import ParseConfig, Tally, parse_pages, run_local, synthetic
from imagebert_hf.curation.inputs import WarcImageResolver, discover_sources, scan_source
from imagebert_hf.curation.pipeline import NoPagesError
from imagebert_hf.curation.tally import INPUT, KEPT

from .test_curation import photo_bytes
from .test_curation_reruns_and_overlaps import _config
from .testing_utils import require_module


pytestmark = [require_module("fastwarc"), require_module("resiliparse")]

PAGE_URL = "https://news.example.com/harbour.html"
PHOTO_URL = "https://news.example.com/img/harbour.jpg"
ALT = "Fishing boats moored in the harbour at sunset"
CAPTION = "The harbour empties before the morning tide."
PAGE = synthetic.page_html(
    "The harbour", "/img/harbour.jpg", alt=ALT, caption=CAPTION, paragraphs=synthetic.FILLER_PARAGRAPHS[:3]
).encode()
PHOTO = photo_bytes()


# Writing WARC files as crawlers that keep HTTP bodies as sent do --------------------------------------------------


def chunked(body: bytes, size: int = 16) -> bytes:
    """`body` as a `Transfer-Encoding: chunked` stream of `size`-byte chunks, with a chunk extension and a trailer."""
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    out = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    return out + b"0\r\nExpires: never\r\n\r\n"


def deflate(body: bytes, wrapped: bool = True) -> bytes:
    compressor = zlib.compressobj(wbits=zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
    return compressor.compress(body) + compressor.flush()


def chunk_then_garbage(body: bytes) -> bytes:
    """A chunked body whose first chunk is valid and whose next chunk-size line is not a size."""
    return b"10\r\n" + body[:16] + b"\r\nnot a size\r\n" + body[16:] + b"\r\n0\r\n\r\n"


def deflate_broken_after_its_first_block(body: bytes, wrapped: bool = True) -> bytes:
    """Deflate data whose first block is whole and whose next block is corrupt (a stored block of bad lengths)."""
    compressor = zlib.compressobj(wbits=zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
    return compressor.compress(body) + compressor.flush(zlib.Z_FULL_FLUSH) + bytes(8)


def response(url: str, content_type: str, body: bytes, headers=(), status: str = "200 OK") -> bytes:
    """A WARC response record holding an HTTP response whose body is stored byte for byte."""
    fields = [("Content-Type", content_type), *headers]
    http = f"HTTP/1.1 {status}\r\n".encode() + b"".join(f"{k}: {v}\r\n".encode() for k, v in fields) + b"\r\n"
    block = http + body
    head = (
        f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: {url}\r\n"
        f"WARC-Record-ID: <urn:uuid:{abs(hash((url, body))):032x}>\r\nWARC-Date: 2024-05-01T10:00:00Z\r\n"
        f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(block)}\r\n\r\n"
    )
    return head.encode() + block + b"\r\n\r\n"


def write_warc(path: Path, records: list[bytes], gzipped: bool = True) -> Path:
    path.write_bytes(b"".join(gzip.compress(record) if gzipped else record for record in records))
    return path


def page_record(body: bytes = PAGE, headers=(), url: str = PAGE_URL) -> bytes:
    return response(url, "text/html; charset=utf-8", body, headers)


def image_record(body: bytes = PHOTO, headers=(), url: str = PHOTO_URL) -> bytes:
    return response(url, "image/jpeg", body, headers)


def scan(path: Path, config: ParseConfig | None = None) -> tuple[list[dict], Tally]:
    tally = Tally()
    pages = []
    for source in discover_sources([path]):
        pages.extend(scan_source(source, config or ParseConfig(), tally))
    return pages, tally


def parse(pages: list[dict], config: ParseConfig | None = None) -> tuple[dict, Tally]:
    batch = {key: [page[key] for page in pages] for key in pages[0]}
    return parse_pages(batch, config or ParseConfig())


# The decoding ------------------------------------------------------------------------------------------------------

BODY = b"<p>" + b"A line of a page stored as the server sent it. " * 200 + b"</p>"


@pytest.mark.parametrize(
    ("stored", "transfer", "content"),
    [
        (chunked(BODY), "chunked", None),
        (chunked(BODY).replace(b"\r\n", b"\n"), "Chunked", ""),
        (gzip.compress(BODY), None, "gzip"),
        (gzip.compress(BODY[:100]) + gzip.compress(BODY[100:]), "", "x-gzip"),
        (deflate(BODY), None, "deflate"),
        (deflate(BODY, wrapped=False), None, "deflate"),
        (chunked(gzip.compress(BODY)), "chunked", "gzip"),
        (gzip.compress(deflate(BODY)), None, "deflate, gzip"),
        (chunked(deflate(BODY)), "identity, chunked", "identity, deflate"),
        (BODY, None, "none"),
        (BODY, None, None),
        (b"", "chunked", "gzip"),
    ],
    ids=[
        "chunked",
        "chunked-bare-line-feeds",
        "gzip",
        "x-gzip-two-members",
        "deflate-zlib",
        "deflate-raw",
        "chunked-gzip",
        "deflate-then-gzip",
        "identity-listed",
        "unknown-coding-passed-through",
        "plain",
        "empty",
    ],
)
def test_a_body_stored_as_sent_is_decoded(stored, transfer, content):
    from imagebert_hf.curation.inputs import decode_http_body

    expected = b"" if not stored else BODY
    assert decode_http_body(stored, transfer, content, 1 << 20) == expected


@require_module("brotli")
def test_a_brotli_body_is_decoded():
    import brotli

    from imagebert_hf.curation.inputs import decode_http_body

    assert decode_http_body(chunked(brotli.compress(BODY)), "chunked", "br", 1 << 20) == BODY


@pytest.mark.parametrize(
    ("stored", "transfer", "content", "reason"),
    [
        (b"3\r\nabc\r\nzz\r\n" + BODY + b"\r\n0\r\n\r\n", "chunked", None, "bad_transfer_encoding"),
        (chunked(BODY)[:-30], "chunked", None, "bad_transfer_encoding"),
        (b"ffff\r\n" + BODY[:10] + b"\r\n0\r\n\r\n", "chunked", None, "bad_transfer_encoding"),
        (b"5\r\nabcdefgh\r\n0\r\n\r\n", "chunked", None, "bad_transfer_encoding"),
        (b"3\r\nabc\r\n0x5\r\nabcde\r\n0\r\n\r\n", "chunked", None, "bad_transfer_encoding"),
        (b"3\r\nabc\r\n-5\r\nabcde\r\n0\r\n\r\n", "chunked", None, "bad_transfer_encoding"),
        (chunk_then_garbage(BODY), "chunked", None, "bad_transfer_encoding"),
        (b"1a", "chunked", None, "bad_transfer_encoding"),
        (gzip.compress(BODY)[:-40], None, "gzip", "bad_content_encoding"),
        (gzip.compress(BODY)[:20] + bytes(60) + gzip.compress(BODY)[80:], None, "gzip", "bad_content_encoding"),
        (b"\x1f\x8b" + BODY, None, "gzip", "bad_content_encoding"),
        (deflate_broken_after_its_first_block(BODY), None, "deflate", "bad_content_encoding"),
        (deflate_broken_after_its_first_block(BODY, wrapped=False), None, "deflate", "bad_content_encoding"),
        (deflate(BODY)[:-40], None, "deflate", "bad_content_encoding"),
        (deflate(BODY, wrapped=False)[:-40], None, "deflate", "bad_content_encoding"),
        (gzip.compress(BODY), None, "zstd", "unsupported_content_encoding"),
    ],
    ids=[
        "chunk-size-not-hex",
        "chunked-cut-short",
        "chunk-past-the-end",
        "chunk-longer-than-its-size",
        "chunk-size-with-0x",
        "chunk-size-with-a-sign",
        "a-chunk-then-no-chunk-size",
        "only-a-chunk-size",
        "gzip-cut-short",
        "gzip-corrupt",
        "gzip-magic-then-garbage",
        "deflate-zlib-broken-after-its-first-block",
        "deflate-raw-broken-after-its-first-block",
        "deflate-zlib-cut-short",
        "deflate-raw-cut-short",
        "zstd",
    ],
)
def test_a_body_that_cannot_be_decoded_names_why(stored, transfer, content, reason):
    from imagebert_hf.curation.inputs import HttpBodyError, HttpBodyTooLarge, decode_http_body

    with pytest.raises(HttpBodyError) as info:
        decode_http_body(stored, transfer, content, 1 << 20)
    assert info.value.reason == reason and not isinstance(info.value, HttpBodyTooLarge)


# Some warcprox and heritrix versions store a body already de-chunked or decompressed under the headers that still
# name the coding; warcio reads such a body as it is, and so does the pipeline.
NEWLINE_BODY = b"\n<!DOCTYPE html>\n" + BODY  # raw deflate would read its first bytes as a fixed-Huffman block


@pytest.mark.parametrize(
    ("stored", "transfer", "content", "expected", "named"),
    [
        (BODY, "chunked", None, BODY, "chunked"),
        (NEWLINE_BODY, "chunked", None, NEWLINE_BODY, "chunked"),
        (b"zz\r\n" + BODY + b"\r\n0\r\n\r\n", "chunked", None, b"zz\r\n" + BODY + b"\r\n0\r\n\r\n", "chunked"),
        (PHOTO, "chunked", None, PHOTO, "chunked"),
        (BODY, None, "gzip", BODY, "gzip"),
        (PHOTO, None, "x-gzip", PHOTO, "x-gzip"),
        (BODY, None, "deflate", BODY, "deflate"),
        (NEWLINE_BODY, None, "deflate", NEWLINE_BODY, "deflate"),
        (PHOTO, None, "deflate", PHOTO, "deflate"),
        (gzip.compress(BODY), "chunked", "gzip", BODY, "chunked"),
        (chunked(BODY), "chunked", "gzip", BODY, "gzip"),
        (BODY, "chunked", "gzip", BODY, "gzip"),
    ],
    ids=[
        "de-chunked",
        "de-chunked-starting-with-a-newline",
        "de-chunked-first-line-not-a-size",
        "de-chunked-image",
        "decompressed-gzip",
        "decompressed-x-gzip-image",
        "decompressed-deflate",
        "decompressed-deflate-starting-with-a-newline",
        "decompressed-deflate-image",
        "de-chunked-but-still-gzip",
        "chunked-but-decompressed",
        "de-chunked-and-decompressed",
    ],
)
def test_a_body_already_decoded_under_its_coding_headers_is_kept(stored, transfer, content, expected, named, caplog):
    from imagebert_hf.curation.inputs import decode_http_body

    with caplog.at_level(logging.DEBUG, logger="imagebert_hf.curation.inputs"):
        assert decode_http_body(stored, transfer, content, 1 << 20) == expected
    messages = [record.getMessage() for record in caplog.records if record.levelno == logging.DEBUG]
    assert any(f"`{named}`" in message for message in messages), messages


def test_brotli_without_its_module_is_unsupported(monkeypatch):
    from imagebert_hf.curation.inputs import HttpBodyError, decode_http_body

    monkeypatch.setitem(sys.modules, "brotli", None)  # `import brotli` raises ImportError
    with pytest.raises(HttpBodyError) as info:
        decode_http_body(b"\x1b\x03\x00\xf8\x25", None, "br", 1 << 20)
    assert info.value.reason == "unsupported_content_encoding"


BOMB = gzip.compress(bytes(50 << 20), compresslevel=9)  # 50 MB of zeros in about 50 KB


@pytest.mark.parametrize(
    ("stored", "transfer", "content"),
    [(BOMB, None, "gzip"), (chunked(BOMB, 4096), "chunked", "x-gzip"), (gzip.compress(BOMB), None, "gzip, gzip")],
    ids=["gzip", "chunked-gzip", "gzip-twice"],
)
def test_a_compression_bomb_is_refused_without_being_expanded(stored, transfer, content):
    from imagebert_hf.curation.inputs import HttpBodyTooLarge, decode_http_body

    limit = 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(HttpBodyTooLarge):
            decode_http_body(stored, transfer, content, limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * limit, peak


# Pages ------------------------------------------------------------------------------------------------------------

STORED_PAGES = {
    "chunked": (chunked(PAGE), [("Transfer-Encoding", "chunked")]),
    "gzip": (gzip.compress(PAGE), [("Content-Encoding", "gzip")]),
    "chunked-gzip": (chunked(gzip.compress(PAGE)), [("Content-Encoding", "gzip"), ("Transfer-Encoding", "chunked")]),
    "deflate": (deflate(PAGE), [("Content-Encoding", "deflate")]),
    "raw-deflate": (deflate(PAGE, wrapped=False), [("Content-Encoding", "deflate")]),
    "header-given-twice": (
        gzip.compress(deflate(PAGE)),
        [("Content-Encoding", "deflate"), ("Content-Encoding", "gzip")],
    ),
}


@pytest.mark.parametrize("gzipped", [True, False], ids=["warc.gz", "warc"])
@pytest.mark.parametrize("stored", list(STORED_PAGES))
def test_a_page_stored_as_sent_is_read_as_the_page(tmp_path, stored, gzipped):
    body, headers = STORED_PAGES[stored]
    path = write_warc(
        tmp_path / ("crawl.warc.gz" if gzipped else "crawl.warc"),
        [page_record(body, headers), image_record()],
        gzipped,
    )
    pages, tally = scan(path)
    assert [page["html"] for page in pages] == [PAGE]
    assert tally.drops("read", "record") == {"image_record": 1}
    out, parse_tally = parse(pages)
    assert out["image_url"] == [PHOTO_URL] and out["image"] == [PHOTO]
    # No chunk-size line or compressed byte lands in a text.
    assert out["texts"][0][:2] == [ALT, CAPTION]
    assert all(text in PAGE.decode() for text in out["texts"][0])
    assert parse_tally.get_count("parse", "page", KEPT) == 1


def test_a_chunked_page_gives_a_pair_without_chunk_lines(tmp_path):
    config = _config()
    config.parse.text_sources = ["figcaption"]
    path = write_warc(tmp_path / "crawl.warc.gz", [page_record(*STORED_PAGES["chunked"]), image_record()])
    result = run_local([path], tmp_path / "out", config)
    assert result.dataset["text"] == [CAPTION] and result.dataset["image"] == [PHOTO]


def test_common_crawl_s_decoded_bodies_are_left_as_they_are(tmp_path):
    """Common Crawl stores bodies decoded and renames the headers that described them: the same crawl may mix its
    records with those of a crawler that keeps bodies as sent."""
    renamed = [
        ("X-Crawler-Content-Encoding", "gzip"),
        ("X-Crawler-Transfer-Encoding", "chunked"),
        ("X-Crawler-Content-Length", "2130"),
        ("Content-Length", str(len(PAGE))),
    ]
    records = [
        page_record(PAGE, renamed, url=PAGE_URL),
        page_record(*STORED_PAGES["chunked-gzip"], url=PAGE_URL + "?as-sent"),
        image_record(PHOTO, [("X-Crawler-Content-Encoding", "gzip")]),
    ]
    pages, tally = scan(write_warc(tmp_path / "crawl.warc.gz", records))
    assert [page["html"] for page in pages] == [PAGE, PAGE]
    out, _ = parse(pages)
    assert out["image"] == [PHOTO, PHOTO]


def test_a_gzip_bomb_page_is_too_large_and_never_expanded(tmp_path):
    config = ParseConfig(max_page_bytes=1 << 20)
    path = write_warc(tmp_path / "crawl.warc.gz", [page_record(BOMB, [("Content-Encoding", "gzip")]), page_record()])
    tracemalloc.start()
    try:
        pages, tally = scan(path, config)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [page["html"] for page in pages] == [PAGE]
    assert tally.drops("read", "record") == {"page_too_large": 1}
    assert peak < 8 * config.max_page_bytes, peak


@pytest.mark.parametrize(
    "headers",
    [
        [("Transfer-Encoding", "chunked")],
        [("Content-Encoding", "gzip")],
        [("Content-Encoding", "deflate")],
        [("Content-Encoding", "gzip"), ("Transfer-Encoding", "chunked")],
    ],
    ids=["chunked", "gzip", "deflate", "chunked-gzip"],
)
def test_a_page_already_decoded_under_its_coding_headers_is_read_as_the_page(tmp_path, headers):
    path = write_warc(tmp_path / "crawl.warc.gz", [page_record(PAGE, headers), image_record()])
    pages, tally = scan(path)
    assert [page["html"] for page in pages] == [PAGE]
    assert tally.drops("read", "record") == {"image_record": 1}
    out, _ = parse(pages)
    assert out["image"] == [PHOTO] and out["texts"][0][:2] == [ALT, CAPTION]


@pytest.mark.parametrize(
    ("body", "headers", "reason"),
    [
        (gzip.compress(PAGE)[:-60] + bytes(60), [("Content-Encoding", "gzip")], "bad_content_encoding"),
        (chunk_then_garbage(PAGE), [("Transfer-Encoding", "chunked")], "bad_transfer_encoding"),
        (PAGE, [("Content-Encoding", "zstd")], "unsupported_content_encoding"),
    ],
    ids=["corrupt-gzip", "not-chunked", "zstd"],
)
def test_a_page_that_cannot_be_decoded_is_a_counted_drop(tmp_path, body, headers, reason):
    path = write_warc(tmp_path / "crawl.warc.gz", [page_record(body, headers), page_record()])
    pages, tally = scan(path)
    assert [page["html"] for page in pages] == [PAGE]
    assert tally.drops("read", "record") == {reason: 1}
    assert tally.get_count("read", "record", INPUT) == 2 and tally.get_count("read", "record", KEPT) == 1


def test_the_funnel_report_shows_the_new_reasons(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_warc(
        inputs / "crawl.warc.gz",
        [
            page_record(gzip.compress(PAGE)[:-60] + bytes(60), [("Content-Encoding", "gzip")], url=PAGE_URL + "?a"),
            page_record(chunk_then_garbage(PAGE), [("Transfer-Encoding", "chunked")], url=PAGE_URL + "?b"),
            page_record(*STORED_PAGES["gzip"]),
            image_record(),
        ],
    )
    (inputs / "old.arc").write_bytes(arc_file([(PAGE_URL, "text/html", PAGE)]))
    run_local([inputs], tmp_path / "out", _config())
    report = (tmp_path / "out" / "funnel.md").read_text()
    for line in (
        "| read | record | dropped: bad_content_encoding | 1 |",
        "| read | record | dropped: bad_transfer_encoding | 1 |",
        "| read | file | dropped: arc_not_supported | 1 |",
        "| parse | page | kept | 1 |",
    ):
        assert line in report, report


# Images -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (gzip.compress(PHOTO), [("Content-Encoding", "gzip")]),
        (chunked(PHOTO, 4096), [("Transfer-Encoding", "chunked")]),
        (chunked(deflate(PHOTO)), [("Transfer-Encoding", "chunked"), ("Content-Encoding", "deflate")]),
    ],
    ids=["gzip", "chunked", "chunked-deflate"],
)
def test_an_image_stored_as_sent_is_read_as_its_bytes(tmp_path, body, headers):
    path = write_warc(tmp_path / "crawl.warc.gz", [page_record(), image_record(body, headers)])
    assert WarcImageResolver(str(path)).fetch(PHOTO_URL, 1 << 22) == (PHOTO, None)
    out, tally = parse(scan(path)[0])
    assert out["image"] == [PHOTO] and tally.get_count("parse", "image", KEPT) == 1


@pytest.mark.parametrize(
    ("body", "headers", "reason"),
    [
        (BOMB, [("Content-Encoding", "gzip")], "image_too_large"),
        (gzip.compress(PHOTO)[:-50] + bytes(50), [("Content-Encoding", "gzip")], "bad_content_encoding"),
        (chunk_then_garbage(PHOTO), [("Transfer-Encoding", "chunked")], "bad_transfer_encoding"),
    ],
    ids=["gzip-bomb", "corrupt-gzip", "a-chunk-then-no-chunk-size"],
)
def test_an_image_that_cannot_be_decoded_is_a_counted_drop(tmp_path, body, headers, reason):
    path = write_warc(tmp_path / "crawl.warc.gz", [page_record(), image_record(body, headers)])
    assert WarcImageResolver(str(path)).fetch(PHOTO_URL, 1 << 20) == (None, reason)
    out, tally = parse(scan(path)[0], ParseConfig(max_image_bytes=1 << 20))
    assert out["image"] == [] and tally.get_count("parse", "image", reason) == 1


@pytest.mark.parametrize(
    "headers",
    [
        [("Transfer-Encoding", "chunked")],
        [("Content-Encoding", "gzip")],
        [("Content-Encoding", "deflate")],
        [("Transfer-Encoding", "chunked"), ("Content-Encoding", "deflate")],
    ],
    ids=["chunked", "gzip", "deflate", "chunked-deflate"],
)
def test_an_image_already_decoded_under_its_coding_headers_is_read_as_its_bytes(tmp_path, headers):
    path = write_warc(tmp_path / "crawl.warc.gz", [page_record(), image_record(PHOTO, headers)])
    assert WarcImageResolver(str(path)).fetch(PHOTO_URL, 1 << 22) == (PHOTO, None)
    out, tally = parse(scan(path)[0])
    assert out["image"] == [PHOTO] and tally.get_count("parse", "image", KEPT) == 1


# ARC files ----------------------------------------------------------------------------------------------------------


def arc_file(records: list[tuple[str, str, bytes]]) -> bytes:
    """An ARC (version 1) file of HTTP responses, as the Internet Archive wrote them before WARC."""
    version = b"1 0 InternetArchive\nURL IP-address Archive-date Content-type Archive-length\n"
    out = b"filedesc://old.arc 0.0.0.0 20050101000000 text/plain %d\n%s\n" % (len(version), version)
    for url, content_type, body in records:
        block = f"HTTP/1.0 200 OK\r\nContent-Type: {content_type}\r\n\r\n".encode() + body
        out += f"{url} 192.0.2.1 20050101000000 {content_type} {len(block)}\n".encode() + block + b"\n"
    return out


@pytest.mark.parametrize("name", ["old.arc", "old.arc.gz"])
def test_an_arc_file_is_counted_and_named(tmp_path, name, caplog):
    data = arc_file([(PAGE_URL, "text/html", PAGE), (PHOTO_URL, "image/jpeg", PHOTO)])
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with caplog.at_level(logging.WARNING, logger="imagebert_hf.curation.inputs"):
        pages, tally = scan(path)
    assert pages == [] and dict(tally) == {"read/file/arc_not_supported": 1}
    (message,) = [record.getMessage() for record in caplog.records if str(path) in record.getMessage()]
    assert "ARC file" in message and "warcio recompress" in message
    with pytest.raises(NoPagesError, match="file/arc_not_supported: 1"):
        run_local([path], tmp_path / "out", _config(), require_pages=True)


# Lazy-loaded images -------------------------------------------------------------------------------------------------

GIF = synthetic.encode_image(Image.new("P", (1, 1)), "GIF")  # what lazy loaders put in src
DATA_GIF = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"
LAZY = {
    "data-uri-and-data-src": f'src="{DATA_GIF}" data-src="{{photo}}"',
    "no-src-and-data-lazy-src": 'data-lazy-src="{photo}"',
    "empty-src-and-data-original": 'src="" data-original="{photo}"',
    "blank-gif-and-data-src": 'src="{folder}blank.gif" data-src="{photo}"',
    "placeholder-gif-and-srcset": (
        'src="{folder}lazy-placeholder.gif" srcset="{folder}small.jpg 320w, {photo} 1280w, {folder}mid.jpg 640w"'
    ),
    "data-uri-and-data-srcset": f'src="{DATA_GIF}" data-srcset="{{folder}}small.jpg 1x, {{photo}} 2x"',
    "real-src-kept": 'src="{photo}" data-src="{folder}small.jpg" srcset="{folder}mid.jpg 640w"',
}


def lazy_page(attributes: str) -> str:
    page = synthetic.page_html("The harbour", "REAL", alt=ALT, paragraphs=synthetic.FILLER_PARAGRAPHS[:3])
    return page.replace('src="REAL"', attributes)


@pytest.mark.parametrize("case", list(LAZY))
def test_a_lazy_loaded_image_in_a_saved_page_is_its_real_picture(tmp_path, case):
    files = tmp_path / "harbour_files"
    files.mkdir()
    small, mid = photo_bytes((200, 150), seed=1), photo_bytes((640, 480), seed=2)
    for name, data in (("harbour.jpg", PHOTO), ("blank.gif", GIF), ("lazy-placeholder.gif", GIF)):
        (files / name).write_bytes(data)
    (files / "small.jpg").write_bytes(small)
    (files / "mid.jpg").write_bytes(mid)
    page = tmp_path / "harbour.html"
    page.write_text(lazy_page(LAZY[case].format(photo="harbour_files/harbour.jpg", folder="harbour_files/")))
    out, tally = parse(scan(page)[0])
    assert out["image"] == [PHOTO], tally
    assert [url.rsplit("/", 2)[-2:] for url in out["image_url"]] == [["harbour_files", "harbour.jpg"]]
    assert out["texts"][0][0] == ALT


def test_a_lazy_loaded_image_in_a_warc_is_the_largest_of_its_srcset(tmp_path):
    attributes = (
        f'src="{DATA_GIF}" data-srcset="/img/harbour-320.jpg 320w, /img/harbour.jpg 1280w, /img/harbour-640.jpg 640w"'
    )
    records = [
        page_record(gzip.compress(lazy_page(attributes).encode()), [("Content-Encoding", "gzip")]),
        image_record(photo_bytes((320, 240), seed=3), url="https://news.example.com/img/harbour-320.jpg"),
        image_record(photo_bytes((640, 480), seed=4), url="https://news.example.com/img/harbour-640.jpg"),
        image_record(gzip.compress(PHOTO), [("Content-Encoding", "gzip")]),
    ]
    config = _config()
    config.images.min_side = 100
    result = run_local([write_warc(tmp_path / "crawl.warc.gz", records)], tmp_path / "out", config)
    assert result.dataset["text"] == [ALT]
    assert result.dataset["image"] == [PHOTO] and result.dataset["image_url"] == [PHOTO_URL]
