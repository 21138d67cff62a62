"""Defensive image loading: any common input becomes an RGB PIL image with its size, or an `ImageLoadError`.

Web images are messy (truncated downloads, HTML saved as `.jpg`, CMYK scans, 16-bit PNGs, animated GIFs, EXIF
rotations, decompression bombs). Every check that can be made on the header is made before pixels are decoded, so a
hostile file costs at most `max_file_bytes` of reading and never a huge allocation.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import multiprocessing
import os
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
DEFAULT_MIN_IMAGE_SIDE = 4
DEFAULT_MAX_ASPECT_RATIO = 50.0
DEFAULT_MAX_DECODE_SIDE = 1333

# Float pixels whose maximum is at most FLOAT_UNIT_MAX are [0, 1] data, above it 0..255 data up to FLOAT_BYTE_MAX,
# above that 0..65535 data up to FLOAT_SIXTEEN_MAX. Resampling a [0, 1] image overshoots at sharp edges: torch's
# bicubic resize of a photo reaches about 1.08, and the worst case (pixel-wise noise) about 1.45 for bicubic and 1.7
# for Lanczos-3, all below 2; a 0..255 image whose brightest pixel is at most 2 is black to the eye whichever way it
# is read, as is a 0..65535 image whose brightest pixel is at most 510. The same relative margin bounds each range.
FLOAT_UNIT_MAX = 2.0
FLOAT_BYTE_MAX = 255.0 * FLOAT_UNIT_MAX
FLOAT_SIXTEEN_MAX = 65535.0 * FLOAT_UNIT_MAX
# The minimum may lie below 0 by at most this fraction of the maximum (of 1 for a dark [0, 1] image): a resampling
# undershoot is a fraction of the image's range (at most about 0.7 of 1.7 in the worst case above), while normalised
# pixels ([-1, 1], or mean/std with a minimum near minus the maximum) are not pixels this loader can read.
FLOAT_MIN_MARGIN = 0.5

# The formats read from files and bytes: those photos come in from cameras, the web and datasets (HEIF where a plugin
# such as pillow-heif registers it). Pillow opens many more, and decoding some runs an external program on the file
# (EPS runs Ghostscript): an upload's bytes are untrusted whatever its name says.
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "AVIF", "HEIF", "BMP", "TIFF", "PPM")
# Pixels converted per step from a wide dtype to uint8, so the temporaries of a large image stay a few megabytes.
_CONVERSION_CHUNK = 1 << 20


class RegionExtractionError(ValueError):
    """Regions could not be extracted for one input; `source` names it and `reason` says why."""

    action = "cannot extract regions for"

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{self.action} {source}: {reason}")

    def __reduce__(self):
        # Keeps the two fields when the error crosses a process boundary (multiprocessing pickles it).
        return (self.__class__, (self.source, self.reason))


class ImageLoadError(RegionExtractionError):
    """An image could not be turned into pixels: missing, empty, not an image, truncated, too large, too small.

    `code` names the kind for counting (curation tallies drops by it): `empty_image`, `not_an_image`,
    `corrupt_image`, `decompression_bomb`, `too_small`, `extreme_aspect_ratio`, `file_too_large` or
    `unreadable_image` (missing file, unsupported input, bad array)."""

    action = "cannot load image"

    def __init__(self, source: str, reason: str, code: str = "unreadable_image"):
        self.code = code
        super().__init__(source, reason)

    def __reduce__(self):
        return (self.__class__, (self.source, self.reason, self.code))


@dataclass
class LoadedImage:
    """An RGB image ready for a backbone, and the frame its boxes refer to.

    Attributes:
        image (`PIL.Image.Image`): RGB pixels, possibly downscaled from the original to bound memory; None once
            `pixels` holds what the backend reads.
        width (`int`): Width of the original image (after EXIF orientation), the frame of all boxes.
        height (`int`): Height of the original image.
        image_id (`str`): sha1 of the file bytes, or of the pixels for in-memory images.
        source (`str`): A printable name of the input (its path, or its type).
        pixels (`torch.Tensor`, *optional*): The backend's input made ahead of time (for the backbone: the
            resized (H, W, 3) uint8 pixels), when a worker process prepared it; backends recompute it otherwise.
    """

    image: Image.Image | None
    width: int
    height: int
    image_id: str
    source: str
    pixels: Any = None


def sha1_hex(data: bytes | memoryview) -> str:
    return hashlib.sha1(data).hexdigest()


def describe_source(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, dict):
        return str(image.get("path") or "<image bytes>")
    return f"<{type(image).__name__}>"


def read_image_bytes(path: str | os.PathLike, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """Reads a file's bytes after checking that it exists, is a file and is neither empty nor too large."""
    source = str(path)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise ImageLoadError(source, "file not found") from None
    except OSError as error:
        raise ImageLoadError(source, f"cannot stat file ({error.strerror or error})") from None
    if not os.path.isfile(path):
        raise ImageLoadError(source, "not a regular file")
    if size == 0:
        raise ImageLoadError(source, "empty file (0 bytes)", "empty_image")
    if size > max_file_bytes:
        raise ImageLoadError(
            source, f"file too large ({size} bytes > max_file_bytes={max_file_bytes})", "file_too_large"
        )
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ImageLoadError(source, f"cannot read file ({error.strerror or error})") from None


