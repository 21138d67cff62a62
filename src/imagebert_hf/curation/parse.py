"""Stage 1: page parsing. Decodes a page, keeps it when it is in a wanted language, and picks its dominant image.

The dominant image is chosen from DOM and HTML features, as the paper does: declared or real size, position in the
page, whether it sits in the main content (`main`, `article`, `figure`) or in navigation, header, footer or aside,
and whether its URL, class, id or alt text mark a logo, icon, advertisement or tracking pixel. Every other image
is counted with the reason it was not chosen. Candidate texts come from the alt and title attributes, the
figure's caption and the sentences around the image.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import warnings
from dataclasses import dataclass, field
from urllib.parse import urljoin

from transformers.utils import logging

from ..models.imagebert.roi_image_loading import open_image_file
from .config import ParseConfig
from .inputs import HTML_SUFFIXES, ImageResolver, resolver_for
from .tally import INPUT, KEPT, Tally


logger = logging.get_logger(__name__)

STAGE = "parse"
IMAGE_COLUMNS = (
    "image_id",
    "page_url",
    "source",
    "image_url",
    "image",
    "dom_score",
    "language_rank",
    "texts",
    "text_sources",
)

_LOGO = re.compile(r"(?<![a-z])(logo|icon|favicon|avatar|sprite|badge|emoji|button|btn|gravatar)s?(?![a-z])")
_AD = re.compile(
    r"(?<![a-z])(ad|ads|advert\w*|adserver|adservice|banner|sponsor\w*|doubleclick|googlesyndication|promo)(?![a-z])"
)
_PIXEL = re.compile(r"(?<![a-z])(pixel|beacon|tracking|tracker|track|spacer|blank|1x1|clear\.gif)(?![a-z])")
_PIXELS = re.compile(r"\s*(\d+)(?:\.\d*)?\s*(?:px)?\s*", re.IGNORECASE)
_CSS_SIZE = re.compile(r"(?:^|;)\s*(width|height)\s*:\s*(\d+(?:\.\d+)?)px", re.IGNORECASE)
# A sentence ends at . ! or ? and the space after it, where the next one starts in capitals (of any script), with a
# digit, a quote or a parenthesis.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_SPACE = re.compile(r"\s+")
_MAIN_TAGS = frozenset({"main", "article"})
_BOILERPLATE_TAGS = frozenset({"nav", "header", "footer", "aside", "form", "menu"})
_BLOCK_TAGS = frozenset({"p", "div", "li", "td", "section", "blockquote", "dd", "span", "a"})
_TEXT_TAGS = frozenset({"p", "div", "span", "blockquote"})
_VECTOR_EXT = (".svg", ".ico", ".svgz")
_LAZY_SRC_ATTRS = ("data-src", "data-lazy-src", "data-original")
_PLACEHOLDER = re.compile(
    r"(?<![a-z])(blank|spacer|placeholder|transparent|trans|pixel|1x1|1px|lazy|lazyload|loading|loader|spinner|empty|"
    r"dummy|grey|gray|clear|pix)(?![a-z])"
)
_PLACEHOLDER_EXT = (".gif", ".png", ".svg")
_SRCSET_URL = re.compile(r"[\s,]*(\S*)")
_SRCSET_DESCRIPTOR = re.compile(r"(\d+(?:\.\d+)?|\.\d+)([wx])", re.IGNORECASE)
_DEFAULT_SIDE = 250  # assumed side of an image that declares no size, before its real size is known
_MAX_SIZE_DIGITS = 6  # a declared side of a million pixels or more is no image's


@dataclass
class Candidate:
    index: int
    src: str
    url: str
    alt: str
    title: str
    node: object
    width: int | None = None
    height: int | None = None
    score: float = 0.0
    reason: str | None = None
    data: bytes | None = None
    extra: dict = field(default_factory=dict)


def _clean(text: str | None) -> str:
    return _SPACE.sub(" ", text or "").strip()


def _pixels(digits: str) -> int | None:
    """The whole pixels of a declared size; None for one of more than `_MAX_SIZE_DIGITS` digits, which no image
    has: hundreds of digits would overflow the page's scoring, thousands exceed what `int` converts."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_SIZE_DIGITS else None


