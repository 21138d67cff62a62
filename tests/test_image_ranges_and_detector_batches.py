"""Float and integer pixels read by one rule per kind whatever holds them, a file's displayed size read from its
header alone, and detectors that give an image the same regions alone as in a batch.

Float pixels are [0, 1] data (a resampling overshoot above 1 is clipped), 0..255 data or 0..65535 data, the same for
numpy arrays, torch tensors and float ("F") images; other ranges are refused naming the range. Integers held wider
than 16 bits (int32/int64 arrays, "I" images, a `datasets` column of int64 greyscale) are 0..255 data when their
brightest pixel is at most 255, else 16-bit data; uint16 arrays and "I;16" images are always 16-bit data. The
torchvision detector and the BUTD backend run a batch in groups of equal input shape, so no image is padded to a
larger partner.
"""

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

from imagebert_hf import ImageBERTRoIExtractor, ImageLoadError, load_image
from imagebert_hf.models.imagebert.roi_image_loading import image_header_size

from .test_butd import SMALL as BUTD_SMALL
from .test_butd import random_checkpoint


def _pixels(image) -> np.ndarray:
    return np.asarray(load_image(image).image)


def _tiff(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="TIFF")
    return buffer.getvalue()


def _unit_image(height: int = 40, width: int = 48, seed: int = 0) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] with hard edges: blocks of random grey levels, some at 0 and 1."""
    rng = np.random.default_rng(seed)
    blocks = rng.choice([0.0, 0.2, 0.7, 1.0], size=(height // 8, width // 8, 3)).astype(np.float32)
    return np.kron(blocks, np.ones((8, 8, 1), dtype=np.float32))


def _grey_ramp(top: float, dtype) -> np.ndarray:
    return np.linspace(0, top, 32 * 32).reshape(32, 32).astype(dtype)


# ---------------------------------------------------------------------------------------------- float pixels


def test_bicubic_resized_tensor_loads_like_its_clipped_version():
    x = torch.from_numpy(_unit_image()).permute(2, 0, 1)
    y = F.interpolate(x[None], size=(72, 80), mode="bicubic", align_corners=False)[0]
    assert float(y.max()) > 1.0 and float(y.min()) < 0.0  # bicubic overshoots both ways at the edges
    loaded = _pixels(y)
    np.testing.assert_array_equal(loaded, _pixels(y.clamp(0, 1)))
    assert abs(loaded.mean() - 255 * float(y.clamp(0, 1).mean())) < 1.0


def test_numpy_float_slightly_above_one_loads_as_the_clipped_unit_image():
    unit = _unit_image()
    over = unit * 1.05
    expected = np.round(np.clip(over, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(_pixels(over), expected)
    np.testing.assert_array_equal(_pixels(over.astype(np.float64)), expected)


def test_float_tiff_in_unit_range_equals_the_numpy_array():
    ramp = _grey_ramp(1.0, np.float32)
    from_file = _pixels(_tiff(ramp, "F"))
    np.testing.assert_array_equal(from_file, _pixels(ramp))
    np.testing.assert_array_equal(from_file[..., 0], np.round(ramp * 255).astype(np.uint8))
    # A float image opened by PIL follows the same rule as its file.
    np.testing.assert_array_equal(_pixels(Image.fromarray(ramp, mode="F")), from_file)


def test_float_pixels_in_byte_range_load_as_bytes():
    ramp = _grey_ramp(255.0, np.float32)
    expected = np.round(ramp).astype(np.uint8)
    np.testing.assert_array_equal(_pixels(ramp)[..., 0], expected)
    np.testing.assert_array_equal(_pixels(_tiff(ramp, "F"))[..., 0], expected)
    # A resampling overshoot above 255 is clipped as one above 1 is, in an array as in a file.
    over = ramp * 1.05
    np.testing.assert_array_equal(_pixels(over)[..., 0], np.round(np.clip(over, 0, 255)))
    np.testing.assert_array_equal(_pixels(_tiff(over, "F")), _pixels(over))


@pytest.mark.parametrize(
    "array, found",
    [
        (_grey_ramp(1e6, np.float32), "from 0 to 1e+06"),
        (_grey_ramp(2.0, np.float32) - 1.0, "from -1 to 1"),
        ((_grey_ramp(1.0, np.float32) - 0.45) / 0.225, "from -2 to 2.44444"),
        (-_grey_ramp(1.0, np.float32) - 0.1, "from -1.1 to -0.1"),
    ],
    ids=["far_above_sixteen_bit", "minus_one_to_one", "mean_std_normalised", "all_negative"],
)
def test_float_pixels_of_another_range_are_refused_naming_it(array, found):
    for source in (array, torch.from_numpy(array), _tiff(array, "F")):
        with pytest.raises(ImageLoadError, match=r"expected floats in \[0, 1\], 0\.\.255 or 0\.\.65535") as info:
            load_image(source)
        assert f"float pixels range {found};" in str(info.value), str(info.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_pixels_are_refused_naming_the_range(bad):
    ramp = _grey_ramp(1.0, np.float32)
    ramp[3, 5] = bad
    for source in (ramp, torch.from_numpy(ramp), _tiff(ramp, "F")):
        with pytest.raises(ImageLoadError, match=r"1 NaN or infinite values \(finite values from 0 to 1\)"):
            load_image(source)


def test_refusal_names_the_file():
    with pytest.raises(ImageLoadError, match=r"a_depth_map\.tiff: float pixels range from 0 to 1e\+06"):
        load_image({"bytes": _tiff(_grey_ramp(1e6, np.float32), "F"), "path": "a_depth_map.tiff"})


# ---------------------------------------------------------------------------------------------- one picture, any holder


def _grey_picture(height: int = 40, width: int = 48) -> np.ndarray:
    """(H, W) uint8 with every grey level from 0 to 255, so that a wrong scale shows in every pixel."""
    return (np.arange(height * width).reshape(height, width) * 7 % 256).astype(np.uint8)


def _png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _datasets_int64_decode(array: np.ndarray):
    """What a `datasets.Image()` column of an int64 greyscale array gives: decoded ("I" mode) and undecoded."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # datasets says it stores int64 as int32, which PIL reads
        table = datasets.Dataset.from_dict({"image": [array.astype(np.int64)]}, features=features)
    decoded = table[0]["image"]
    assert decoded.mode == "I"
    return decoded, table.cast_column("image", datasets.Image(decode=False))[0]["image"]