def _check_geometry(source: str, width: int, height: int, max_image_pixels: int, min_side: int, max_aspect: float):
    if width <= 0 or height <= 0:
        raise ImageLoadError(source, f"image has no pixels ({width}x{height})")
    if width * height > max_image_pixels:
        raise ImageLoadError(
            source,
            f"declared size {width}x{height} = {width * height} pixels exceeds max_image_pixels={max_image_pixels} "
            "(possible decompression bomb)",
            "decompression_bomb",
        )
    if min(width, height) < min_side:
        raise ImageLoadError(source, f"image too small ({width}x{height}; min_image_side={min_side})", "too_small")
    aspect = max(width, height) / min(width, height)
    if aspect > max_aspect:
        raise ImageLoadError(
            source,
            f"extreme aspect ratio {aspect:.1f} ({width}x{height}; max_aspect_ratio={max_aspect})",
            "extreme_aspect_ratio",
        )


def _flatten_alpha(image: Image.Image) -> Image.Image:
    # Transparent pixels carry arbitrary colours; compositing on white is what a browser shows.
    if image.mode == "La":  # premultiplied: Pillow converts it to "LA" only
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def open_image_file(file) -> Image.Image:
    """`PIL.Image.open` of a path or file object limited to `IMAGE_FORMATS` (those registered in this process); any
    other format raises `UnidentifiedImageError`, as a file that is no image does."""
    Image.init()
    return Image.open(file, formats=[name for name in IMAGE_FORMATS if name in Image.OPEN])


def _check_image_format(image: Image.Image, source: str) -> None:
    """Refuses a PIL image opened from a file of a format outside `IMAGE_FORMATS` whose pixels are not decoded yet:
    decoding it is what would run the format's external program."""
    if image.format is not None and image.format not in IMAGE_FORMATS and getattr(image, "tile", None):
        raise ImageLoadError(
            source,
            f"a {image.format} image is not read (accepted formats: {', '.join(IMAGE_FORMATS)}); decode it yourself "
            "(image.convert('RGB')) if you trust the file",
            "not_an_image",
        )