def _int_attr(value: str | None) -> int | None:
    """A size in pixels from a width or height attribute: `640` or `640px`. A percentage (`60%`) or another unit
    says nothing about the image's pixels, so it counts as no declaration."""
    match = _PIXELS.fullmatch(value or "")
    return _pixels(match.group(1)) if match else None


def declared_size(node) -> tuple[int | None, int | None]:
    """Width and height declared by HTML attributes or inline CSS (CSS wins, as in a browser). A size no image has
    (`_pixels`) counts as no declaration, so one hostile `<img>` does not cost the page its other images."""
    width, height = _int_attr(node.getattr("width")), _int_attr(node.getattr("height"))
    for prop, value in _CSS_SIZE.findall(node.getattr("style") or ""):
        pixels = _pixels(value.partition(".")[0])
        if pixels is None:
            continue
        if prop.lower() == "width":
            width = pixels
        else:
            height = pixels
    return width, height


def _is_placeholder(src: str) -> bool:
    """Whether a src only stands in for an image a script loads later: none, a data URI, or a small stand-in file
    (`blank.gif`, `lazy-placeholder.png`)."""
    if not src or src.startswith("data:") or src in ("#", "about:blank"):
        return True
    name = src.split("?", 1)[0].split("#", 1)[0].rsplit("/", 1)[-1].lower()
    return name.endswith(_PLACEHOLDER_EXT) and _PLACEHOLDER.search(name) is not None


def _srcset_candidates(srcset: str) -> list[tuple[str, str]]:
    """`(url, descriptor)` pairs of a srcset, parsed as browsers do: a URL is a run of non-space characters (it may
    hold commas), and a comma after its descriptor ends the candidate."""
    out, pos = [], 0
    while pos < len(srcset):
        match = _SRCSET_URL.match(srcset, pos)
        url, pos = match.group(1), match.end()
        if not url:
            break
        descriptor = ""
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            end = srcset.find(",", pos)
            end = len(srcset) if end < 0 else end
            descriptor, pos = srcset[pos:end].strip(), end + 1
        if url:
            out.append((url, descriptor))
    return out


def _largest_in_srcset(srcset: str | None) -> str:
    """The srcset candidate with the largest width (`640w`) or, without widths, density (`2x`); the first one of
    equal size, and never a placeholder."""
    best, best_key = "", None
    for url, descriptor in _srcset_candidates(srcset or ""):
        if _is_placeholder(url):
            continue
        match = _SRCSET_DESCRIPTOR.fullmatch(descriptor.split()[0] if descriptor else "1x")
        # A candidate with a width outranks one with only a density: the width is the image's own pixels.
        key = (match.group(2).lower() == "w", float(match.group(1))) if match else (False, 0.0)
        if best_key is None or key > best_key:
            best, best_key = url, key
    return best


def _image_src(node) -> str:
    """The URL of an `<img>`'s picture: its src, or where a lazy loader keeps the real one while the src is a
    placeholder (`data-src`, `data-lazy-src`, `data-original`, or the largest candidate of `data-srcset` or
    `srcset`), which is what a browser shows once the page is scrolled."""
    src = (node.getattr("src") or "").strip()
    if not _is_placeholder(src):
        return src
    for name in _LAZY_SRC_ATTRS:
        lazy = (node.getattr(name) or "").strip()
        if not _is_placeholder(lazy):
            return lazy
    for name in ("data-srcset", "srcset"):
        lazy = _largest_in_srcset(node.getattr(name))
        if lazy:
            return lazy
    return src


def _ancestor_features(node, max_depth: int = 25) -> tuple[bool, bool, bool, str]:
    """Whether the node sits in main content, in a figure or in boilerplate, and its ancestors' class/id text."""
    in_main = in_figure = in_boilerplate = False
    signature = []
    current = node.parent
    depth = 0
    while current is not None and depth < max_depth and getattr(current, "tag", "#document") != "#document":
        tag = current.tag
        in_main |= tag in _MAIN_TAGS or current.getattr("role") == "main"
        in_figure |= tag == "figure"
        in_boilerplate |= tag in _BOILERPLATE_TAGS
        signature.append((current.class_name or "") + " " + (current.id or ""))
        current = current.parent
        depth += 1
    return in_main, in_figure, in_boilerplate, " ".join(signature).lower()