def test_one_picture_gives_the_same_pixels_whatever_holds_it():
    grey = _grey_picture()
    expected = _pixels(grey)
    np.testing.assert_array_equal(expected[..., 0], grey)
    decoded, undecoded = _datasets_int64_decode(grey)
    holders = {
        "int32 array": grey.astype(np.int32),
        "int64 array": grey.astype(np.int64),
        "int64 tensor": torch.from_numpy(grey.astype(np.int64)),
        "Image.fromarray(int32)": Image.fromarray(grey.astype(np.int32)),
        'convert("I")': Image.fromarray(grey).convert("I"),
        '"I" TIFF file': _tiff(grey.astype(np.int32), "I"),
        "datasets int64, decoded": decoded,
        "datasets int64, undecoded": undecoded,
        'convert("F")': Image.fromarray(grey).convert("F"),
        "float 0..65535 array": grey.astype(np.float32) * 257,
        "float 0..65535 image": Image.fromarray(grey.astype(np.float32) * 257),
        "float 0..65535 tensor": torch.from_numpy(grey.astype(np.float32) * 257),
        "uint16 array": grey.astype(np.uint16) * 257,
        "16-bit PNG": _png(Image.fromarray(grey.astype(np.uint16) * 257)),
    }
    for name, holder in holders.items():
        np.testing.assert_array_equal(_pixels(holder), expected, err_msg=name)