def _chunked_to_uint8(array: np.ndarray, convert: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`convert` (wide pixels to uint8) applied a chunk at a time: a 64-megapixel 16-bit image would otherwise take
    gigabytes of float64 temporaries."""
    flat = np.ascontiguousarray(array).reshape(-1)
    result = np.empty(flat.shape, dtype=np.uint8)
    for start in range(0, flat.size, _CONVERSION_CHUNK):
        result[start : start + _CONVERSION_CHUNK] = convert(flat[start : start + _CONVERSION_CHUNK])
    return result.reshape(array.shape)


def float_pixels_to_uint8(array: np.ndarray, source: str) -> np.ndarray:
    """uint8 pixels from float pixels in [0, 1], 0..255 or 0..65535: the one rule for float arrays, tensors and float
    ("F") images, so that a picture reads the same whichever of them holds it.

    The scale is chosen by the maximum: [0, 1] up to `FLOAT_UNIT_MAX` (a resampling overshoot above 1 is clipped),
    0..255 up to `FLOAT_BYTE_MAX`, 0..65535 (16-bit data, e.g. a 16-bit PNG converted to "F") up to
    `FLOAT_SIXTEEN_MAX`; the minimum may lie below 0 by at most `FLOAT_MIN_MARGIN` times the maximum (or times 1 for
    [0, 1] data). Values are clipped to the range and scaled. Anything else (NaN, infinities, values far above 65535,
    a range mostly below 0) raises `ImageLoadError` naming the range found.
    """
    low, high = float(np.min(array)), float(np.max(array))
    expected = (
        f"expected floats in [0, 1], 0..255 or 0..65535 (a maximum up to {FLOAT_UNIT_MAX:g}, {FLOAT_BYTE_MAX:g}, "
        f"resp. {FLOAT_SIXTEEN_MAX:g}, and a minimum down to -{FLOAT_MIN_MARGIN:g} times it are clipped)"
    )
    if not (np.isfinite(low) and np.isfinite(high)):
        finite = array[np.isfinite(array)]
        found = f"finite values from {finite.min():.6g} to {finite.max():.6g}" if finite.size else "no finite value"
        bad = array.size - finite.size
        raise ImageLoadError(source, f"float pixels contain {bad} NaN or infinite values ({found}); {expected}")
    if high > FLOAT_SIXTEEN_MAX or low < -FLOAT_MIN_MARGIN * max(high, 1.0):
        raise ImageLoadError(source, f"float pixels range from {low:.6g} to {high:.6g}; {expected}")
    if high > FLOAT_BYTE_MAX:
        return sixteen_bit_to_uint8(array)
    top = 1.0 if high <= FLOAT_UNIT_MAX else 255.0
    return _chunked_to_uint8(array, lambda chunk: np.round(np.clip(chunk, 0.0, top) * (255.0 / top)))


def sixteen_bit_to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 pixels from 16-bit pixels (uint16 arrays, "I;16" images), scaled from 0..65535 whatever the brightest
    pixel: a dark 16-bit picture stays dark, as viewers show it. Values outside 0..65535 are clipped."""
    if np.issubdtype(array.dtype, np.integer):
        # round(v / 257) in integers: v / 257 never ends in exactly .5, so rounding half up is rounding to nearest.
        return _chunked_to_uint8(array, lambda chunk: (np.clip(chunk, 0, 65535).astype(np.uint32) * 2 + 257) // 514)
    return _chunked_to_uint8(array, lambda chunk: np.round(np.clip(chunk.astype(np.float64), 0, 65535) / 257.0))


def integer_pixels_to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 pixels from integers held wider than their depth (int32/int64 arrays, 32-bit "I" images, which is what
    `Image.fromarray`, `convert("I")` and `datasets` make of 8-bit data): 0..255 data when the brightest pixel is at
    most 255, else 16-bit data on the 0..65535 scale. Values outside the range are clipped."""
    if array.max() > 255:
        return sixteen_bit_to_uint8(array)
    return _chunked_to_uint8(array, lambda chunk: np.clip(chunk, 0, 255))


def to_rgb(image: Image.Image, source: str = "<PIL.Image>") -> Image.Image:
    """Converts any PIL mode to 8-bit RGB, rescaling high bit depths instead of clipping them.

    16-bit modes ("I;16*") follow `sixteen_bit_to_uint8` as uint16 arrays do, 32-bit integer ("I") images
    `integer_pixels_to_uint8` as int32/int64 arrays do, and float ("F") images `float_pixels_to_uint8` as float
    arrays do; raises `ImageLoadError` naming `source` for float pixels of no accepted range."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "RGBa", "La", "PA") or (mode == "P" and "transparency" in image.info):
        return _flatten_alpha(image)
    if mode == "F":
        return Image.fromarray(float_pixels_to_uint8(np.asarray(image), source)).convert("RGB")
    # PIL's own "L" conversion would clip 16-bit data to white.
    if mode.startswith("I;16"):
        return Image.fromarray(sixteen_bit_to_uint8(np.asarray(image))).convert("RGB")
    if mode == "I":
        return Image.fromarray(integer_pixels_to_uint8(np.asarray(image))).convert("RGB")
    return image.convert("RGB")


def _tensor_pixels(tensor, source: str) -> np.ndarray:
    """A torch tensor's pixels as a numpy array: floating point as float32 (numpy has no bfloat16)."""
    if tensor.is_meta:
        raise ImageLoadError(source, "a tensor on the meta device holds no pixels")
    if tensor.is_complex():
        raise ImageLoadError(source, f"a tensor of dtype {tensor.dtype} holds no pixel values")
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def _array_to_pil(array: np.ndarray, source: str) -> Image.Image:
    if array.dtype.kind not in "biuf":
        raise ImageLoadError(
            source, f"an array of dtype {array.dtype} holds no pixel values (expected bool, integers or floats)"
        )
    if array.size == 0:
        raise ImageLoadError(source, f"empty array of shape {tuple(array.shape)}")
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageLoadError(source, f"unsupported array shape {tuple(array.shape)} (expected HxW, HxWxC or CxHxW)")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = sixteen_bit_to_uint8(array)
    elif np.issubdtype(array.dtype, np.floating):
        array = float_pixels_to_uint8(array, source)
    elif array.dtype != np.uint8:
        # Other integers are what PIL holds as "I" (`Image.fromarray` of int8..int32): the same rule as those images.
        array = integer_pixels_to_uint8(array)
    if array.ndim == 3 and array.shape[-1] == 4:
        return _flatten_alpha(Image.fromarray(np.ascontiguousarray(array)))
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)), source)


