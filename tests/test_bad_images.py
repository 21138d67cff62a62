"""A corpus of bad and awkward images, generated here: each gives a clear error or a correct RGB image, never a crash.

Files that cannot be images must raise `ImageLoadError` naming the file and the reason, and be counted as skips by
the region cache; odd but valid images (CMYK, 16-bit, palette, alpha, animated, EXIF-rotated...) must load as the
viewer would show them.
"""

import io
import json
import os
import resource
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagebert_hf import ImageBERTRoIExtractor, ImageLoadError, load_image


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header declares `width` x `height` greyscale pixels, with whatever data follows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png_zero_bomb(width: int, height: int) -> bytes:
    """A real compression bomb: a valid PNG of `width` x `height` black pixels in a few hundred kilobytes."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return png_header_only(width, height, data)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels)


def jpeg_with_size(width: int, height: int, seed: int) -> bytes:
    """A small JPEG whose SOF marker is patched to declare `width` x `height`."""
    data = bytearray(encode(noise(16, 16, seed), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_with_size(width: int, height: int) -> bytes:
    data = bytearray(encode(noise(8, 8, 99), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def exif_rotated(orientation: int, seed: int) -> bytes:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue, right half red
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95 - seed)


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 32), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def rgba_half_transparent() -> bytes:
    pixels = np.zeros((16, 16, 4), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[:, :8, 3] = 255  # left half opaque red, right half fully transparent
    return encode(Image.fromarray(pixels), "PNG")


def grey16_gradient(fmt: str = "PNG") -> bytes:
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    return encode(Image.fromarray(values), fmt)


def truncated(data: bytes, fraction: float) -> bytes:
    return data[: max(1, int(len(data) * fraction))]


_JPEG = encode(noise(256, 256, 1), "JPEG", quality=90)
_PNG = encode(noise(128, 128, 2), "PNG")
_GIF = encode(noise(128, 128, 3).convert("P"), "GIF")
_TIFF = encode(noise(128, 128, 4), "TIFF")


@dataclass
class Case:
    name: str
    make: Callable[[], object]  # bytes -> written to a file; anything else is passed in memory
    error: str | None = None  # a substring of the reason, or None when the image must load
    check: Callable[[object], None] | None = None
    suffix: str = ".jpg"


def _all_grey(loaded):
    pixels = np.asarray(loaded.image, dtype=np.int16)
    assert loaded.image.mode == "RGB"
    assert np.abs(pixels[..., 0] - pixels[..., 1]).max() == 0 and np.abs(pixels[..., 1] - pixels[..., 2]).max() == 0


def _grey16_scaled(loaded):
    pixels = np.asarray(loaded.image)
    _all_grey(loaded)
    # Linear 0..65535 ramp: rescaled, the middle is mid-grey (PIL's plain conversion would clip it to white).
    assert pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == 255
    assert 100 < pixels[32, 0, 0] < 156


def _first_frame_red(loaded):
    r, g, b = np.asarray(loaded.image)[16, 16]
    assert r > 200 and g < 60 and b < 60


def _transparent_is_white(loaded):
    pixels = np.asarray(loaded.image)
    assert tuple(pixels[8, 2]) == (200, 0, 0)
    assert tuple(pixels[8, 13]) == (255, 255, 255)


def _rotated_90(loaded):
    # Orientation 6: stored 40x20 (blue left, red right), displayed 20x40 rotated clockwise: blue on top.
    assert (loaded.width, loaded.height) == (20, 40) and loaded.image.size == (20, 40)
    top, bottom = np.asarray(loaded.image)[5, 10], np.asarray(loaded.image)[35, 10]
    assert top[2] > 150 and top[0] < 100 and bottom[0] > 150 and bottom[2] < 100


def _rotated_180(loaded):
    assert (loaded.width, loaded.height) == (40, 20)
    left, right = np.asarray(loaded.image)[10, 5], np.asarray(loaded.image)[10, 35]
    assert left[0] > 150 and right[2] > 150


def _big_bounded(loaded):
    assert (loaded.width, loaded.height) == (4000, 3000)
    assert max(loaded.image.size) <= 1333


def _rgb(size):
    def check(loaded):
        assert loaded.image.mode == "RGB"
        assert loaded.image.size == size

    return check


CASES = [
    # Not images at all.
    Case("zero_bytes", lambda: b"", "empty file"),
    Case("text_named_jpg", lambda: b"this is not a picture, just some words\n" * 3, "not a recognised image format"),
    Case(
        "html_named_png", lambda: b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "text/HTML", suffix=".png"
    ),
    Case("json_named_jpg", lambda: b'{"error": "rate limited"}', "not a recognised image format"),
    Case("svg_named_png", lambda: b'<svg xmlns="http://www.w3.org/2000/svg"/>', "not a recognised", suffix=".png"),
    Case("pdf_named_jpg", lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "not a recognised"),
    Case("gzip_named_png", lambda: zlib.compress(b"x" * 500), "not a recognised", suffix=".png"),
    Case(
        "random_bytes",
        lambda: np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "not a recognised",
    ),
    Case("jpeg_magic_only", lambda: b"\xff\xd8", "not a recognised"),
    Case("png_magic_only", lambda: b"\x89PNG\r\n\x1a\n", "cannot load image", suffix=".png"),
    # Truncated downloads.
    Case("jpeg_cut_10_bytes", lambda: _JPEG[:10], "cannot load image"),
    Case("jpeg_cut_30pct", lambda: truncated(_JPEG, 0.3), "truncated or corrupt"),
    Case("jpeg_cut_60pct", lambda: truncated(_JPEG, 0.6), "truncated or corrupt"),
    Case("jpeg_cut_90pct", lambda: truncated(_JPEG, 0.9), "truncated or corrupt"),
    Case("png_cut_20pct", lambda: truncated(_PNG, 0.2), "truncated or corrupt", suffix=".png"),
    Case("png_cut_70pct", lambda: truncated(_PNG, 0.7), "truncated or corrupt", suffix=".png"),
    Case("gif_cut_50pct", lambda: truncated(_GIF, 0.5), "truncated or corrupt", suffix=".gif"),
    Case("tiff_cut_50pct", lambda: truncated(_TIFF, 0.5), "cannot load image", suffix=".tiff"),
    Case("png_bad_crc", lambda: _PNG[:40] + bytes([_PNG[40] ^ 0xFF]) + _PNG[41:], "cannot load image", suffix=".png"),
    # Degenerate geometry.
    Case("one_by_one", lambda: encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "too small", suffix=".png"),
    Case("one_by_10000", lambda: encode(Image.new("L", (1, 10000), 7), "PNG"), "too small", suffix=".png"),
    Case("10000_by_1", lambda: encode(Image.new("L", (10000, 1), 8), "PNG"), "too small", suffix=".png"),
    Case("three_by_three", lambda: encode(noise(3, 3, 6), "PNG"), "too small", suffix=".png"),
    Case("aspect_20_by_2000", lambda: encode(noise(20, 2000, 7), "PNG"), "extreme aspect ratio", suffix=".png"),
    Case("png_zero_size", lambda: png_header_only(0, 0), "cannot load image", suffix=".png"),
    # Decompression bombs: tiny files, huge declared sizes.
    Case(
        "png_bomb_100k_square",
        lambda: png_header_only(100_000, 100_000, zlib.compress(b"\0" * 100)),
        "bomb",
        suffix=".png",
    ),
    Case("png_bomb_9000_square", lambda: png_zero_bomb(9000, 9000), "max_image_pixels", suffix=".png"),
    Case("jpeg_bomb_20000_square", lambda: jpeg_with_size(20000, 20000, 8), "bomb"),
    Case("jpeg_bomb_8500_square", lambda: jpeg_with_size(8500, 8500, 9), "max_image_pixels"),
    Case("bmp_bomb_30000_square", lambda: bmp_with_size(30000, 30000), "bomb", suffix=".bmp"),
    # Odd but valid: must load as a viewer shows them.
    Case("greyscale_jpeg", lambda: encode(noise(64, 48, 10, "L"), "JPEG"), check=_all_grey),
    Case("grey16_png", lambda: grey16_gradient(), check=_grey16_scaled, suffix=".png"),
    Case("grey16_tiff", lambda: grey16_gradient("TIFF"), check=_grey16_scaled, suffix=".tiff"),
    Case(
        "grey32_tiff",
        lambda: encode(Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.int32)), "TIFF"),
        check=_grey16_scaled,
        suffix=".tiff",
    ),
    Case(
        "float_tiff",
        lambda: encode(Image.fromarray(np.linspace(0, 255, 32 * 32, dtype=np.float32).reshape(32, 32)), "TIFF"),
        check=_all_grey,
        suffix=".tiff",
    ),
    Case("cmyk_jpeg", lambda: encode(noise(40, 30, 11).convert("CMYK"), "JPEG"), check=_rgb((40, 30))),
    Case("rgba_png", rgba_half_transparent, check=_transparent_is_white, suffix=".png"),
    Case("la_png", lambda: encode(noise(24, 24, 12, "L").convert("LA"), "PNG"), check=_all_grey, suffix=".png"),
    Case("palette_png", lambda: encode(noise(32, 32, 13).convert("P"), "PNG"), check=_rgb((32, 32)), suffix=".png"),
    Case(
        "palette_transparent_png",
        lambda: encode(noise(32, 32, 14).convert("P"), "PNG", transparency=0),
        check=_rgb((32, 32)),
        suffix=".png",
    ),
    Case("bilevel_png", lambda: encode(noise(32, 32, 15, "L").convert("1"), "PNG"), check=_all_grey, suffix=".png"),
    Case("animated_gif", lambda: animated("GIF"), check=_first_frame_red, suffix=".gif"),
    Case("animated_png", lambda: animated("PNG"), check=_first_frame_red, suffix=".png"),
    Case("exif_rotate_90", lambda: exif_rotated(6, 0), check=_rotated_90),
    Case("exif_rotate_180", lambda: exif_rotated(3, 1), check=_rotated_180),
    Case("progressive_jpeg", lambda: encode(noise(64, 64, 16), "JPEG", progressive=True), check=_rgb((64, 64))),
    Case("interlaced_png", lambda: encode(noise(64, 64, 17), "PNG", interlace=1), check=_rgb((64, 64)), suffix=".png"),
    Case("bmp", lambda: encode(noise(30, 20, 18), "BMP"), check=_rgb((30, 20)), suffix=".bmp"),
    Case("webp", lambda: encode(noise(30, 20, 19), "WEBP"), check=_rgb((30, 20)), suffix=".webp"),
    Case(
        "big_jpeg_4000x3000",
        lambda: encode(Image.linear_gradient("L").resize((4000, 3000)).convert("RGB"), "JPEG"),
        check=_big_bounded,
    ),
    Case("jpeg_named_png", lambda: encode(noise(20, 20, 20), "JPEG"), check=_rgb((20, 20)), suffix=".png"),
    # In-memory inputs.
    Case("numpy_empty", lambda: np.zeros((0, 0, 3), dtype=np.uint8), "empty array"),
    Case("numpy_nan", lambda: np.full((8, 8, 3), np.nan, dtype=np.float32), "NaN"),
    Case("numpy_five_channels", lambda: np.zeros((8, 8, 5), dtype=np.uint8), "unsupported array shape"),
    Case("numpy_1d", lambda: np.zeros(64, dtype=np.uint8), "unsupported array shape"),
    Case("numpy_one_pixel", lambda: np.zeros((1, 1, 3), dtype=np.uint8), "too small"),
    Case("torch_tiny", lambda: torch.zeros(3, 2, 2), "too small"),
    Case("not_an_image_object", lambda: 12345, "unsupported input type"),
    Case("numpy_uint16_grey", lambda: np.full((16, 16), 32768, dtype=np.uint16), check=_all_grey),
    Case("numpy_float_chw", lambda: np.full((3, 10, 12), 0.5, dtype=np.float32), check=_rgb((12, 10))),
    Case("numpy_bool_mask", lambda: np.eye(16, dtype=bool), check=_all_grey),
    Case(
        "numpy_rgba",
        lambda: np.dstack([np.full((8, 8, 3), 10, np.uint8), np.zeros((8, 8, 1), np.uint8)]),
        check=lambda x: np.testing.assert_array_equal(np.asarray(x.image), 255),
    ),
    Case("torch_uint8_chw", lambda: torch.full((3, 9, 7), 200, dtype=torch.uint8), check=_rgb((7, 9))),
    Case("pil_ycbcr", lambda: noise(20, 20, 21).convert("YCbCr"), check=_rgb((20, 20))),
    Case("pil_lab", lambda: noise(20, 20, 22).convert("LAB"), check=_rgb((20, 20))),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, object]:
    """Every case's input: a file path for byte cases, the object itself otherwise."""
    folder = tmp_path_factory.mktemp("bad_images")
    inputs = {}
    for case in CASES:
        made = case.make()
        if isinstance(made, bytes):
            path = folder / f"{case.name}{case.suffix}"
            path.write_bytes(made)
            inputs[case.name] = str(path)
        else:
            inputs[case.name] = made
    directory = folder / "a_directory.jpg"
    directory.mkdir()
    inputs["directory_named_jpg"] = str(directory)
    inputs["missing_file"] = str(folder / "does_not_exist.jpg")
    return inputs