def test_sixteen_bit_png_converted_to_float_loads_like_the_png():
    values = np.linspace(0, 60000, 40 * 48).reshape(40, 48).astype(np.uint16)
    data = _png(Image.fromarray(values))
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode.startswith("I;16")
        as_float = opened.convert("F")
    expected = _pixels(data)
    np.testing.assert_array_equal(expected[..., 0], np.round(values / 257.0).astype(np.uint8))
    np.testing.assert_array_equal(_pixels(as_float), expected)
    np.testing.assert_array_equal(_pixels(np.asarray(as_float)), expected)
    # A resampling overshoot above 65535 is clipped as one above 255 is.
    over = np.asarray(as_float) * 1.05
    np.testing.assert_array_equal(_pixels(over), _pixels(np.clip(over, 0, 65535)))


def test_wide_integers_above_255_are_sixteen_bit_data_and_stay_dark_when_dark():
    values = np.linspace(0, 3000, 32 * 32).reshape(32, 32).astype(np.int32)
    expected = np.round(values / 257.0).astype(np.uint8)
    for name, holder in {
        "int32 array": values,
        "int64 array": values.astype(np.int64),
        '"I" image': Image.fromarray(values),
        '"I" TIFF file': _tiff(values, "I"),
        "uint16 array": values.astype(np.uint16),
        '"I;16" PNG': _png(Image.fromarray(values.astype(np.uint16))),
    }.items():
        np.testing.assert_array_equal(_pixels(holder)[..., 0], expected, err_msg=name)
    # A dark uint16 picture is not stretched to 0..255 as a wide integer of the same values is.
    np.testing.assert_array_equal(_pixels((values // 20).astype(np.uint16))[..., 0], np.round(values // 20 / 257.0))
    np.testing.assert_array_equal(_pixels((values // 20).astype(np.int32))[..., 0], values // 20)


def test_wide_integers_outside_the_range_are_clipped():
    values = np.array([[-5, 0, 255, 70000]] * 4, dtype=np.int64)
    np.testing.assert_array_equal(_pixels(values)[0, :, 0], [0, 0, 1, 255])
    np.testing.assert_array_equal(_pixels(Image.fromarray(values.astype(np.int32)))[0, :, 0], [0, 0, 1, 255])
    np.testing.assert_array_equal(_pixels(values.clip(-5, 200))[0, :, 0], [0, 0, 200, 200])


# ---------------------------------------------------------------------------------------------- header sizes


def _refuse_decoding(monkeypatch):
    def load(self):
        raise AssertionError(f"{self.format} pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_header_size_of_a_large_png_decodes_no_pixel(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8))
    plain, turned = tmp_path / "plain.png", tmp_path / "turned.png"
    plain.write_bytes(_png(photo))
    exif = Image.Exif()
    exif[0x0112] = 6
    turned.write_bytes(_png(photo, exif=exif))
    _refuse_decoding(monkeypatch)
    assert image_header_size(plain) == (1200, 900)
    assert image_header_size(turned) == (900, 1200)
    assert image_header_size(turned, apply_exif_orientation=False) == (1200, 900)
    monkeypatch.undo()
    loaded = load_image(turned)
    assert (loaded.width, loaded.height) == (900, 1200)


def test_header_size_of_a_png_whose_exif_follows_its_pixels_is_its_displayed_size(tmp_path, monkeypatch):
    import struct
    import zlib

    exif = Image.Exif()
    exif[0x0112] = 6
    payload = exif.tobytes()
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    data = _png(Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)))
    end = data.rindex(b"IEND") - 4  # the IEND chunk's length field
    path = tmp_path / "trailing_exif.png"
    path.write_bytes(data[:end] + chunk + data[end:])
    loaded = load_image(path)
    assert (loaded.width, loaded.height) == (30, 40)  # PIL finds the chunk when it decodes
    _refuse_decoding(monkeypatch)
    assert image_header_size(path) == (30, 40)
    assert image_header_size(path, apply_exif_orientation=False) == (40, 30)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF", "WEBP"])
def test_header_size_of_an_exif_rotated_photo_is_its_displayed_size(tmp_path, monkeypatch, fmt):
    path = tmp_path / f"photo.{fmt.lower()}"
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)).save(path, format=fmt, exif=exif)
    loaded = load_image(path)
    # The displayed photo, a quarter turn of the stored 40x30, is the frame and the pixels alike (Pillow turns a TIFF
    # as it decodes it: turned once more, its frame was 40x30 around 30x40 pixels).
    assert (loaded.width, loaded.height) == loaded.image.size == (30, 40)
    _refuse_decoding(monkeypatch)
    assert image_header_size(path) == (30, 40)
    with Image.open(path) as image:
        assert image_header_size(path, apply_exif_orientation=False) == image.size


# ---------------------------------------------------------------------------------------------- detector batches


def _scene(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    image.paste((250, 30, 30), (width // 4, height // 3, width // 2, height - 4))
    return image


def _assert_same_regions(batch_record, alone_record):
    for field in ("region_boxes", "region_features", "region_class_probs"):
        expected = alone_record[field]
        assert batch_record[field].shape == expected.shape, field
        np.testing.assert_allclose(batch_record[field], expected, rtol=0, atol=1e-5, err_msg=field)


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    extractor = ImageBERTRoIExtractor(
        backend="detector",
        detector_name="fasterrcnn_mobilenet_v3_large_320_fpn",
        detector_weights=None,
        detector_num_classes=91,
        min_regions=10,
        max_regions=20,
    )
    # torchvision's randomly initialised MobileNet shrinks its activations to about 1e-8, so every region would get
    # the same feature whatever the pixels: batch norm statistics measured on random images keep them at unit scale.
    body = extractor.get_backend().model.backbone.body
    for module in body.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        body.train()(torch.rand(4, 3, 320, 320, generator=torch.Generator().manual_seed(0)))
    body.eval()
    return extractor


@pytest.fixture(scope="module")
def butd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frcnn-vg-finetuned")
    torch.save(random_checkpoint(), folder / "pytorch_model.bin")
    return ImageBERTRoIExtractor(backend="butd", detector_weights=str(folder), device="cpu", **BUTD_SMALL)


# Two photos that the detectors resize to different shapes: in one batch, the smaller would be padded to the larger.
SCENES = [_scene(96, 64, 0), _scene(64, 112, 1)]


@pytest.mark.parametrize("backend", ["detector", "butd"])
def test_image_in_a_batch_gets_its_regions_alone(request, backend):
    extractor = request.getfixturevalue(backend)
    alone = [extractor.extract(image)[0] for image in SCENES]
    assert alone[0]["region_features"].std(axis=0).max() > 1e-3  # the regions depend on the pixels
    for order in ([0, 1], [1, 0]):
        batch = extractor.extract([SCENES[i] for i in order], batch_size=2)
        for index, record in zip(order, batch):
            _assert_same_regions(record, alone[index])


@pytest.mark.parametrize("backend", ["detector", "butd"])
def test_given_boxes_in_a_batch_get_the_features_they_get_alone(request, backend):
    extractor = request.getfixturevalue(backend)
    # The whole image, its bottom-right corner (where a larger partner's padding would begin) and its top-left one.
    boxes = [
        np.array([[0, 0, w, h], [w - 30, h - 30, w, h], [0, 0, 30, 30]], dtype=np.float32)
        for w, h in (image.size for image in SCENES)
    ]
    alone = [extractor.extract(image, boxes=b)[0] for image, b in zip(SCENES, boxes)]
    for order in ([0, 1], [1, 0]):
        batch = extractor.extract([SCENES[i] for i in order], boxes=[boxes[i] for i in order], batch_size=2)
        for index, record in zip(order, batch):
            _assert_same_regions(record, alone[index])