def _decode_bytes(
    data: bytes,
    source: str,
    max_image_pixels: int,
    min_side: int,
    max_aspect: float,
    max_decode_side: int,
    apply_exif_orientation: bool,
    draft_margin: int = 2,
) -> tuple[Image.Image, int, int]:
    with warnings.catch_warnings():
        # Our own pixel limit is checked below, before decoding; PIL's warning would only add noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = open_image_file(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            raise ImageLoadError(
                source, f"declared size too large, possible decompression bomb ({error})", "decompression_bomb"
            ) from None
        except UnidentifiedImageError:
            head = data[:32].lstrip().lower()
            hint = " (looks like text/HTML)" if head.startswith((b"<", b"{", b"[")) or head.isascii() else ""
            raise ImageLoadError(
                source, f"not a recognised image format{hint}; accepted: {', '.join(IMAGE_FORMATS)}", "not_an_image"
            ) from None
        except Exception as error:  # PIL raises many types on corrupt headers
            raise ImageLoadError(
                source, f"corrupt image header ({type(error).__name__}: {error})", "corrupt_image"
            ) from None
        width, height = image.size
        try:
            # The header's size is checked before anything else is read: the limits do not depend on which side
            # is which, and reading the EXIF of a PNG decodes the whole image when the EXIF follows the pixels.
            _check_geometry(source, width, height, max_image_pixels, min_side, max_aspect)
            # Pillow turns a TIFF as it decodes it, whatever `apply_exif_orientation` says: its tag is read then too.
            orientation = image.getexif().get(0x0112, 1) if apply_exif_orientation or image.format == "TIFF" else 1
            if getattr(image, "is_animated", False):
                image.seek(0)
            if image.format == "JPEG" and max(width, height) > draft_margin * max_decode_side:
                # JPEG can decode at 1/2, 1/4 or 1/8 scale directly: large photos never reach full size in memory.
                image.draft("RGB", (draft_margin * max_decode_side, draft_margin * max_decode_side))
            image.load()
            if orientation != 1 and image.getexif().get(0x0112, 1) != orientation:
                # Pillow applied the orientation as it decoded (a TIFF) and dropped the tag; its header's size may
                # have been the turned one already or not. Not drafted, the pixels are the frame.
                (width, height), orientation = image.size, 1
            elif not apply_exif_orientation:
                orientation = 1
            elif orientation in (5, 6, 7, 8):  # they swap the axes of the displayed image (the frame of all boxes)
                width, height = height, width
        except ImageLoadError:
            raise
        except Image.DecompressionBombError as error:
            raise ImageLoadError(source, f"possible decompression bomb ({error})", "decompression_bomb") from None
        except Exception as error:  # truncated data surfaces as OSError, SyntaxError, EOFError, struct.error...
            raise ImageLoadError(
                source, f"truncated or corrupt image data ({type(error).__name__}: {error})", "corrupt_image"
            ) from None
        if apply_exif_orientation and orientation != 1:
            with contextlib.suppress(Exception):  # a broken EXIF block must not cost the image
                image = ImageOps.exif_transpose(image)
        image = to_rgb(image, source)
    return image, width, height


