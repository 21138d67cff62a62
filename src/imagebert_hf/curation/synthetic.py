"""Generated material for training, tests and benchmarks: non-photo images, web prose, pages and WARC files.

Nothing here is needed to curate real crawls. The non-photo images (charts, logos, banners, text screenshots,
flat illustrations, gradients, noise) are the negatives of the natural-photo classifier; the page builder writes
realistic pages around an image (site logo, navigation, ads, tracking pixel, figure with caption, prose).
"""

from __future__ import annotations

import html
import io
import random
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np


GRAPHIC_KINDS = ("chart", "logo", "banner", "text", "flat", "gradient", "noise", "pattern")

_WEB_SUBJECTS = ["our team", "the new season", "this recipe", "the update", "our store", "the project", "the event"]
_WEB_TEMPLATES = [
    "We are excited to share {s} with all of our readers this week.",
    "Thanks for reading, and let us know what you think of {s} in the comments below.",
    "You can find more details about {s} on the next page of this article.",
    "This post was last updated on {d} and may not reflect recent changes to {s}.",
    "Our editors review {s} every month to keep the information accurate.",
    "If you enjoyed this article about {s}, you might also like our other stories.",
    "We spent the afternoon discussing {s} before heading home for dinner.",
    "Please note that opening hours for {s} may change during public holidays.",
    "I have been thinking about {s} for a long time and finally wrote it down.",
    "Join thousands of readers who get our weekly notes about {s} by email.",
]
_DAYS = ["Monday", "Tuesday", "March 3", "June 12", "last Friday", "October 21"]
FILLER_PARAGRAPHS = [
    "The town sits at the end of a long valley, and most visitors arrive by the morning train. "
    "The old market square is busy on weekends, when farmers sell bread, cheese and fresh vegetables.",
    "Our guide explained how the bridge was rebuilt after the flood, and we walked along the river "
    "until the light began to fade. Dinner was simple but very good.",
    "The museum opens at ten and is free on the first Sunday of every month. Families with children "
    "should plan at least two hours for the main collection.",
    "Local volunteers clean the beach every spring, and this year more than two hundred people joined "
    "them. The results were shared with the city council in the summer.",
]
GERMAN_PARAGRAPH = (
    "Die Stadt liegt am Ende eines langen Tals, und die meisten Besucher kommen mit dem Zug am Morgen an. "
    "Auf dem alten Marktplatz verkaufen Bauern am Wochenende Brot, Käse und frisches Gemüse."
)


def web_sentences(n: int, seed: int = 0) -> list[str]:
    """Generic web prose (not describing any image): negatives for the relevance model."""
    rng = random.Random(seed)
    return [rng.choice(_WEB_TEMPLATES).format(s=rng.choice(_WEB_SUBJECTS), d=rng.choice(_DAYS)) for _ in range(n)]