EXTRA_ERRORS = {"directory_named_jpg": "not a regular file", "missing_file": "file not found"}
EXPECTED_ERRORS = {case.name: case.error for case in CASES if case.error} | EXTRA_ERRORS


def test_corpus_is_large_enough(corpus):
    assert len(corpus) >= 50
    assert sum(1 for name in corpus if name in EXPECTED_ERRORS) >= 30


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_each_case_loads_or_fails_clearly(corpus, case):
    image = corpus[case.name]
    if case.error is None:
        loaded = load_image(image)
        assert loaded.image.mode == "RGB"
        case.check(loaded)
        return
    with pytest.raises(ImageLoadError) as info:
        load_image(image)
    message = str(info.value)
    assert case.error in message, message
    if isinstance(image, str):
        # The message names the file, so a log line is enough to find it.
        assert Path(image).name in message


@pytest.mark.parametrize("name", sorted(EXTRA_ERRORS))
def test_path_errors(corpus, name):
    with pytest.raises(ImageLoadError, match=EXTRA_ERRORS[name]):
        load_image(corpus[name])


def test_file_size_limit(corpus):
    with pytest.raises(ImageLoadError, match="file too large"):
        load_image(corpus["greyscale_jpeg"], max_file_bytes=100)


def test_bombs_use_bounded_memory(corpus):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name in ("png_bomb_100k_square", "png_bomb_9000_square", "jpeg_bomb_20000_square", "bmp_bomb_30000_square"):
        with pytest.raises(ImageLoadError):
            load_image(corpus[name])
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    # Decoding the smallest of them would take 81 MB, the largest 10 GB.
    assert grown_mib < 64, f"peak memory grew by {grown_mib:.0f} MiB"