def load_image(
    image: Any,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    min_image_side: int = DEFAULT_MIN_IMAGE_SIDE,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    max_decode_side: int = DEFAULT_MAX_DECODE_SIDE,
    apply_exif_orientation: bool = True,
    draft_margin: int = 2,
) -> LoadedImage:
    """Loads one image from a path, bytes, a `datasets` image dict, a PIL image, a numpy array or a torch tensor.

    Args:
        image: The input. Arrays may be HxW, HxWxC or CxHxW, uint8/uint16/bool, wider integers (see
            `integer_pixels_to_uint8`) or float in [0, 1] (or 0..255 or 0..65535, see `float_pixels_to_uint8`); a
            dict is the `{"bytes": ..., "path": ...}` form of a `datasets.Image(decode=False)` column.
        max_image_pixels: Largest accepted width * height, checked on the header before any decoding.
        max_file_bytes: Largest accepted file size.
        min_image_side: Smallest accepted side in pixels.
        max_aspect_ratio: Largest accepted long side / short side.
        max_decode_side: Pixels are kept at most this long on their longest side (boxes still refer to the
            original size, see `LoadedImage.width`).
        apply_exif_orientation: Rotate/flip according to the EXIF orientation tag, as viewers display it (Pillow
            turns a TIFF as it decodes it, whatever this says).
        draft_margin: A JPEG longer than `draft_margin * max_decode_side` decodes at a reduced scale (1/2, 1/4,
            1/8) that keeps at least that size before the final resize: 2 keeps detail for region features, 1 is
            the fastest (image statistics).

    Returns:
        A `LoadedImage`.

    Raises:
        ImageLoadError: With the source and the reason, for anything that cannot become an RGB image.
    """
    source = describe_source(image)
    limits = (max_image_pixels, min_image_side, max_aspect_ratio)
    if isinstance(image, dict):
        data = image.get("bytes")
        if data is None and image.get("path"):
            data = read_image_bytes(image["path"], max_file_bytes)
        if data is None:
            raise ImageLoadError(source, "image dict has neither bytes nor path")
        image = bytes(data)
    if isinstance(image, (str, os.PathLike)):
        image = read_image_bytes(Path(image), max_file_bytes)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ImageLoadError(source, "empty file (0 bytes)", "empty_image")
        if len(data) > max_file_bytes:
            raise ImageLoadError(
                source, f"file too large ({len(data)} bytes > max_file_bytes={max_file_bytes})", "file_too_large"
            )
        pil, width, height = _decode_bytes(
            data, source, *limits, max_decode_side, apply_exif_orientation, draft_margin
        )
        image_id = sha1_hex(data)
    else:
        if isinstance(image, Image.Image):
            _check_image_format(image, source)
            _check_geometry(source, image.width, image.height, *limits)
            try:
                if getattr(image, "is_animated", False):
                    image.seek(0)
                # A PIL image opened from a file decodes its pixels only now, so a damaged file fails here.
                image.load()
                # `Image.open(path)` (or a decoded `datasets` image) keeps the EXIF tag unapplied: rotated here as
                # the same photo given by its path is, so both give the same regions.
                if apply_exif_orientation and image.getexif().get(0x0112, 1) != 1:
                    with contextlib.suppress(Exception):  # a broken EXIF block must not cost the image
                        image = ImageOps.exif_transpose(image)
                pil = to_rgb(image, source)
            except ImageLoadError:
                raise
            except Exception as error:  # truncated data surfaces as OSError, SyntaxError, EOFError, struct.error...
                raise ImageLoadError(
                    source, f"truncated or corrupt image data ({type(error).__name__}: {error})", "corrupt_image"
                ) from None
        else:
            if type(image).__module__.startswith("torch"):
                image = _tensor_pixels(image, source)
            if not isinstance(image, np.ndarray):
                raise ImageLoadError(source, f"unsupported input type {type(image).__name__}")
            pil = _array_to_pil(image, source)
            _check_geometry(source, pil.width, pil.height, *limits)
        width, height = pil.size
        pixels = np.asarray(pil)
        image_id = sha1_hex(f"{pixels.shape}".encode() + pixels.tobytes())
    if max(pil.size) > max_decode_side:
        pil = pil.copy()
        pil.thumbnail((max_decode_side, max_decode_side), Image.Resampling.BICUBIC)
    return LoadedImage(image=pil, width=width, height=height, image_id=image_id, source=source)