def _disqualify(cand: Candidate, ancestors_sig: str, config: ParseConfig) -> str | None:
    if not cand.src:
        return "no_src"
    if cand.src.startswith("data:"):
        return "data_uri"
    path = cand.url.lower().split("?")[0]
    own_sig = " ".join([path, (cand.node.class_name or ""), (cand.node.id or ""), cand.alt]).lower()
    w, h = cand.width, cand.height
    if (w is not None and w <= 2) or (h is not None and h <= 2):
        return "tracking_pixel"
    if _PIXEL.search(path) and (w is None or w < config.min_declared_side):
        return "tracking_pixel"
    if path.endswith(_VECTOR_EXT) or _LOGO.search(own_sig):
        return "logo_or_icon"
    if _AD.search(own_sig) or (ancestors_sig and _AD.search(ancestors_sig)):
        return "advertisement"
    if (w is not None and w < config.min_declared_side) or (h is not None and h < config.min_declared_side):
        return "small_declared_size"
    return None


def _dom_score(cand: Candidate, in_main: bool, in_figure: bool, in_boilerplate: bool, n_images: int) -> float:
    w = cand.width or (int(cand.height * 4 / 3) if cand.height else _DEFAULT_SIDE)
    h = cand.height or (int(cand.width * 3 / 4) if cand.width else _DEFAULT_SIDE)
    score = math.log1p(w * h) / math.log1p(1000 * 1000)
    score += 0.3 * in_main + 0.3 * in_figure - 0.6 * in_boilerplate + 0.15 * bool(cand.alt)
    # Earlier images are more often the page's subject; the penalty is bounded so position only breaks near-ties.
    score -= 0.2 * cand.index / max(1, n_images)
    return score


def _real_size(data: bytes) -> tuple[int, int] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_image_file(io.BytesIO(data)) as im:
                return im.size
    except Exception:  # header unreadable: the image-filter stage counts it
        return None


def _sentences(text: str) -> list[str]:
    pieces, start = [], 0
    for end in _SENTENCE_END.finditer(text):
        following = text[end.end() : end.end() + 1]
        if following.isupper() or following.isdigit() or following in ('"', "'", "("):
            pieces.append(text[start : end.start()])
            start = end.end()
    pieces.append(text[start:])
    return [s.strip() for s in pieces if s.strip()]


def _context_sentences(node, config: ParseConfig, skip: set[str]) -> list[str]:
    """Sentences next to the image: the end of the paragraph before it and the start of the one after it,
    or else the text of the small block element holding it."""
    figure = node.closest("figure")
    anchor = figure if figure is not None else node
    before, after = [], []
    prev, nxt = anchor.previous_element_sibling, anchor.next_element_sibling
    if prev is not None and prev.tag in _TEXT_TAGS:
        text = _clean(prev.text)
        if len(text) <= config.max_context_chars:
            before = _sentences(text)[::-1]
    if nxt is not None and nxt.tag in _TEXT_TAGS:
        text = _clean(nxt.text)
        if len(text) <= config.max_context_chars:
            after = _sentences(text)
    # Alternate after/before so the sentences nearest to the image come first.
    nearest = [s for pair in zip(after, before) for s in pair] + after[len(before) :] + before[len(after) :]
    if not nearest:
        block = anchor.parent
        depth = 0
        while block is not None and depth < 6 and getattr(block, "tag", "#document") in _BLOCK_TAGS:
            text = _clean(block.text)
            if len(text) > config.max_context_chars:
                break
            if text:
                nearest = _sentences(text)
                break
            block = block.parent
            depth += 1
    return [s for s in nearest if s not in skip][: config.max_context_sentences]


def candidate_texts(cand: Candidate, config: ParseConfig) -> tuple[list[str], list[str]]:
    """Texts describing a candidate image, with where each comes from; duplicates keep their first source."""
    texts: list[str] = []
    sources: list[str] = []

    def add(text: str, source: str) -> None:
        text = _clean(text)
        if text and source in config.text_sources and text not in texts:
            texts.append(text)
            sources.append(source)

    add(cand.alt, "alt")
    add(cand.title, "title")
    figure = cand.node.closest("figure")
    if figure is not None:
        caption = figure.query_selector("figcaption")
        if caption is not None:
            add(caption.text, "figcaption")
    if "context" in config.text_sources:
        for sentence in _context_sentences(cand.node, config, set(texts)):
            add(sentence, "context")
    return texts, sources