@pytest.fixture(scope="module")
def tiny_extractor(make_tiny_extractor):
    return make_tiny_extractor(max_regions=5, return_class_probs=False)


def test_extractor_records_every_bad_input(corpus, tiny_extractor):
    names = list(corpus)
    records = tiny_extractor.extract([corpus[name] for name in names], on_error="record")
    assert len(records) == len(names)
    for name, record in zip(names, records):
        if name in EXPECTED_ERRORS:
            assert record["error"] and EXPECTED_ERRORS[name] in f"cannot load image {name}: {record['error']}"
            assert record["num_regions"] == 0 and record["region_features"].shape == (0, 256)
        else:
            assert record["error"] is None, (name, record["error"])
            assert record["num_regions"] == 5 and np.isfinite(record["region_features"]).all()


def test_extractor_raises_by_default(corpus, tiny_extractor):
    with pytest.raises(ImageLoadError, match="empty file"):
        tiny_extractor.extract([corpus["greyscale_jpeg"], corpus["zero_bytes"]])


def test_cache_counts_and_skips_bad_files(corpus, tiny_extractor, tmp_path):
    from imagebert_hf.regions import extract_regions, load_region_cache

    files = {name: value for name, value in corpus.items() if isinstance(value, str)}
    manifest = tmp_path / "bad.jsonl"
    with open(manifest, "w") as handle:
        for name, path in files.items():
            handle.write(json.dumps({"image": path, "captions": [name]}) + "\n")
    # The corpus lies in another temporary folder, named by absolute paths.
    report = extract_regions(
        manifest, tmp_path / "cache", tiny_extractor, allow_outside_root=True, shard_size=16, progress=False
    )
    expected_bad = {files[name] for name in files if name in EXPECTED_ERRORS}
    assert report.num_items == len(files)
    assert report.num_failed == len(expected_bad)
    assert report.num_extracted == len(files) - len(expected_bad)
    assert report.num_duplicates == 0
    assert {failure["key"] for failure in report.failures} == expected_bad
    saved = json.loads((tmp_path / "cache" / "report.json").read_text())
    assert saved["num_failed"] == len(expected_bad)
    cache = load_region_cache(tmp_path / "cache")
    assert set(cache.errors) == expected_bad
    assert set(cache.keys()) == set(files.values()) - expected_bad
    with pytest.raises(KeyError, match="empty file"):
        cache[files["zero_bytes"]]


