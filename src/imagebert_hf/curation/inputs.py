"""Reading the inputs: WARC files (plain or gzip) and folders of saved HTML pages.

Scanning turns every input into page records (`PAGE_COLUMNS`) and counts every record it skips (stage `read`).
Image bytes are not copied into page records: the parse stage asks an `ImageResolver` for the few images it needs,
which reads them from the same WARC by offset, or from the files saved next to the page. Memory therefore stays
bounded by one page and one image at a time, whatever the size of the archive.

Inputs are local paths or any fsspec URL (`s3://`, `gs://`, `hdfs://`, `https://`, `memory://`, chained URLs such
as `simplecache::s3://...`): folders are listed and files opened through fsspec, so a source found on the driver is
read by its URL wherever it is parsed. `file://` URLs are read as the local paths they name.
"""

from __future__ import annotations

import functools
import glob
import os
import posixpath
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from urllib.parse import quote, unquote, urldefrag, urlsplit, urlunsplit

from transformers.utils import logging

from .config import ParseConfig
from .tally import INPUT, KEPT, Tally


logger = logging.get_logger(__name__)

WARC_SUFFIXES = (".warc", ".warc.gz", ".arc", ".arc.gz")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
HTML_TYPES = ("text/html", "application/xhtml+xml")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".avif")
_GZIP_MAGIC = b"\x1f\x8b\x08"
_GZIP_ID = _GZIP_MAGIC[:2]
_WARC_MAGIC = b"WARC/1."
_SCAN_CHUNK = 1 << 20

PAGE_COLUMNS = ("page_id", "page_url", "source", "html", "charset")


@dataclass(frozen=True)
class Source:
    """One input unit: a WARC file, or one saved HTML page (`root` is the folder the user gave)."""

    kind: str
    path: str
    root: str = ""

    def to_dict(self) -> dict:
        return {"kind": self.kind, "path": self.path, "root": self.root}


def is_url(path: str) -> bool:
    """Whether `path` is an fsspec URL (`s3://...`, `memory://...`, `simplecache::...`) rather than a local path."""
    return "://" in path or "::" in path


def _local(item: str | os.PathLike) -> str:
    """A local path as it is, a `file://` URL as the path it names, any other URL unchanged."""
    item = os.fspath(item)
    return item.removeprefix("file://") if item.startswith("file://") else item