def decode_html(html: bytes, charset: str | None) -> str:
    """The page as text, in the charset its HTTP header declares, or else the one found from its bytes (a declared
    name Python has no text codec for, such as `utf8mb4` or `none`, counts as no declaration): UTF-8 when the
    bytes are valid UTF-8, else the page's `<meta charset>`, else the detector's guess."""
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    if charset:
        try:
            return bytes_to_str(html, charset)
        except (LookupError, ValueError):
            logger.debug("unknown charset %r: finding the page's encoding from its bytes", charset)
    try:
        # Accented text in a legacy encoding is almost never valid UTF-8, while the detector alone reads a UTF-8
        # page with few accents as Windows-1250 ("café" -> "cafĂ©").
        html.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        encoding = detect_encoding(html, from_html_meta=True)
    return bytes_to_str(html, encoding)


def _resolve(base: str, src: str) -> str | None:
    """The absolute URL of an image; None for a src that is no URL (`http://[host/x.jpg`: urljoin raises)."""
    try:
        return urljoin(base, src)
    except ValueError:
        return None


def _parse_one(row: dict, config: ParseConfig, tally: Tally, resolver: ImageResolver | None) -> list[dict]:
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree
    from resiliparse.parse.lang import detect_fast

    html = row["html"] or b""
    if len(html) > config.max_page_bytes:
        tally.drop(STAGE, "page", "page_too_large")
        return []
    text = decode_html(html, row.get("charset"))
    if not text.strip():
        tally.drop(STAGE, "page", "empty_page")
        return []
    if text.count("\ufffd") > config.max_replacement_char_ratio * len(text) or "\x00" in text[:4096]:
        tally.drop(STAGE, "page", "bad_encoding")
        return []
    tree = HTMLTree.parse(text)
    if tree.body is None:
        tally.drop(STAGE, "page", "no_body")
        return []
    visible = extract_plain_text(tree, main_content=False, alt_texts=False)
    if len(visible) < config.min_page_text_chars:
        tally.drop(STAGE, "page", "no_text")
        return []
    lang, rank = detect_fast(visible[:5000])
    if lang not in config.languages or rank > config.max_language_rank:
        tally.drop(STAGE, "page", "wrong_language")
        return []

    page_url = row["page_url"]
    base = page_url
    if tree.head is not None:
        canonical = tree.head.query_selector('link[rel="canonical"]')
        if canonical is not None and (canonical.getattr("href") or "").startswith(("http://", "https://")):
            page_url = canonical.getattr("href").strip()
            base = page_url if base.startswith("file:") else base
        base_tag = tree.head.query_selector("base[href]")
        if base_tag is not None:
            # A <base href> that is no URL is ignored, as browsers do.
            base = _resolve(base, base_tag.getattr("href").strip()) or base

    # As a list: indexing resiliparse's collection walks it from the start each time (minutes for 100,000 images).
    nodes = tree.body.query_selector_all("img").values()
    n_nodes = len(nodes)
    if n_nodes == 0:
        tally.drop(STAGE, "page", "no_images")
        return []
    tally.add(STAGE, "image", INPUT, n_nodes)
    if n_nodes > config.max_images_per_page:
        tally.drop(STAGE, "image", "beyond_image_limit", n_nodes - config.max_images_per_page)
    limit = min(n_nodes, config.max_images_per_page)

    qualified: list[Candidate] = []
    for index in range(limit):
        node = nodes[index]
        src = _image_src(node)
        # The raw src is enough for the keyword rules; URLs are resolved only for the few images fetched.
        cand = Candidate(
            index=index,
            src=src,
            url=src,
            alt=_clean(node.getattr("alt")),
            title=_clean(node.getattr("title")),
            node=node,
        )
        cand.width, cand.height = declared_size(node)
        cand.reason = _disqualify(cand, "", config)
        if cand.reason is None and _resolve(base, src) is None:
            cand.reason = "bad_src"
        if cand.reason is None:
            in_main, in_figure, in_boilerplate, ancestors_sig = _ancestor_features(node)
            cand.reason = "advertisement" if _AD.search(ancestors_sig) else None
        if cand.reason is not None:
            tally.drop(STAGE, "image", cand.reason)
            continue
        cand.score = _dom_score(cand, in_main, in_figure, in_boilerplate, limit)
        cand.extra = {"in_main": in_main, "in_figure": in_figure, "in_boilerplate": in_boilerplate}
        qualified.append(cand)

    qualified.sort(key=lambda c: (-c.score, c.index))
    if resolver is None:
        resolver = resolver_for(row["source"], config.max_resyncs_per_file)
    raw_src = row["source"].lower().endswith(HTML_SUFFIXES)
    fetched: list[Candidate] = []
    for cand in qualified[: config.real_size_candidates]:
        cand.url = urljoin(base, cand.src)
        data, reason = resolver.fetch(cand.src if raw_src else cand.url, config.max_image_bytes)
        if data is None:
            tally.drop(STAGE, "image", reason or "image_not_archived")
            continue
        cand.data = data
        size = _real_size(data)
        if size is not None and (cand.width is None or cand.height is None):
            # The real size replaces a missing declaration, so undeclared large photos can win.
            cand.width, cand.height = size
            cand.score = _dom_score(
                cand, cand.extra["in_main"], cand.extra["in_figure"], cand.extra["in_boilerplate"], limit
            )
        fetched.append(cand)
    rest = len(qualified) - min(len(qualified), config.real_size_candidates)
    if rest:
        tally.drop(STAGE, "image", "not_dominant", rest)
    if not fetched:
        tally.drop(STAGE, "page", "no_dominant_image")
        return []
    fetched.sort(key=lambda c: (-c.score, c.index))
    chosen = fetched[: config.max_dominant_images]
    if len(fetched) > len(chosen):
        tally.drop(STAGE, "image", "not_dominant", len(fetched) - len(chosen))

    out = []
    for cand in chosen:
        texts, sources = candidate_texts(cand, config)
        image_id = hashlib.sha1(f"{row['page_id']}|{cand.index}|{cand.url}".encode()).hexdigest()[:20]
        out.append(
            {
                "image_id": image_id,
                "page_url": page_url,
                "source": row["source"],
                "image_url": cand.url,
                "image": cand.data,
                "dom_score": float(cand.score),
                "language_rank": float(rank),
                "texts": texts,
                "text_sources": sources,
            }
        )
    tally.add(STAGE, "image", KEPT, len(out))
    tally.add(STAGE, "page", KEPT)
    return out


