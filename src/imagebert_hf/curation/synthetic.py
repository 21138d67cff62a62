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
    rng = np.random.default_rng(seed)
    expected: dict[str, set[str]] = {}
    rejected: dict[str, str] = {}
    records: list[tuple[str, str, bytes]] = []
    photo_iter = iter(photos)

    def add_page(url: str, page: str | bytes, content_type: str = "text/html; charset=utf-8") -> None:
        records.append((url, content_type, page.encode("utf-8") if isinstance(page, str) else page))

    def good_page(i: int, data: bytes, captions: list[str], host: str) -> None:
        add_page(
            f"https://{host}/story/{i}.html",
            page_html(
                f"Story {i}",
                f"/photos/{i}.jpg",
                alt=captions[0],
                caption=captions[1],
                paragraphs=FILLER_PARAGRAPHS[i % 4 :][:2],
            ),
        )
        records.append((f"https://{host}/photos/{i}.jpg", "image/jpeg", data))
        expected[_sha1(data)] = set(captions[:2])

    # Good article pages, one of them in two copies with another caption (aggregation keeps one).
    for i in range(8):
        data, captions = next(photo_iter)
        good_page(i, data, captions, f"site{i % 3}.example.com")
        if i == 0:
            add_page(
                "https://mirror.example.org/copy.html",
                page_html(
                    "Copy", "https://site0.example.com/photos/0.jpg", alt=captions[2], paragraphs=FILLER_PARAGRAPHS[:1]
                ),
            )
            expected[_sha1(data)].add(captions[2])

    # One text on more images than allowed: all its pairs go.
    for k in range(N_SHARED_TEXT_IMAGES):
        data, _ = next(photo_iter)
        add_page(
            f"https://garden.example.com/day/{k}.html",
            page_html(
                f"Garden day {k}",
                f"/img/{k}.jpg",
                alt=SHARED_ALT,
                paragraphs=FILLER_PARAGRAPHS[:2],
                prose_near_image=False,
            ),
        )
        records.append((f"https://garden.example.com/img/{k}.jpg", "image/jpeg", data))
        rejected[_sha1(data)] = "text_shared_by_too_many_images"

    def lone_page(
        slug: str, data: bytes, alt: str, reason: str, content_type: str = "image/jpeg", size=(640, 480)
    ) -> None:
        add_page(
            f"https://bad.example.com/{slug}.html",
            page_html(
                slug.title(),
                f"/media/{slug}.jpg",
                alt=alt,
                paragraphs=FILLER_PARAGRAPHS[:2],
                prose_near_image=False,
                image_size=size,
            ),
        )
        records.append((f"https://bad.example.com/media/{slug}.jpg", content_type, data))
        rejected[_sha1(data)] = reason

    data, captions = next(photo_iter)
    lone_page("tiny", _resize_jpeg(data, (280, 210)), captions[0], "too_small")
    data, _ = next(photo_iter)
    lone_page("spam", data, "Buy cheap sunglasses now with free shipping on every order", "no_clean_text")
    data, _ = next(photo_iter)
    lone_page("filename", data, "IMG_2041.JPG", "no_clean_text")
    lone_page(
        "notimage", b"<html><body>Not an image at all</body></html>" * 20, "A dog running on the beach", "not_an_image"
    )
    lone_page(
        "bomb", decompression_bomb_png(), "A very large picture of a mountain lake", "decompression_bomb", "image/png"
    )
    chart = encode_image(graphic_image("chart", rng, (640, 480)))
    lone_page("chart", chart, "A bar chart of the monthly sales in the store", "not_natural_photo")
    add_page(
        "https://bad.example.com/missing.html",
        page_html(
            "Missing",
            "/media/not-in-archive.jpg",
            alt="A boat on a calm lake at sunset",
            paragraphs=FILLER_PARAGRAPHS[:2],
        ),
    )
    data, captions = next(photo_iter)
    add_page(
        "https://de.example.com/artikel.html",
        page_html("Ein Tag", "/bild.jpg", alt=captions[0], paragraphs=[GERMAN_PARAGRAPH] * 2, lang="de"),
    )
    records.append(("https://de.example.com/bild.jpg", "image/jpeg", data))
    rejected[_sha1(data)] = "wrong_language"

    # Declared charset missing and text in Windows-1252: detected, decoded, kept.
    data, captions = next(photo_iter)
    page = page_html("Café naïve", "/cafe.jpg", alt=captions[0], paragraphs=FILLER_PARAGRAPHS[:2])
    add_page(
        "https://cafe.example.com/",
        page.replace('<meta charset="utf-8">', "").encode("cp1252", "replace"),
        "text/html",
    )
    records.append(("https://cafe.example.com/cafe.jpg", "image/jpeg", data))
    expected[_sha1(data)] = {captions[0]}

    # Thousands of images on one page: the main photo still wins, the rest are counted.
    data, captions = next(photo_iter)
    thumbs = [f"/thumbs/{n}.jpg" for n in range(2500)]
    add_page(
        "https://gallery.example.com/all.html",
        page_html("Gallery", "/main.jpg", alt=captions[0], paragraphs=FILLER_PARAGRAPHS[:2], extra_images=thumbs),
    )
    records.append(("https://gallery.example.com/main.jpg", "image/jpeg", data))
    expected[_sha1(data)] = {captions[0]}

    # Binary garbage served as HTML, and a page far above the size limit.
    add_page(
        "https://bad.example.com/garbage.html", rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes(), "text/html"
    )
    add_page("https://bad.example.com/huge.html", page_html("Huge", "/x.jpg", paragraphs=["word " * 500_000]))
    write_warc(out_dir / "crawl-00000.warc.gz", records, gzip=True)

    # A plain WARC with a malformed record between two good captures.
    data, captions = next(photo_iter)
    first = write_warc(
        out_dir / "_first.warc",
        [
            (
                "https://plain.example.com/a.html",
                "text/html; charset=utf-8",
                page_html(
                    "Plain", "/a.jpg", alt=captions[0], caption=captions[1], paragraphs=FILLER_PARAGRAPHS[:2]
                ).encode(),
            ),
            ("https://plain.example.com/a.jpg", "image/jpeg", data),
        ],
        gzip=False,
    ).read_bytes()
    expected[_sha1(data)] = set(captions[:2])
    data, captions = next(photo_iter)
    second = write_warc(
        out_dir / "_second.warc",
        [
            (
                "https://plain.example.com/b.html",
                "text/html; charset=utf-8",
                page_html(
                    "Plain B", "/b.jpg", alt=captions[0], caption=captions[1], paragraphs=FILLER_PARAGRAPHS[1:3]
                ).encode(),
            ),
            ("https://plain.example.com/b.jpg", "image/jpeg", data),
        ],
        gzip=False,
    ).read_bytes()
    expected[_sha1(data)] = set(captions[:2])
    garbage = (
        b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: not-a-number\r\n\r\n" + b"\x00\xff" * 64 + b"\r\n\r\n"
    )
    (out_dir / "crawl-00001.warc").write_bytes(first + garbage + second)
    (out_dir / "_first.warc").unlink()
    (out_dir / "_second.warc").unlink()

    # A gzip WARC with a corrupt segment between two captures, then cut in the middle of its last record.
    data, captions = next(photo_iter)
    cut_data, _ = next(photo_iter)
    ok = write_warc(
        out_dir / "_ok.warc.gz",
        [
            (
                "https://cut.example.com/ok.html",
                "text/html; charset=utf-8",
                page_html("Cut", "/ok.jpg", alt=captions[0], paragraphs=FILLER_PARAGRAPHS[:2]).encode(),
            ),
            ("https://cut.example.com/ok.jpg", "image/jpeg", data),
        ],
    ).read_bytes()
    late = write_warc(
        out_dir / "_late.warc.gz",
        [
            (
                "https://cut.example.com/late.html",
                "text/html; charset=utf-8",
                page_html("Late", "/late.jpg", alt=captions[1], paragraphs=FILLER_PARAGRAPHS[:2]).encode(),
            ),
            ("https://cut.example.com/late.jpg", "image/jpeg", cut_data),
        ],
    ).read_bytes()
    corrupt = b"these bytes are not a gzip member" + rng.integers(0, 256, 512, dtype=np.uint8).tobytes()
    (out_dir / "crawl-00002.warc.gz").write_bytes(ok + corrupt + late[: len(late) - len(cut_data) // 2])
    (out_dir / "_ok.warc.gz").unlink()
    (out_dir / "_late.warc.gz").unlink()
    expected[_sha1(data)] = {captions[0]}
    rejected[_sha1(cut_data)] = "truncated"

    # Saved HTML pages with their images next to them, as browsers save them.
    site = out_dir / "saved_pages"
    (site / "trip_files").mkdir(parents=True, exist_ok=True)
    (site / "images").mkdir(parents=True, exist_ok=True)
    data, captions = next(photo_iter)
    (site / "trip_files" / "photo.jpg").write_bytes(data)
    (site / "trip.html").write_text(
        page_html(
            "Trip",
            "https://travel.example.com/photo.jpg",
            alt=captions[0],
            paragraphs=FILLER_PARAGRAPHS[:2],
            canonical="https://travel.example.com/trip",
        )
    )
    expected[_sha1(data)] = {captions[0]}
    data, captions = next(photo_iter)
    (site / "images" / "walk.jpg").write_bytes(data)
    (site / "walk.html").write_text(
        page_html("Walk", "images/walk.jpg", alt=captions[0], caption=captions[1], paragraphs=FILLER_PARAGRAPHS[2:])
    )
    expected[_sha1(data)] = set(captions[:2])

    expected_reasons = [
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
    ]
    inputs = sorted(str(p) for p in out_dir.glob("*.warc*")) + [str(site)]
    return {"inputs": inputs, "expected": expected, "rejected": rejected, "expected_reasons": expected_reasons}


__all__ = [
    "FILLER_PARAGRAPHS",
    "GERMAN_PARAGRAPH",
    "GRAPHIC_KINDS",
    "PHOTOS_NEEDED",
    "build_corpus",
    "decompression_bomb_png",
    "encode_image",
    "graphic_image",
    "page_html",
    "web_sentences",
    "write_warc",
]