def image_header_size(
    path: str | os.PathLike, apply_exif_orientation: bool = True, max_image_pixels: int | None = None
) -> tuple[int, int] | None:
    """Width and height of an image file as `load_image` gives it (after its EXIF rotation where it applies one),
    from the header alone, without decoding any pixel; None when the header cannot be read or declares more than
    `max_image_pixels` (loading the image then names why). A PNG file whose eXIf chunk follows its pixel data is
    read chunk header by chunk header to find it, as `load_image`'s decoding does."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_image_file(path) as image:
                width, height = image.size
                if max_image_pixels is not None and width * height > max_image_pixels:
                    return None
                if apply_exif_orientation:
                    # PIL's PNG `getexif` decodes the whole image (64 ms for 2000x1500, against 0.1 ms for the
                    # header) to look for an eXIf chunk after the pixels; the base class reads what `open` parsed
                    # (the eXIf chunk, an ImageMagick EXIF text chunk, XMP) as it does for JPEG, TIFF and WebP.
                    exif = Image.Image.getexif(image) if image.format == "PNG" else image.getexif()
                    orientation = exif.get(0x0112)
                    if orientation is None and image.format == "PNG" and isinstance(path, (str, os.PathLike)):
                        orientation = _png_orientation_after_pixels(path)
                    # Orientations 5-8 turn the image by a quarter turn: the displayed image is the frame of its boxes.
                    # Pillow reports a TIFF's size turned already (from its header's own width and length tags).
                    if orientation in (5, 6, 7, 8) and not _turned_by_pillow(image):
                        width, height = height, width
    except Exception:  # noqa: BLE001 - PIL raises many types on damaged headers, DecompressionBombError among them
        return None
    return width, height


def _turned_by_pillow(image: Image.Image) -> bool:
    """Whether Pillow gives this image's size with its EXIF orientation applied already: a TIFF whose size differs
    from its own width and length tags (Pillow turns TIFFs as it decodes them)."""
    tags = getattr(image, "tag_v2", None)
    if image.format != "TIFF" or tags is None:
        return False
    return image.size != (tags.get(256), tags.get(257))


def _png_orientation_after_pixels(path: str | os.PathLike) -> int | None:
    """The EXIF orientation of a PNG file's eXIf chunk wherever it stands, found by seeking from chunk header to chunk
    header (PIL's `getexif` decodes every pixel to reach one after the image data)."""
    with open(path, "rb", buffering=0) as handle:  # unbuffered: each seek reads 8 bytes, not a buffer's worth
        if handle.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while len(header := handle.read(8)) == 8:
            length, kind = struct.unpack(">I4s", header)
            if kind == b"eXIf":
                exif = Image.Exif()
                exif.load(handle.read(length))
                return exif.get(0x0112)
            if kind == b"IEND":
                return None
            handle.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
    return None


def image_content_hash(image: Any, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> str:
    """The `image_id` that `load_image` would give, without decoding when the input is a file or bytes."""
    if isinstance(image, dict):
        data = image.get("bytes")
        if data is None and image.get("path"):
            return sha1_hex(read_image_bytes(image["path"], max_file_bytes))
        if data is None:
            raise ImageLoadError(describe_source(image), "image dict has neither bytes nor path")
        return sha1_hex(bytes(data))
    if isinstance(image, (str, os.PathLike)):
        return sha1_hex(read_image_bytes(image, max_file_bytes))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return sha1_hex(bytes(image))
    return load_image(image).image_id


class _LoadingDataset:
    """`load(items[i])` by index: the map-style dataset a `torch.utils.data.DataLoader` reads."""

    def __init__(self, items: Sequence[Any], load: Callable[[Any], Any]):
        self.items = items
        self.load = load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.load(self.items[index])


def collate_loaded(batch: list[Any]) -> list[Any]:
    """The collate of `iter_loaded_batches`: the batch as the list of what `load` gave, in order.

    torch's default collate would stack or convert the fields (numpy boxes into tensors, images of different sizes
    would not stack); the backends group and stack pixels themselves."""
    return list(batch)


def default_decode_workers() -> int:
    """Worker processes for decoding by default: none inside a daemonic process (a multiprocessing pool's worker
    may not start children), else a quarter of the CPU cores, at most 4."""
    if multiprocessing.current_process().daemon:
        return 0
    return min(4, (os.cpu_count() or 1) // 4)


def iter_loaded_batches(
    items: Sequence[Any],
    load: Callable[[Any], Any],
    batch_size: int,
    num_workers: int = 0,
    prefetch_factor: int = 2,
) -> Iterator[list[Any]]:
    """Yields `[load(item) for item in batch]` for consecutive batches of `items`, in order.

    With `num_workers > 0` the batches are made by a `torch.utils.data.DataLoader` in that many worker processes,
    up to `prefetch_factor` batches per worker ahead of the caller, so that decoding overlaps the caller's compute.
    `load` then runs in the workers: it must be picklable where processes are spawned (a module-level function or
    a `functools.partial` of one), and should return its errors rather than raise them (a worker's exception
    reaches the caller as a `RuntimeError` that loses the error's type).

    Args:
        items: The inputs, one per image.
        load: Turns one input into what the caller consumes (e.g. a `LoadedImage` and its boxes).
        batch_size: Items per yielded list (the last may be shorter).
        num_workers: Worker processes; 0 loads in this process, one batch at a time.
        prefetch_factor: Batches each worker prepares ahead.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}.")
    if num_workers == 0 or len(items) <= batch_size:
        for start in range(0, len(items), batch_size):
            yield [load(item) for item in items[start : start + batch_size]]
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _LoadingDataset(items, load),
        batch_size=batch_size,
        shuffle=False,
        num_workers=min(num_workers, -(-len(items) // batch_size)),
        collate_fn=collate_loaded,
        prefetch_factor=prefetch_factor,
    )
    yield from loader


__all__ = [
    "DEFAULT_MAX_ASPECT_RATIO",
    "DEFAULT_MAX_DECODE_SIDE",
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEFAULT_MIN_IMAGE_SIDE",
    "IMAGE_FORMATS",
    "ImageLoadError",
    "LoadedImage",
    "RegionExtractionError",
    "collate_loaded",
    "default_decode_workers",
    "describe_source",
    "image_content_hash",
    "image_header_size",
    "iter_loaded_batches",
    "load_image",
    "open_image_file",
]