def parse_pages(
    batch: dict[str, list], config: ParseConfig, resolver: ImageResolver | None = None
) -> tuple[dict[str, list], Tally]:
    """Stage 1 over a batch of page records (`sources.PAGE_COLUMNS`) -> dominant-image records (`IMAGE_COLUMNS`).

    Args:
        batch: Columns of page records, as `datasets.Dataset.map(batched=True)` passes them.
        config: Parsing configuration.
        resolver: Where image bytes come from; by default the page's WARC file or folder.

    Returns:
        The dominant-image records as columns, and the counts of this batch.
    """
    tally = Tally()
    out = {name: [] for name in IMAGE_COLUMNS}
    # One resolver per source and batch: for a WARC in a store, finding it asks the store for the file's version
    # (one request), and a WARC holds tens of thousands of pages.
    resolvers: dict[str, ImageResolver] = {}
    n = len(batch["page_id"])
    for i in range(n):
        row = {key: values[i] for key, values in batch.items()}
        tally.add(STAGE, "page", INPUT)
        # Counts of a page are merged only when it is fully parsed, so a failure never leaves half its counts.
        page_tally = Tally()
        try:
            page_resolver = resolver
            if page_resolver is None:
                if row["source"] not in resolvers:
                    resolvers[row["source"]] = resolver_for(row["source"], config.max_resyncs_per_file)
                page_resolver = resolvers[row["source"]]
            records = _parse_one(row, config, page_tally, page_resolver)
        except Exception as err:  # one bad page must never stop a run
            logger.debug("parse failed for %s: %r", row.get("page_id"), err)
            tally.drop(STAGE, "page", "parse_error")
            continue
        tally.update(page_tally)
        for record in records:
            for name in IMAGE_COLUMNS:
                out[name].append(record[name])
    return out, tally


__all__ = ["IMAGE_COLUMNS", "STAGE", "parse_pages"]