# --------------------------------------------------------------------------------- the 12000 x 12000 PNG bomb
# A 140 kB greyscale PNG that declares 12000 x 12000 pixels (144 M, over the 64 M limit, under PIL's own 179 M):
# decoding it takes 137 MiB, more once converted. The size check must come before any pixel is decoded (reading a
# PNG's EXIF decodes it), on every path.

BOMB_SIDE = 12000


@pytest.fixture(scope="module")
def png_bomb_12000(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb_12000.png"
    path.write_bytes(png_zero_bomb(BOMB_SIDE, BOMB_SIDE))
    return path


def _bomb_paths():
    """Every way a user hands us an image file or its bytes, and what each must answer."""
    from imagebert_hf.curation.config import ImageFilterConfig
    from imagebert_hf.curation.fitting import photo_statistics
    from imagebert_hf.curation.image_filters import decode_image

    def curation_stage(path):
        image, _, _, reason = decode_image(Path(path).read_bytes(), ImageFilterConfig())
        assert image is None and reason == "decompression_bomb"
        raise ValueError(reason)  # the stage counts the reason; here it is the answer

    def extractor(path):
        ImageBERTRoIExtractor(backbone_name="test_efficientnet", backbone_weights=None).extract(str(path))

    return {
        "bytes": lambda path: load_image(Path(path).read_bytes()),
        "file": lambda path: load_image(str(path)),
        "datasets_dict": lambda path: load_image({"bytes": Path(path).read_bytes(), "path": None}),
        "extractor": extractor,
        "curation_stage": curation_stage,
        "curation_training": photo_statistics,
    }


BOMB_PATHS = ["bytes", "file", "datasets_dict", "extractor", "curation_stage", "curation_training"]


@pytest.mark.parametrize("name", BOMB_PATHS)
def test_bomb_is_refused_before_any_pixel_is_decoded(png_bomb_12000, monkeypatch, name):
    from PIL import ImageFile, ImageOps

    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self, *a: decoded.append("load") or 1 / 0)
    monkeypatch.setattr(ImageOps, "exif_transpose", lambda image, **k: decoded.append("exif_transpose") or 1 / 0)
    try:
        _bomb_paths()[name](png_bomb_12000)
    except ZeroDivisionError:
        pass  # reached a decode: the list says which
    except (ImageLoadError, ValueError) as error:
        assert "12000x12000" in str(error) or "decompression_bomb" in str(error), str(error)
    assert decoded == [], f"{name}: {decoded} ran before the size check"