def open_input(path: str):
    """A binary file object of a local path or an fsspec URL (a context manager; close it)."""
    if is_url(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def input_version(path: str) -> tuple:
    """What changes when the file at `path` (local or URL) is rewritten: its modification time and size."""
    if not is_url(path):
        stat = os.stat(path)
        return stat.st_mtime_ns, stat.st_size
    from fsspec.core import url_to_fs

    return _store_version(*url_to_fs(path))


def _store_version(fs, path: str) -> tuple:
    """`input_version` of a file of an fsspec filesystem: its size and what the store says changes with it."""
    info = fs.info(path)
    marks = ("mtime", "LastModified", "last_modified", "updated", "created", "ETag", "etag", "md5")
    return (info.get("size"), *(str(info[key]) for key in marks if info.get(key) is not None))


def _discover_url(url: str) -> list[Source]:
    """The sources under an fsspec URL: a file, a folder (listed recursively) or a glob pattern."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(url)
    magic = [root.index(char) for char in "*?[" if char in root]
    in_folder = not magic and fs.isdir(root)
    if magic:
        base = root[: min(magic)].rsplit("/", 1)[0]  # the folder the pattern starts from
        matches = fs.glob(root, detail=True)
        folders = {path.rstrip("/") for path, info in matches.items() if info.get("type") == "directory"}
        paths = [path for path, info in matches.items() if info.get("type") == "file"]
        if not paths:
            raise FileNotFoundError(f"input not found: no file matches {url}")
        # A file inside a matched folder is taken as that folder's files are (`site/**` reads what `site/` reads):
        # the images saved next to pages are not WARC files.
        paths = sorted(
            path
            for path in paths
            if path.lower().endswith((*WARC_SUFFIXES, *HTML_SUFFIXES))
            or not any(str(parent) in folders for parent in PurePosixPath(path).parents)
        )
    elif in_folder:
        base, paths = root.rstrip("/"), sorted(fs.find(root))
    elif fs.isfile(root):
        base, paths = root, [root]
    else:
        raise FileNotFoundError(f"input not found: {url}")
    # Found files keep the URL as the user wrote it (protocol options, chained URLs): the URL up to `base`, then
    # each file's path below it.
    pattern = root[len(base) :].rstrip("/")
    start = url.rstrip("/")
    start = start[: len(start) - len(pattern)] if start.endswith(pattern) else None
    sources = []
    for path in paths:
        child = start + path[len(base) :] if start is not None and path.startswith(base) else fs.unstrip_protocol(path)
        name = child.rsplit("/", 1)[-1].lower()
        if name.endswith(HTML_SUFFIXES):
            # Page URLs are reported relative to the folder given, as for local folders.
            sources.append(Source("html", child, start if in_folder and start else child.rsplit("/", 1)[0]))
        elif name.endswith(WARC_SUFFIXES) or not in_folder:
            sources.append(Source("warc", child))
    return sources


def _local_sources(paths: list[Path], given: str) -> list[Source]:
    """The sources of local files and folders (a folder: its WARC and HTML files, found recursively)."""
    sources = []
    for path in paths:
        if path.is_dir():
            for sub in sorted(p for p in path.rglob("*") if p.is_file()):
                name = sub.name.lower()
                if name.endswith(WARC_SUFFIXES):
                    sources.append(Source("warc", str(sub)))
                elif name.endswith(HTML_SUFFIXES):
                    sources.append(Source("html", str(sub), str(path)))
        elif path.name.lower().endswith(HTML_SUFFIXES):
            sources.append(Source("html", str(path), str(path.parent)))
        elif path.is_file():
            sources.append(Source("warc", str(path)))
        else:
            raise FileNotFoundError(f"input not found: {path} (from {given})")
    return sources


def discover_sources(inputs: list[str | os.PathLike]) -> list[Source]:
    """Expands files, folders and glob patterns (local paths or fsspec URLs, see the module docstring) into a sorted
    list of sources (sorting keeps reruns identical). In a folder, files named like WARCs or HTML pages are taken; a
    file given by name is a WARC unless it is named like an HTML page. A local pattern (`crawl/*.warc.gz`, quoted
    so that the shell leaves it alone) is expanded here, like a URL's; a file it matches inside a folder it also
    matches is taken as that folder's files are (`site/**` reads what `site/` reads). A file named by several
    inputs (`site/` and `site/sub/`) is one source.

    Raises:
        TypeError: `inputs` is a single string rather than a list of them.
        FileNotFoundError: an input (or a pattern's match) does not exist; the message names it.
        ValueError: the inputs hold no WARC or HTML file at all.
    """
    if isinstance(inputs, (str, bytes, os.PathLike)):
        raise TypeError(f"inputs must be a list of paths or URLs, got the single {type(inputs).__name__} {inputs!r}.")
    inputs = list(inputs)
    if not inputs:
        raise ValueError("inputs is empty: give WARC files, HTML pages, folders or glob patterns.")
    sources: list[Source] = []
    for item in inputs:
        if not isinstance(item, (str, os.PathLike)) or not os.fspath(item):
            raise TypeError(f"every input must be a non-empty path or URL string, got {item!r}.")
        item = _local(item)
        if is_url(item):
            sources.extend(_discover_url(item))
            continue
        if not os.path.exists(item) and any(char in item for char in "*?["):
            matches = [Path(match) for match in sorted(glob.glob(item, recursive=True))]
            if not matches:
                raise FileNotFoundError(f"input not found: no file matches the pattern {item}")
            # A file inside a matched folder is left to that folder's scan (`site/**` reads what `site/` reads):
            # the images saved next to pages are not WARC files.
            folders = {match.resolve() for match in matches if match.is_dir()}
            matches = [
                match
                for match in matches
                if match.is_dir() or not any(parent in folders for parent in match.resolve().parents)
            ]
            sources.extend(_local_sources(matches, item))
            continue
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {item}")
        sources.extend(_local_sources([path], item))
    if not sources:
        raise ValueError(
            f"no WARC (.warc, .warc.gz) or HTML file in inputs {inputs}: a folder is searched for files with those "
            "names."
        )
    return _distinct_files(sources)


def _distinct_files(sources: list[Source]) -> list[Source]:
    """One source per file: inputs that overlap (`site/` and `site/sub/`, a `**` pattern and its folders) name the
    same file several times, and a page read twice would give two records with one id. A page keeps the outermost
    folder given as its root, so its `file:` URL is the same as when that folder alone is the input."""

    depths: dict[str, int] = {"": 0}

    def root_depth(source: Source) -> int:
        if source.root not in depths:
            depths[source.root] = len(_locations(source.root, expand=False)[0][1].parts)
        return depths[source.root]

    chosen: dict[tuple, Source] = {}
    for source in sorted(set(sources), key=lambda s: (root_depth(s), s.path, s.kind)):
        chosen.setdefault(_locations(source.path, expand=False)[0], source)
    return sorted(chosen.values(), key=lambda s: (s.path, s.kind))


def _has_magic(path: str) -> bool:
    return any(char in path for char in "*?[")


def _location(fs, path: str) -> tuple[str, PurePath]:
    """`(filesystem, absolute path)` of a path on `fs`: local paths resolved (symlinks, `..`), others as written."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return "local", Path(path).resolve()
    return protocol, PurePosixPath("/" + path.lstrip("/"))


def _locations(item: str | os.PathLike, expand: bool = True) -> list[tuple[str, PurePath]]:
    """Where an input points (a file, a folder, or with `expand` each match of a glob pattern), or an output."""
    item = _local(item)
    if not is_url(item):
        # "~" as the runners read and write it (they expand it): unexpanded, "~/in/out" would not lie inside "/home/in".
        item = os.path.expanduser(item)
        if expand and not os.path.exists(item) and _has_magic(item):
            return [("local", Path(match).resolve()) for match in glob.glob(item, recursive=True)]
        return [("local", Path(item).resolve())]
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(item)
    paths = fs.glob(path) if expand and _has_magic(path) else [path]
    return [_location(fs, match) for match in paths]


def check_output_apart(
    inputs: list[str | os.PathLike], output_dir: str | os.PathLike, flag: str = "output_dir"
) -> None:
    """Raises ValueError naming `flag` when the output folder is an input, lies inside one, or contains one: a run
    replaces its `data/` folder and its report files, and must never write among the files it reads. Local paths
    are compared resolved; URLs by filesystem and path (a URL and a local path never overlap)."""
    (output,) = _locations(output_dir, expand=False)
    for item in inputs:
        local = _local(item)
        if output[0] == "local" and is_url(local) and not local.startswith("local://"):
            continue  # a remote input cannot overlap a local folder; listing it would reach the store
        for kind, path in _locations(item):
            if kind != output[0]:
                continue
            if path == output[1]:
                where = "is the input"
            elif path in output[1].parents:
                where = "is inside the input"
            elif output[1] in path.parents:
                where = "contains the input"
            else:
                continue
            raise ValueError(
                f"{flag} {os.fspath(output_dir)} {where} {os.fspath(item)}; a run replaces data/ and the report files "
                f"of its output folder, so the output must lie apart from the inputs: choose another {flag}."
            )


def _page_row(page_id: str, page_url: str, source: str, html: bytes, charset: str | None) -> dict:
    return {"page_id": page_id, "page_url": page_url, "source": source, "html": html, "charset": charset}


def scan_source(source: Source | dict, config: ParseConfig, tally: Tally) -> Iterator[dict]:
    """Yields the page records of one source and counts in `tally` every record that is not a page."""
    if isinstance(source, dict):
        source = Source(**source)
    if source.kind == "warc":
        yield from _scan_warc(source.path, config, tally)
    else:
        yield from _scan_html_file(source, config, tally)


def _scan_html_file(source: Source, config: ParseConfig, tally: Tally) -> Iterator[dict]:
    tally.add("read", "record", INPUT)
    try:
        with open_input(source.path) as handle:
            html = handle.read(config.max_page_bytes + 1)
    except OSError:
        tally.drop("read", "record", "unreadable_file")
        return
    if len(html) > config.max_page_bytes:
        tally.drop("read", "record", "page_too_large")
        return
    if is_url(source.path):
        rel = posixpath.relpath(source.path, source.root) if source.root else source.path.rsplit("/", 1)[-1]
    else:
        path = Path(source.path)
        rel = path.relative_to(source.root).as_posix() if source.root else path.name
    tally.add("read", "record", KEPT)
    yield _page_row(source.path, f"file:{rel}", source.path, html, None)


def _is_gzip(path: str) -> bool:
    with open_input(path) as f:
        return f.read(3) == _GZIP_MAGIC


def _next_marker(f, start: int, marker: bytes) -> int | None:
    """Offset of the next record start at or after `start`, found by its magic bytes (resynchronisation)."""
    pos = start
    tail = b""
    while True:
        f.seek(pos)
        chunk = f.read(_SCAN_CHUNK)
        if not chunk:
            return None
        data = tail + chunk
        hit = data.find(marker)
        if hit >= 0:
            return pos - len(tail) + hit
        tail = data[-(len(marker) - 1) :]
        pos += len(chunk)


def iter_warc_records(path: str, tally: Tally, max_resyncs: int, **iterator_kwargs) -> Iterator:
    """Iterates the records of a WARC file, skipping unreadable segments instead of stopping at the first one.

    fastwarc stops a file at the first corrupt gzip member or invalid header; this restarts it at the next record
    start (gzip member or `WARC/1.` line) and counts each restart as `unreadable_segment`.
    """
    from fastwarc.warc import ArchiveIterator

    marker = _GZIP_MAGIC if _is_gzip(path) else _WARC_MAGIC
    with open_input(path) as f:
        # `counted`: where the last segment counted starts, so that retrying it is not counted a second time.
        start, resyncs, counted = 0, 0, -1
        while True:
            f.seek(start)
            last = None
            try:
                for record in ArchiveIterator(f, quirks_mode=True, **iterator_kwargs):
                    last = record.stream_pos
                    yield record
                return
            except OSError as err:
                logger.debug("unreadable segment in %s after offset %s: %s", path, last, err)
            if last is None:
                # Nothing read since `start`: the segment starting there is unreadable; go on after it.
                failed, nxt = start, _next_marker(f, start + 1, marker)
            else:
                # Most often the record after the last one read is unreadable; it is retried once, since the
                # iterator may instead have failed in the rest of the last record.
                failed = nxt = _next_marker(f, last + 1, marker)
            if failed != counted:
                # An unreadable segment stands for at least one record: counted in and dropped.
                counted = failed
                tally.add("read", "record", INPUT)
                tally.drop("read", "record", "unreadable_segment")
                resyncs += 1
                if resyncs > max_resyncs:
                    tally.drop("read", "file", "too_many_unreadable_segments")
                    return
            if nxt is None:
                return
            start = nxt


def _content_type(record) -> str:
    try:
        return (record.http_content_type or "").lower()
    except Exception:
        return ""


def _target_uri(record) -> str:
    return record.headers.get("WARC-Target-URI", "") or ""


def _is_image_record(content_type: str, url: str) -> bool:
    return content_type.startswith("image/") or urlsplit(url).path.lower().endswith(IMAGE_EXTENSIONS)


class HttpBodyError(ValueError):
    """A stored HTTP body that cannot be decoded; `reason` is the drop reason it is counted as
    (`bad_transfer_encoding`, `bad_content_encoding` or `unsupported_content_encoding`)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class HttpBodyTooLarge(HttpBodyError):
    """The decoded body would exceed the size limit; the caller counts it as its own too-large reason."""

    def __init__(self, max_bytes: int):
        super().__init__("too_large", f"the decoded body exceeds {max_bytes} bytes")


_GZIP_CODINGS = ("gzip", "x-gzip")
_DEFLATE_CODINGS = ("deflate", "x-deflate")
# Compressions with a name this module knows but cannot undo; any other name is passed through, as browsers do
# with a content coding they do not know (`none`, `utf-8`, ... are common).
_UNDECODABLE_CODINGS = ("zstd", "compress", "x-compress", "lz4")
_MAX_CHUNK_SIZE_DIGITS = 16
_HEX_DIGITS = b"0123456789abcdefABCDEF"


def _codings(header: str | None) -> list[str]:
    """The codings an HTTP coding header lists, in the order they were applied (`identity` is none)."""
    names = (name.strip().lower() for name in (header or "").split(","))
    return [name for name in names if name and name != "identity"]


def _passed_through(coding: str, why: str) -> None:
    logger.debug("A body said to be `%s` %s: it is read as stored, already decoded by the crawler.", coding, why)


def _dechunk(body: bytes, max_bytes: int) -> bytes:
    """The data of a `Transfer-Encoding: chunked` body (chunk extensions and trailers are ignored)."""
    out = bytearray()
    pos = 0
    while True:
        end = body.find(b"\n", pos)
        line = body[pos:] if end < 0 else body[pos:end]
        size_text = line.split(b";", 1)[0].strip()
        # Only hexadecimal digits: `int` would also take a sign, `0x` or underscores.
        is_size = size_text and len(size_text) <= _MAX_CHUNK_SIZE_DIGITS and not size_text.lstrip(_HEX_DIGITS)
        if pos == 0 and not is_size:
            # Some warcprox and heritrix versions store the body de-chunked but keep the header; warcio reads a body
            # that does not start with a chunk size as it is, and so does this.
            _passed_through("chunked", "does not start with a chunk size")
            return body
        if end < 0:
            raise HttpBodyError("bad_transfer_encoding", "a chunked body ends before its last chunk")
        if not is_size:
            raise HttpBodyError("bad_transfer_encoding", f"a chunk-size line is not a hexadecimal size: {line[:40]!r}")
        size = int(size_text, 16)
        pos = end + 1
        if size == 0:
            return bytes(out)
        if pos + size > len(body):
            raise HttpBodyError("bad_transfer_encoding", "a chunk runs past the end of the body")
        if len(out) + size > max_bytes:
            raise HttpBodyTooLarge(max_bytes)
        out += body[pos : pos + size]
        pos += size
        if body.startswith(b"\r\n", pos):
            pos += 2
        elif body.startswith(b"\n", pos):
            pos += 1
        else:
            raise HttpBodyError("bad_transfer_encoding", "a chunk is not followed by a line end")


def _decode_bounded(
    decode_step: Callable[[int], bytes],
    finished: Callable[[], bool],
    decoded: bytearray,
    max_bytes: int,
    corrupt: type[Exception],
    what: str,
) -> None:
    """Runs a streaming decoder until its stream ends, appending to `decoded`, `decode_step(limit)` giving at most
    `limit` bytes a call, so that a small bomb never expands in memory beyond `max_bytes` (+1) in all. `corrupt` is
    the decoder's error, `what` names its data in the failures."""
    try:
        while len(decoded) <= max_bytes and not finished():
            chunk = decode_step(max_bytes + 1 - len(decoded))
            if not chunk:
                break
            decoded += chunk
    except corrupt as err:
        raise HttpBodyError("bad_content_encoding", f"corrupt {what} data: {err}") from None
    if len(decoded) > max_bytes:
        raise HttpBodyTooLarge(max_bytes)
    if not finished():
        raise HttpBodyError("bad_content_encoding", f"the {what} data ends before its end of stream")


def _inflate(data: bytes, wbits: int, max_bytes: int) -> bytes:
    """zlib, gzip (several members too) or raw deflate data, inflated at most `max_bytes` (+1) bytes in all."""
    decoded = bytearray()
    while True:
        data = _inflate_member(data, wbits, decoded, max_bytes)
        # Bytes after the end of the stream are ignored, as browsers do, unless they start another gzip member.
        if not (wbits > zlib.MAX_WBITS and data.startswith(_GZIP_MAGIC)):
            return bytes(decoded)


def _inflate_member(data: bytes, wbits: int, decoded: bytearray, max_bytes: int) -> bytes:
    """Inflates the stream at the start of `data` onto `decoded`; returns the bytes after it."""
    inflater, pending = zlib.decompressobj(wbits), data

    def inflate_step(limit: int) -> bytes:
        nonlocal pending
        chunk = inflater.decompress(pending, limit)
        pending = inflater.unconsumed_tail
        return chunk

    _decode_bounded(inflate_step, lambda: inflater.eof, decoded, max_bytes, zlib.error, "compressed")
    return inflater.unused_data


def _first_deflate_block_breaks(data: bytes, max_bytes: int) -> bool:
    """Whether raw deflate `data` is corrupt within its first block. The block is marked as the last one, so that the
    decoder stops at its end: data that runs out, or decodes past `max_bytes`, without an error has not broken."""
    if not data:
        return False
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflater.decompress(bytes([data[0] | 1]) + data[1:], max_bytes + 1)
    except zlib.error:
        return True
    return False


def _inflate_deflate_coding(data: bytes, max_bytes: int) -> bytes:
    # HTTP's deflate is zlib-wrapped, but many servers send raw deflate: the zlib header tells them apart.
    wrapped = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
    try:
        return _inflate(data, zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS, max_bytes)
    except HttpBodyTooLarge:
        raise
    except HttpBodyError:
        # Raw deflate has no magic number, and the first bytes of a page or image often decode as a few bytes of a
        # fixed-Huffman block before failing: only data whose first block breaks in both framings is taken as
        # already decompressed, so that deflate data which breaks later is still refused.
        if _first_deflate_block_breaks(data, max_bytes) and (
            not wrapped or _first_deflate_block_breaks(data[2:], max_bytes)
        ):
            _passed_through("deflate", "is not deflate data")
            return data
        raise


def _unbrotli(data: bytes, max_bytes: int) -> bytes:
    try:
        import brotli
    except ImportError:
        raise HttpBodyError("unsupported_content_encoding", "br needs the brotli module") from None
    decompressor = brotli.Decompressor()
    if not hasattr(decompressor, "can_accept_more_data"):
        # Older brotli releases cannot bound their output: decoding would allocate whatever the data expands to.
        raise HttpBodyError("unsupported_content_encoding", "br needs brotli>=1.2 to bound the decoded size")
    pending = data

    def brotli_step(limit: int) -> bytes:
        nonlocal pending
        if not pending and decompressor.can_accept_more_data():  # it needs input there is no more of
            return b""
        chunk, pending = decompressor.process(pending, output_buffer_limit=limit), b""
        return chunk

    decoded = bytearray()
    _decode_bounded(brotli_step, decompressor.is_finished, decoded, max_bytes, brotli.error, "brotli")
    return bytes(decoded)


def _undo_coding(data: bytes, coding: str, max_bytes: int) -> bytes:
    if coding == "chunked":
        return _dechunk(data, max_bytes)
    if coding in _GZIP_CODINGS:
        if not data.startswith(_GZIP_ID):
            # Decompressed by the crawler under the header that still says gzip (warcio reads it as it is).
            _passed_through(coding, "does not start with the gzip magic number")
            return data
        return _inflate(data, 16 + zlib.MAX_WBITS, max_bytes)
    if coding in _DEFLATE_CODINGS:
        return _inflate_deflate_coding(data, max_bytes)
    if coding == "br":
        return _unbrotli(data, max_bytes)
    if coding in _UNDECODABLE_CODINGS:
        raise HttpBodyError("unsupported_content_encoding", f"no decoder for the {coding} coding")
    return data


def decode_http_body(
    body: bytes, transfer_encoding: str | None, content_encoding: str | None, max_bytes: int
) -> bytes:
    """An HTTP body as stored by crawlers that keep it as sent (wget, warcprox, Browsertrix), decoded: the transfer
    codings (`chunked`) are undone, then the content codings (`gzip`/`x-gzip`, `deflate`, `br` when the brotli
    module is installed), each list in the reverse of the order it names them. Common Crawl stores decoded bodies
    and renames these headers `X-Crawler-*`: pass only the real `Transfer-Encoding` and `Content-Encoding`.

    Some crawlers store a body already decoded under the headers that still name its codings; as warcio does, a
    body said to be chunked whose first line is not a chunk size, said to be gzip without the gzip magic number, or
    said to be deflate whose first block breaks both zlib-wrapped and raw, is taken as it is (logged at debug level).

    Every step is bounded by `max_bytes`, so a small compressed bomb is refused without being expanded.

    Raises:
        HttpBodyTooLarge: the decoded body would exceed `max_bytes`.
        HttpBodyError: a chunked body or compressed data that starts well and then breaks (`reason` names which), or a
            compression with no decoder here (`unsupported_content_encoding`).
    """
    if not body:
        return body
    for coding in [*_codings(content_encoding), *_codings(transfer_encoding)][::-1]:
        body = _undo_coding(body, coding, max_bytes)
    if len(body) > max_bytes:
        raise HttpBodyTooLarge(max_bytes)
    return body


def _http_codings(record) -> tuple[str, str]:
    """The record's `Transfer-Encoding` and `Content-Encoding`, each header given several times joined in order."""
    if not record.is_http:
        return "", ""
    headers = record.http_headers
    return tuple(", ".join(headers.get_multiple(name) or ()) for name in ("Transfer-Encoding", "Content-Encoding"))


def warc_signature_problem(path: str) -> str | None:
    """Why a file named like a WARC cannot be read as one (`empty_file`, `not_a_warc_file`, or `arc_not_supported`
    for an ARC file, which starts with `filedesc://`), or None when it starts like a WARC (`WARC/`), plain or in a
    gzip member."""
    with open_input(path) as f:
        head = f.read(1 << 16)
    if not head:
        return "empty_file"
    if head.startswith(_GZIP_MAGIC):
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 64)
        except zlib.error:
            return "not_a_warc_file"
    head = head.lstrip()
    if head.startswith(b"filedesc://"):
        # fastwarc reads no record of an ARC file: counted, so that its pages are never silently missing.
        return "arc_not_supported"
    return None if head.startswith(b"WARC/") else "not_a_warc_file"


def _scan_warc(path: str, config: ParseConfig, tally: Tally) -> Iterator[dict]:
    from fastwarc.warc import WarcRecordType

    problem = warc_signature_problem(path)
    if problem == "arc_not_supported":
        logger.warning(
            "%s is an ARC file, which is not read: it is counted as read/file/%s and skipped. Convert it to a WARC "
            "(`warcio recompress crawl.arc.gz crawl.warc.gz`, from the warcio package) and give the WARC instead.",
            path,
            problem,
        )
        tally.drop("read", "file", problem)
        return
    if problem is not None:
        # Counted, never silently zero pages: the funnel report shows the file and the reason.
        logger.warning(
            "%s is not a WARC file (%s); it is counted as read/file/%s and skipped.", path, problem, problem
        )
        tally.drop("read", "file", problem)
        return
    for record in iter_warc_records(path, tally, config.max_resyncs_per_file, parse_http=True):
        tally.add("read", "record", INPUT)
        if record.record_type == WarcRecordType.unknown:
            tally.drop("read", "record", "malformed_record")
            continue
        if record.record_type != WarcRecordType.response:
            tally.drop("read", "record", "not_a_response")
            continue
        url = _target_uri(record)
        if not url or not (record.headers.get("Content-Length") or "").strip().isdigit():
            tally.drop("read", "record", "malformed_record")
            continue
        ctype = _content_type(record)
        status = getattr(record.http_headers, "status_code", None) if record.is_http else None
        if status is not None and status != 200:
            tally.drop("read", "record", "http_status_not_200")
            continue
        if _is_image_record(ctype, url):
            # Indexed by the resolver; image records are not pages.
            tally.drop("read", "record", "image_record")
            continue
        if not ctype.startswith(HTML_TYPES):
            tally.drop("read", "record", "not_html")
            continue
        if record.content_length > config.max_page_bytes:
            tally.drop("read", "record", "page_too_large")
            continue
        try:
            html = record.reader.read(config.max_page_bytes + 1)
        except OSError:
            tally.drop("read", "record", "truncated_record")
            continue
        # Truncation is judged on the bytes stored, before any decoding changes their length.
        if len(html) < record.content_length:
            tally.drop("read", "record", "truncated_record")
            continue
        if len(html) > config.max_page_bytes:
            tally.drop("read", "record", "page_too_large")
            continue
        try:
            html = decode_http_body(html, *_http_codings(record), config.max_page_bytes)
        except HttpBodyTooLarge:
            tally.drop("read", "record", "page_too_large")
            continue
        except HttpBodyError as err:
            tally.drop("read", "record", err.reason)
            continue
        charset = record.http_charset if record.is_http else None
        tally.add("read", "record", KEPT)
        yield _page_row(f"{path}#{record.stream_pos}", url, path, html, charset)


# Left as written when a URL is put in canonical form: reserved characters (`/` and `%2F`, `&` and `%26` mean
# different things) and `%` itself, whose escapes are normalised on their own.
_URL_KEEP = "!#$&'()*+,/:;=?@[]%"
_URL_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _canonical_component(text: str) -> str:
    """A path or query as a browser requests it: spaces and non-ASCII letters percent-encoded (UTF-8), escapes in
    upper case, and escaped unreserved characters (`%41`, `%7E`) written out."""

    def escape(match: re.Match) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else f"%{match.group(1).upper()}"

    return _URL_ESCAPE.sub(escape, quote(text, safe=_URL_KEEP))


def normalize_url(url: str) -> str:
    """The form under which an image's URL is indexed and looked up: a page's `<img src="/my dog.jpg">` names the
    capture stored as `/my%20dog.jpg`, `café.jpg` the one stored as `caf%C3%A9.jpg`, and `HTTP://Ex.COM/a.jpg` the one
    stored as `http://ex.com/a.jpg`. The fragment is dropped: it is never sent to the server."""
    url = urldefrag(url.strip())[0]
    try:
        parts = urlsplit(url)
        userinfo, at, host = parts.netloc.rpartition("@")
        path, query = _canonical_component(parts.path), _canonical_component(parts.query)
    except ValueError:  # `http://[host/x.jpg`, or a lone surrogate: no URL to normalise, matched only as written
        return url
    return urlunsplit((parts.scheme.lower(), f"{userinfo}{at}{host.lower()}", path, query, ""))


class ImageResolver:
    """Finds the bytes of an image referenced by a page. `fetch` returns `(bytes, None)` or `(None, reason)`."""

    def fetch(self, url: str, max_bytes: int) -> tuple[bytes | None, str | None]:
        raise NotImplementedError


class WarcImageResolver(ImageResolver):
    """Reads image payloads from the WARC holding the page, by the offset of their response record."""

    def __init__(self, path: str, max_resyncs: int = 1000):
        self.path = path
        self.offsets: dict[str, int] = {}
        index_tally = Tally()
        from fastwarc.warc import WarcRecordType

        for record in iter_warc_records(path, index_tally, max_resyncs, parse_http=True):
            try:
                # Only a 200 response holds the image: crawlers store each capture's request record before its
                # response, and a redirect or an error page may come first.
                if record.record_type != WarcRecordType.response or not record.is_http:
                    continue
                if getattr(record.http_headers, "status_code", None) != 200:
                    continue
                url = _target_uri(record)
                if _is_image_record(_content_type(record), url):
                    # The first capture wins, as in a replay: later duplicates are ignored.
                    self.offsets.setdefault(normalize_url(url), record.stream_pos)
            except Exception:  # noqa: S112 - an unindexable record only means its image is not found later
                continue

    def fetch(self, url: str, max_bytes: int) -> tuple[bytes | None, str | None]:
        from fastwarc.warc import ArchiveIterator

        key = normalize_url(url)
        pos = self.offsets.get(key)
        if pos is None and key.startswith(("http://", "https://")):
            other = "https://" + key[7:] if key.startswith("http://") else "http://" + key[8:]
            pos = self.offsets.get(other)
        if pos is None:
            return None, "image_not_archived"
        try:
            with open_input(self.path) as f:
                f.seek(pos)
                record = next(iter(ArchiveIterator(f, quirks_mode=True, parse_http=True)))
                if record.content_length > max_bytes:
                    return None, "image_too_large"
                data = record.reader.read(max_bytes + 1)
                codings = _http_codings(record)
        except (OSError, StopIteration):
            return None, "image_record_unreadable"
        if len(data) < record.content_length:
            return None, "image_record_unreadable"
        try:
            return decode_http_body(data, *codings, max_bytes), None
        except HttpBodyTooLarge:
            return None, "image_too_large"
        except HttpBodyError as err:
            return None, err.reason


class FolderImageResolver(ImageResolver):
    """Reads images saved next to an HTML page (as browsers save them: relative paths or `<page>_files/`)."""

    def __init__(self, page_path: str):
        self.page = Path(page_path)
        self.folder = self.page.parent.resolve()

    def _relative_candidates(self, url: str) -> list[str]:
        """Where the image of `url` may lie, relative to the page's folder (an absolute path stays absolute)."""
        parts = urlsplit(url)
        name = Path(unquote(parts.path)).name
        if parts.scheme in ("", "file") and not parts.netloc:
            rel = unquote(parts.path).lstrip("/") if parts.scheme == "file" else unquote(parts.path)
            return [rel, f"{self.page.stem}_files/{name}"]
        return [f"{self.page.stem}_files/{name}", name]

    def _file_in_folder(self, candidate: str):
        """The candidate's file when it exists inside the page's folder, else None."""
        try:
            resolved = (self.folder / candidate).resolve()
        except (OSError, RuntimeError):
            return None
        return resolved if self.folder in resolved.parents and resolved.is_file() else None

    def _size(self, path) -> int:
        return path.stat().st_size

    def _read(self, path) -> bytes:
        return path.read_bytes()

    def _version(self, path) -> tuple:
        return input_version(str(path))

    def _locate(self, url: str):
        """The file `fetch(url)` reads: the first candidate that exists inside the page's folder (never one outside
        it, whatever the page links to), or None."""
        if url.startswith("data:"):
            return None
        for candidate in self._relative_candidates(url):
            path = self._file_in_folder(candidate)
            if path is not None:
                return path
        return None

    def image_version(self, url: str) -> list[str] | None:
        """The file `fetch(url)` would read now and its version (`input_version`), or None when there is none: what
        a rerun compares to tell an image rewritten, added or removed next to an unchanged page."""
        path = self._locate(url)
        if path is None:
            return None
        try:
            return [str(path), *(str(mark) for mark in self._version(path))]
        except OSError:
            return None

    def fetch(self, url: str, max_bytes: int) -> tuple[bytes | None, str | None]:
        if url.startswith("data:"):
            return None, "data_uri"
        path = self._locate(url)
        if path is None:
            return None, "image_not_archived"
        try:
            if self._size(path) > max_bytes:
                return None, "image_too_large"
            return self._read(path), None
        except OSError:
            return None, "image_record_unreadable"


class UrlFolderImageResolver(FolderImageResolver):
    """`FolderImageResolver` for a page given by an fsspec URL: the same candidates, read through fsspec."""

    def __init__(self, page_url: str):
        from fsspec.core import url_to_fs

        self.fs, page = url_to_fs(page_url)
        self.page = Path(posixpath.basename(page))
        self.folder = posixpath.dirname(page)

    def _file_in_folder(self, candidate: str):
        path = posixpath.normpath(posixpath.join(self.folder, candidate))
        inside = path.startswith(self.folder.rstrip("/") + "/")
        try:
            return path if inside and self.fs.isfile(path) else None
        except OSError:
            return None

    def _size(self, path) -> int:
        return self.fs.size(path)

    def _read(self, path) -> bytes:
        return self.fs.cat_file(path)

    def _version(self, path) -> tuple:
        return _store_version(self.fs, path)


@functools.lru_cache(maxsize=4)
def _warc_resolver(path: str, version: tuple, max_resyncs: int) -> WarcImageResolver:
    return WarcImageResolver(path, max_resyncs)


def resolver_for(source: str, max_resyncs: int = 1000) -> ImageResolver:
    """The resolver for a page's source (a local path or an fsspec URL); WARC indexes are cached per process, keyed
    by path, modification time and size."""
    if source.lower().endswith(HTML_SUFFIXES):
        return UrlFolderImageResolver(source) if is_url(source) else FolderImageResolver(source)
    return _warc_resolver(source, input_version(source), max_resyncs)


__all__ = [
    "HTML_SUFFIXES",
    "HttpBodyError",
    "HttpBodyTooLarge",
    "ImageResolver",
    "PAGE_COLUMNS",
    "Source",
    "check_output_apart",
    "decode_http_body",
    "discover_sources",
    "input_version",
    "is_url",
    "resolver_for",
    "scan_source",
    "warc_signature_problem",
]