def graphic_image(kind: str, rng: np.random.Generator, size: tuple[int, int] | None = None):
    """One non-photographic image of the given kind, as a PIL RGB image."""
    from PIL import Image, ImageDraw

    width, height = size or (int(rng.integers(360, 800)), int(rng.integers(360, 700)))
    palette = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(6)]
    background = (255, 255, 255) if rng.random() < 0.6 else palette[0]
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    if kind == "chart":
        n = int(rng.integers(3, 12))
        bar_w = width // (n + 2)
        for i in range(n):
            top = int(rng.integers(height // 8, height - 40))
            draw.rectangle([bar_w * (i + 1), top, bar_w * (i + 1) + bar_w - 6, height - 30], fill=palette[1 + i % 5])
        draw.line([bar_w // 2, height - 30, width - 10, height - 30], fill=(0, 0, 0), width=2)
        draw.line([bar_w // 2, 10, bar_w // 2, height - 30], fill=(0, 0, 0), width=2)
    elif kind == "logo":
        cx, cy, r = width // 2, height // 2, min(width, height) // 3
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=palette[1])
        draw.rectangle([cx - r // 2, cy - r // 4, cx + r // 2, cy + r // 4], fill=palette[2])
        draw.text((cx - r // 2, cy + r + 5), "BRAND", fill=palette[3])
    elif kind == "banner":
        for i in range(3):
            draw.rectangle([0, i * height // 3, width, (i + 1) * height // 3], fill=palette[i + 1])
        for j in range(int(rng.integers(2, 6))):
            draw.text((20, 20 + 30 * j), "SALE 50% OFF TODAY ONLY", fill=palette[4])
    elif kind == "text":
        for j in range(0, height - 14, 14):
            words = " ".join("lorem" if rng.random() < 0.5 else "ipsum" for _ in range(int(rng.integers(4, 14))))
            draw.text((10, j), words, fill=(0, 0, 0) if background == (255, 255, 255) else palette[1])
    elif kind == "flat":
        for _ in range(int(rng.integers(3, 10))):
            x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
            x1, y1 = x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([x0, y0, x1, y1], fill=palette[int(rng.integers(1, 6))])
    elif kind == "gradient":
        a, b = np.array(palette[1], dtype=np.float32), np.array(palette[2], dtype=np.float32)
        t = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
        arr = np.broadcast_to(a + (b - a) * t, (height, width, 3))
        image = Image.fromarray(arr.astype(np.uint8))
    elif kind == "noise":
        arr = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(arr).resize((width, height), Image.Resampling.NEAREST)
    elif kind == "pattern":
        step = int(rng.integers(8, 40))
        for x in range(0, width, step * 2):
            draw.rectangle([x, 0, x + step, height], fill=palette[1])
        for y in range(0, height, step * 2):
            draw.rectangle([0, y, width, y + step], fill=palette[2])
    else:
        raise ValueError(f"unknown graphic kind {kind!r}")
    return image


def encode_image(image, fmt: str = "JPEG", quality: int = 88) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def decompression_bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A tiny PNG whose header declares an enormous size (its pixel data is deliberately missing)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def page_html(
    title: str,
    image_src: str,
    alt: str = "",
    caption: str | None = None,
    paragraphs: Iterable[str] = (),
    image_size: tuple[int, int] | None = (640, 480),
    with_logo: bool = True,
    with_ad: bool = True,
    with_pixel: bool = True,
    extra_images: Iterable[str] = (),
    lang: str = "en",
    canonical: str | None = None,
    prose_near_image: bool = True,
) -> str:
    """A realistic article page around one main image (site logo, navigation, ad, tracking pixel, figure)."""
    esc = html.escape
    size = f' width="{image_size[0]}" height="{image_size[1]}"' if image_size else ""
    paragraphs = list(paragraphs)
    parts = [
        f'<!DOCTYPE html><html lang="{lang}"><head><meta charset="utf-8"><title>{esc(title)}</title>',
        f'<link rel="canonical" href="{esc(canonical)}">' if canonical else "",
        "</head><body><header>",
        '<a href="/"><img src="/static/site-logo.png" class="logo" width="160" height="48" alt="Site logo"></a>'
        if with_logo
        else "",
        '<nav><a href="/">Home</a> <a href="/news">News</a> <a href="/about">About</a></nav></header>',
        f"<main><article><h1>{esc(title)}</h1>",
        f"<p>{esc(paragraphs[0])}</p>" if paragraphs and prose_near_image else "",
        f'<figure><img src="{esc(image_src)}" alt="{esc(alt)}"{size}>',
        f"<figcaption>{esc(caption)}</figcaption>" if caption else "",
        "</figure>",
        *(f"<p>{esc(p)}</p>" for p in (paragraphs[1:] if prose_near_image else [])),
        *(f'<img src="{esc(src)}">' for src in extra_images),
        "</article>",
        ""
        if prose_near_image
        else '<section class="more">' + "".join(f"<p>{esc(p)}</p>" for p in paragraphs) + "</section>",
        "</main>",
        '<aside class="sidebar"><div class="ad-slot"><img src="https://ads.example.net/banner/300x250.gif" '
        'width="300" height="250" alt="Advertisement"></div></aside>'
        if with_ad
        else "",
        "<footer><p>Copyright 2024 Example News. All rights reserved.</p>",
        '<img src="https://track.example.net/pixel.gif?id=7" width="1" height="1" alt="">' if with_pixel else "",
        "</footer></body></html>",
    ]
    return "".join(parts)


def write_warc(path: str | Path, records: Iterable[tuple[str, str, bytes]], gzip: bool = True) -> Path:
    """Writes `(url, content_type, payload)` HTTP response records (plus a warcinfo record) with warcio."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    path = Path(path)
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=gzip)
        writer.write_record(writer.create_warcinfo_record(path.name, {"software": "imagebert_hf curation tests"}))
        for url, content_type, payload in records:
            headers = StatusAndHeaders(
                "200 OK", [("Content-Type", content_type), ("Content-Length", str(len(payload)))], protocol="HTTP/1.1"
            )
            record = writer.create_warc_record(url, "response", payload=io.BytesIO(payload), http_headers=headers)
            writer.write_record(record)
    return path


def _sha1(data: bytes) -> str:
    import hashlib

    return hashlib.sha1(data).hexdigest()


def _resize_jpeg(data: bytes, size: tuple[int, int]) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return encode_image(im.convert("RGB").resize(size))


SHARED_ALT = "A view of the garden in the early morning light"
N_SHARED_TEXT_IMAGES = 6
PHOTOS_NEEDED = 26


EXPECTED_REASONS = (
    "read/record/page_too_large",
    "read/record/unreadable_segment",
    "read/record/malformed_record",
    "parse/image/image_record_unreadable",
    "parse/page/wrong_language",
    "parse/page/no_dominant_image",
    "parse/image/logo_or_icon",
    "parse/image/advertisement",
    "parse/image/tracking_pixel",
    "parse/image/beyond_image_limit",
    "parse/image/image_not_archived",
    "images/image/too_small",
    "images/image/not_an_image",
    "images/image/decompression_bomb",
    "images/image/not_natural_photo",
    "text/pair/spam",
    "text/pair/filename_like",
    "text/image/no_clean_text",
    "aggregation/pair/text_shared_by_too_many_images",
    "aggregation/pair/duplicate_image_lower_score",
)


class _Crawl:
    """The crawl `build_corpus` writes, case by case: the records of the main WARC, the photos still to use, and
    what each image must become (`expected` captions, or the reason it is `rejected`)."""

    def __init__(self, out_dir: Path, photos: list[tuple[bytes, list[str]]], seed: int):
        self.out_dir = out_dir
        self.rng = np.random.default_rng(seed)
        self.photos = iter(photos)
        self.records: list[tuple[str, str, bytes]] = []
        self.expected: dict[str, set[str]] = {}
        self.rejected: dict[str, str] = {}

    def add_page(self, url: str, page: str | bytes, content_type: str = "text/html; charset=utf-8") -> None:
        self.records.append((url, content_type, page.encode("utf-8") if isinstance(page, str) else page))

    def add_image(self, url: str, data: bytes, content_type: str = "image/jpeg") -> None:
        self.records.append((url, content_type, data))

    def good_articles(self) -> None:
        """Good article pages, one of them in two copies with another caption (aggregation keeps one)."""
        for i in range(8):
            data, captions = next(self.photos)
            host = f"site{i % 3}.example.com"
            page = page_html(
                f"Story {i}",
                f"/photos/{i}.jpg",
                alt=captions[0],
                caption=captions[1],
                paragraphs=FILLER_PARAGRAPHS[i % 4 :][:2],
            )
            self.add_page(f"https://{host}/story/{i}.html", page)
            self.add_image(f"https://{host}/photos/{i}.jpg", data)
            self.expected[_sha1(data)] = set(captions[:2])
            if i == 0:
                copy = page_html(
                    "Copy", "https://site0.example.com/photos/0.jpg", alt=captions[2], paragraphs=FILLER_PARAGRAPHS[:1]
                )
                self.add_page("https://mirror.example.org/copy.html", copy)
                self.expected[_sha1(data)].add(captions[2])

    def shared_text(self) -> None:
        """One text on more images than allowed: all its pairs go."""
        for k in range(N_SHARED_TEXT_IMAGES):
            data, _ = next(self.photos)
            page = page_html(
                f"Garden day {k}",
                f"/img/{k}.jpg",
                alt=SHARED_ALT,
                paragraphs=FILLER_PARAGRAPHS[:2],
                prose_near_image=False,
            )
            self.add_page(f"https://garden.example.com/day/{k}.html", page)
            self.add_image(f"https://garden.example.com/img/{k}.jpg", data)
            self.rejected[_sha1(data)] = "text_shared_by_too_many_images"

    def lone_page(self, slug: str, data: bytes, alt: str, reason: str, content_type="image/jpeg", size=(640, 480)):
        page = page_html(
            slug.title(),
            f"/media/{slug}.jpg",
            alt=alt,
            paragraphs=FILLER_PARAGRAPHS[:2],
            prose_near_image=False,
            image_size=size,
        )
        self.add_page(f"https://bad.example.com/{slug}.html", page)
        self.add_image(f"https://bad.example.com/media/{slug}.jpg", data, content_type)
        self.rejected[_sha1(data)] = reason

    def bad_images_and_texts(self) -> None:
        """Pages whose one image or text each filter must drop, and one whose image is not in the archive."""
        data, captions = next(self.photos)
        self.lone_page("tiny", _resize_jpeg(data, (280, 210)), captions[0], "too_small")
        data, _ = next(self.photos)
        self.lone_page("spam", data, "Buy cheap sunglasses now with free shipping on every order", "no_clean_text")
        data, _ = next(self.photos)
        self.lone_page("filename", data, "IMG_2041.JPG", "no_clean_text")
        not_image = b"<html><body>Not an image at all</body></html>" * 20
        self.lone_page("notimage", not_image, "A dog running on the beach", "not_an_image")
        bomb = decompression_bomb_png()
        self.lone_page("bomb", bomb, "A very large picture of a mountain lake", "decompression_bomb", "image/png")
        chart = encode_image(graphic_image("chart", self.rng, (640, 480)))
        self.lone_page("chart", chart, "A bar chart of the monthly sales in the store", "not_natural_photo")
        missing = page_html(
            "Missing",
            "/media/not-in-archive.jpg",
            alt="A boat on a calm lake at sunset",
            paragraphs=FILLER_PARAGRAPHS[:2],
        )
        self.add_page("https://bad.example.com/missing.html", missing)

    def hard_pages(self) -> None:
        """A German page (dropped), a page in Windows-1252 without a declared charset (decoded, kept), a gallery of
        thousands of images (the main photo wins), binary garbage served as HTML and a page above the size limit."""
        data, captions = next(self.photos)
        german = page_html("Ein Tag", "/bild.jpg", alt=captions[0], paragraphs=[GERMAN_PARAGRAPH] * 2, lang="de")
        self.add_page("https://de.example.com/artikel.html", german)
        self.add_image("https://de.example.com/bild.jpg", data)
        self.rejected[_sha1(data)] = "wrong_language"

        data, captions = next(self.photos)
        page = page_html("Café naïve", "/cafe.jpg", alt=captions[0], paragraphs=FILLER_PARAGRAPHS[:2])
        cp1252 = page.replace('<meta charset="utf-8">', "").encode("cp1252", "replace")
        self.add_page("https://cafe.example.com/", cp1252, "text/html")
        self.add_image("https://cafe.example.com/cafe.jpg", data)
        self.expected[_sha1(data)] = {captions[0]}

        data, captions = next(self.photos)
        thumbs = [f"/thumbs/{n}.jpg" for n in range(2500)]
        gallery = page_html(
            "Gallery", "/main.jpg", alt=captions[0], paragraphs=FILLER_PARAGRAPHS[:2], extra_images=thumbs
        )
        self.add_page("https://gallery.example.com/all.html", gallery)
        self.add_image("https://gallery.example.com/main.jpg", data)
        self.expected[_sha1(data)] = {captions[0]}

        garbage = self.rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes()
        self.add_page("https://bad.example.com/garbage.html", garbage, "text/html")
        self.add_page("https://bad.example.com/huge.html", page_html("Huge", "/x.jpg", paragraphs=["word " * 500_000]))

    def capture(self, scratch: str, page_url: str, title: str, data: bytes, gzip: bool = True, **page) -> bytes:
        """The bytes of a WARC holding one page (`page_url` + `.html`) and its image (`page_url` + `.jpg`), written
        to the scratch file `_SCRATCH.warc[.gz]` (its name is in the WARC's warcinfo), read back and removed."""
        name = page_url.rsplit("/", 1)[1]
        page = {"paragraphs": FILLER_PARAGRAPHS[:2], **page}
        html = page_html(title, f"/{name}.jpg", **page).encode()
        scratch = self.out_dir / f"_{scratch}.warc{'.gz' if gzip else ''}"
        base = page_url.rsplit("/", 1)[0]
        records = [
            (f"{base}/{name}.html", "text/html; charset=utf-8", html),
            (f"{base}/{name}.jpg", "image/jpeg", data),
        ]
        content = write_warc(scratch, records, gzip=gzip).read_bytes()
        scratch.unlink()
        return content

    def plain_warc_with_malformed_record(self) -> None:
        """A plain WARC with a malformed record between two good captures."""
        base = "https://plain.example.com"
        data, captions = next(self.photos)
        first = self.capture("first", f"{base}/a", "Plain", data, gzip=False, alt=captions[0], caption=captions[1])
        self.expected[_sha1(data)] = set(captions[:2])
        data, captions = next(self.photos)
        second = self.capture(
            "second",
            f"{base}/b",
            "Plain B",
            data,
            gzip=False,
            alt=captions[0],
            caption=captions[1],
            paragraphs=FILLER_PARAGRAPHS[1:3],
        )
        self.expected[_sha1(data)] = set(captions[:2])
        garbage = (
            b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: not-a-number\r\n\r\n" + b"\x00\xff" * 64 + b"\r\n\r\n"
        )
        (self.out_dir / "crawl-00001.warc").write_bytes(first + garbage + second)

    def cut_gzip_warc(self) -> None:
        """A gzip WARC with a corrupt segment between two captures, then cut in the middle of its last record."""
        base = "https://cut.example.com"
        data, captions = next(self.photos)
        cut_data, _ = next(self.photos)
        ok = self.capture("ok", f"{base}/ok", "Cut", data, alt=captions[0])
        late = self.capture("late", f"{base}/late", "Late", cut_data, alt=captions[1])
        corrupt = b"these bytes are not a gzip member" + self.rng.integers(0, 256, 512, dtype=np.uint8).tobytes()
        (self.out_dir / "crawl-00002.warc.gz").write_bytes(ok + corrupt + late[: len(late) - len(cut_data) // 2])
        self.expected[_sha1(data)] = {captions[0]}
        self.rejected[_sha1(cut_data)] = "truncated"

    def saved_pages(self) -> Path:
        """Saved HTML pages with their images next to them, as browsers save them."""
        site = self.out_dir / "saved_pages"
        (site / "trip_files").mkdir(parents=True, exist_ok=True)
        (site / "images").mkdir(parents=True, exist_ok=True)
        data, captions = next(self.photos)
        (site / "trip_files" / "photo.jpg").write_bytes(data)
        trip = page_html(
            "Trip",
            "https://travel.example.com/photo.jpg",
            alt=captions[0],
            paragraphs=FILLER_PARAGRAPHS[:2],
            canonical="https://travel.example.com/trip",
        )
        (site / "trip.html").write_text(trip)
        self.expected[_sha1(data)] = {captions[0]}
        data, captions = next(self.photos)
        (site / "images" / "walk.jpg").write_bytes(data)
        walk = page_html(
            "Walk", "images/walk.jpg", alt=captions[0], caption=captions[1], paragraphs=FILLER_PARAGRAPHS[2:]
        )
        (site / "walk.html").write_text(walk)
        self.expected[_sha1(data)] = set(captions[:2])
        return site


def build_corpus(out_dir: str | Path, photos: list[tuple[bytes, list[str]]], seed: int = 0) -> dict:
    """Writes a small crawl with known outcome: good article pages and deliberately bad cases.

    Args:
        out_dir: Folder to write into (three WARC files and a folder of saved HTML pages).
        photos: At least `PHOTOS_NEEDED` natural photos (JPEG bytes, both sides > 300 px) with captions.
        seed: Seed for the generated bad cases.

    Returns:
        `inputs` (paths to pass to a runner), `expected` (content hash -> captions the image may keep; the
        prose of `FILLER_PARAGRAPHS` is also acceptable context),
        `rejected` (content hash -> why it must not survive) and `expected_reasons` (stage/unit/reason keys that
        must be counted).
    """
    if len(photos) < PHOTOS_NEEDED:
        raise ValueError(f"build_corpus needs {PHOTOS_NEEDED} photos, got {len(photos)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    crawl = _Crawl(out_dir, photos, seed)
    crawl.good_articles()
    crawl.shared_text()
    crawl.bad_images_and_texts()
    crawl.hard_pages()
    write_warc(out_dir / "crawl-00000.warc.gz", crawl.records, gzip=True)
    crawl.plain_warc_with_malformed_record()
    crawl.cut_gzip_warc()
    site = crawl.saved_pages()
    inputs = sorted(str(p) for p in out_dir.glob("*.warc*")) + [str(site)]
    return {
        "inputs": inputs,
        "expected": crawl.expected,
        "rejected": crawl.rejected,
        "expected_reasons": list(EXPECTED_REASONS),
    }


__all__ = [
    "FILLER_PARAGRAPHS",
    "GERMAN_PARAGRAPH",
    "GRAPHIC_KINDS",
    "PHOTOS_NEEDED",
    "EXPECTED_REASONS",
    "build_corpus",
    "decompression_bomb_png",
    "encode_image",
    "graphic_image",
    "page_html",
    "web_sentences",
    "write_warc",
]