def _reset_peak_rss() -> bool:
    """Resets the process's peak resident memory (Linux `clear_refs`); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


@pytest.mark.parametrize("name", BOMB_PATHS)
def test_bomb_memory_stays_bounded(png_bomb_12000, name):
    """Peak memory while each path refuses the bomb, measured from a reset peak (a test session's earlier peak
    would hide the growth otherwise)."""
    call = _bomb_paths()[name]
    data = png_bomb_12000.read_bytes()  # the file is read before the peak is reset
    assert data
    if not _reset_peak_rss():
        pytest.skip("the peak resident memory cannot be reset here (needs Linux /proc/self/clear_refs)")
    before = _peak_rss_mib()
    with pytest.raises((ImageLoadError, ValueError), match="12000x12000|decompression_bomb"):
        call(png_bomb_12000)
    grown = _peak_rss_mib() - before
    # Decoding would take 137 MiB at least; the refused header costs a few.
    assert grown < 48, f"{name}: peak memory grew by {grown:.0f} MiB"


@pytest.mark.parametrize(("orientation", "check"), [(6, _rotated_90), (3, _rotated_180)])
def test_an_opened_pil_image_is_rotated_as_its_file_is(orientation, check):
    """`Image.open(path)` leaves the EXIF orientation unapplied; the loader applies it as it does for the path, so
    the same photo gives the same pixels and size either way."""
    data = exif_rotated(orientation, 0)
    from_bytes, from_pil = load_image(data), load_image(Image.open(io.BytesIO(data)))
    check(from_pil)
    assert np.array_equal(np.asarray(from_pil.image), np.asarray(from_bytes.image))
    assert load_image(Image.open(io.BytesIO(data)), apply_exif_orientation=False).image.size == (40, 20)


# ------------------------------------------------------------------------------------------------ formats outside
# the accepted ones: Pillow decodes an EPS by running Ghostscript on it, whatever the file is named.

_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\nnewpath 0 0 moveto 64 64 lineto stroke\n"


@pytest.fixture
def ghostscript_calls(tmp_path, monkeypatch):
    """A `gs` first on PATH that records each call: Pillow's EPS decoder runs it (and checks `gs --version`)."""
    folder, log = tmp_path / "bin", tmp_path / "gs_calls.txt"
    folder.mkdir()
    script = folder / "gs"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 1\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ.get('PATH', '')}")
    return log


def test_an_eps_upload_is_refused_without_running_ghostscript(tmp_path, ghostscript_calls):
    from imagebert_hf.models.imagebert.roi_image_loading import image_header_size

    upload = tmp_path / "photo.jpg"
    upload.write_bytes(_EPS + b"showpage\n%%EOF\n")
    for given in (upload, upload.read_bytes()):
        with pytest.raises(ImageLoadError, match="not a recognised image format.*accepted: JPEG") as info:
            load_image(given)
        assert info.value.code == "not_an_image"
    assert image_header_size(upload) is None
    # An EPS that a program opened (a `datasets` column decodes lazily) is refused before its pixels are decoded.
    with Image.open(upload) as opened, pytest.raises(ImageLoadError, match="EPS image is not read") as info:
        load_image(opened)
    assert info.value.code == "not_an_image"
    assert not ghostscript_calls.exists(), ghostscript_calls.read_text()


def test_sixteen_bit_pixels_convert_in_bounded_memory_and_as_before(tmp_path):
    from imagebert_hf.models.imagebert.roi_image_loading import sixteen_bit_to_uint8

    every = np.arange(65536, dtype=np.uint16)
    assert np.array_equal(sixteen_bit_to_uint8(every), np.round(every / 257.0).astype(np.uint8))
    wide = np.array([-5, 0, 128, 129, 65535, 70_000, 2**40], dtype=np.int64)
    assert sixteen_bit_to_uint8(wide).tolist() == [0, 0, 0, 1, 255, 255, 255]
    path = tmp_path / "grey16.png"
    Image.new("I;16", (6000, 6000)).save(path)
    if not _reset_peak_rss():
        pytest.skip("the peak resident memory cannot be reset here (needs Linux /proc/self/clear_refs)")
    before = _peak_rss_mib()
    loaded = load_image(path)
    grown = _peak_rss_mib() - before
    assert loaded.image.size == (1333, 1333)
    # The decoded 16-bit image (69 MiB), its array and its RGB copy; float64 temporaries would add 550 MiB.
    assert grown < 300, f"peak memory grew by {grown:.0f} MiB"


@pytest.mark.parametrize(("mode", "straight"), [("La", "LA"), ("RGBa", "RGBA")])
def test_premultiplied_alpha_images_composite_on_white_as_their_straight_modes(mode, straight):
    pixels = np.zeros((8, 8, 2 if mode == "La" else 4), dtype=np.uint8)
    pixels[..., :-1], pixels[:4, ..., -1] = 120, 255  # the top half opaque grey, the bottom half transparent
    premultiplied = Image.fromarray(pixels, straight).convert(mode)
    loaded = np.asarray(load_image(premultiplied).image)
    assert loaded[:4].tolist() == np.full((4, 8, 3), 120).tolist()
    assert loaded[4:].tolist() == np.full((4, 8, 3), 255).tolist()
