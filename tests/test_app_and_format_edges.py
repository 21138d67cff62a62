"""The app's edges: a gallery served from anywhere, a manifest whose sizes are not its photos', a photo with more
objects than regions, an extractor that keeps the stored pixel frame, gallery text shown literally in the page's
Markdown, manifest paths outside the image root on the command line; and JSON nested too deep for the readers, and
the `evaluate` metric's refusals.

Everything runs on the tiny random-weight model and 12-photo synthetic gallery of `tests/test_app.py`."""

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagebert_hf.app import cli
from imagebert_hf.app.engine import AppInputError, GalleryImage, RetrievalDemo, read_gallery
from imagebert_hf.formats.files import loads_json, read_json_file
from imagebert_hf.formats.manifest import ManifestError, read_manifest

from .test_app import QUERY, make_tiny_app_files
from .testing_utils import require_module


DEEP = "[" * 5000 + "]" * 5000


@pytest.fixture(scope="module")
def app_files(tmp_path_factory, tokenizer, make_tiny_extractor, make_tiny_config):
    """The tiny model folder and its 12-photo manifest."""
    return make_tiny_app_files(tmp_path_factory.mktemp("edges"), tokenizer, make_tiny_extractor, make_tiny_config)


@pytest.fixture(scope="module")
def retriever(app_files):
    from transformers import pipeline

    torch.manual_seed(0)
    return pipeline("image-text-retrieval", model=str(app_files[0]), device=-1)


@pytest.fixture(scope="module")
def demo(retriever, app_files):
    return RetrievalDemo(retriever, read_gallery(app_files[1]))


@pytest.fixture(scope="module")
def stored_frame_retriever(tmp_path_factory, tokenizer, make_tiny_extractor, make_tiny_config):
    """The tiny model with an extractor saved with `apply_exif_orientation=False`."""
    from transformers import pipeline

    def extractor(**overrides):
        return make_tiny_extractor(apply_exif_orientation=False, **overrides)

    folder = tmp_path_factory.mktemp("stored-frame")
    model_dir, _ = make_tiny_app_files(folder, tokenizer, extractor, make_tiny_config)
    return pipeline("image-text-retrieval", model=str(model_dir), device=-1)


def manifest_lines(manifest, count):
    return [json.loads(line) for line in manifest.read_text().splitlines()][:count]


def write_manifest(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def rotated_jpeg(path, width, height):
    """A JPEG of `width` x `height` stored pixels whose EXIF says "rotate 90" (orientation 6), as a phone saves one."""
    image = Image.new("RGB", (width, height), (200, 30, 30))
    image.paste((30, 30, 200), (width - width // 6, 0, width, height))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes(), quality=95)
    return path


def rendered(markdown: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(markdown)


# ------------------------------------------------------------------------------------------- serving the gallery


@require_module("gradio_client")
def test_a_search_serves_gallery_photos_from_outside_the_working_and_temp_folders(demo, tmp_path, monkeypatch):
    """Gradio serves only files under the working folder or the temp folder unless `allowed_paths` names them: the
    gallery's photos are."""
    from gradio_client import Client

    from imagebert_hf.app import build_app

    from .browser_helpers import serving

    for name in ("work", "temp"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    for variable in ("GRADIO_TEMP_DIR", "GRADIO_ALLOWED_PATHS"):
        monkeypatch.delenv(variable, raising=False)
    photos = sorted(str(image.path.resolve()) for image in demo.gallery)
    assert not any(photo.startswith((str(tmp_path), tempfile.gettempdir())) for photo in photos)

    blocks = build_app(demo, top_k=3)
    with serving(blocks) as url:
        client = Client(url, verbose=False)
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        search = next(
            name
            for name, endpoint in endpoints.items()
            if [parameter["label"] for parameter in endpoint["parameters"]] == ["Describe a photo", "photos"]
        )
        items, table, _, error = client.predict(QUERY, 3, api_name=search)
    # Their folder holds nothing else: one entry, not one a photo (gradio scans the list for every file it serves).
    assert blocks.allowed_paths == [str(Path(photos[0]).parent)]
    expected = demo.search_images(QUERY, 3)
    assert error == "" and len(items) == 3
    assert [Path(item["image"]).name for item in items] == [hit.image.path.name for hit in expected]
    assert all(Path(item["image"]).read_bytes() == hit.image.path.read_bytes() for item, hit in zip(items, expected))
    assert table.count("\n") == 4  # header, rule and three rows


def test_launch_keeps_the_allowed_paths_it_is_given(monkeypatch, tmp_path):
    from imagebert_hf.app.ui import launch_app

    seen = {}

    class Blocks:
        gallery_files = ["/photos/a.png"]

        def launch(self, **kwargs):
            seen.update(kwargs)

    launch_app(Blocks(), allowed_paths=[str(tmp_path)])
    assert seen["allowed_paths"] == [str(tmp_path), "/photos/a.png"]
    assert seen["max_file_size"] == 64 * 1024 * 1024  # the loader's default limit, for blocks built elsewhere
    monkeypatch.setenv("GRADIO_ALLOWED_PATHS", f"{tmp_path}, /more")
    launch_app(Blocks())
    assert seen["allowed_paths"] == [str(tmp_path), "/more", "/photos/a.png"]


class RecordingBlocks:
    """Stands in for the built app: records what `launch_app` would pass to gradio."""

    def __init__(self, photos):
        self.gallery_files = [str(photo) for photo in photos]
        self.launched = {}

    def launch(self, **kwargs):
        self.launched = kwargs


def touched(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).touch()
    return [folder / name for name in names]


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Working and temp folders of their own, so that the rest of `tmp_path` is a place gradio does not serve."""
    for name in ("work", "temp"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    monkeypatch.delenv("GRADIO_ALLOWED_PATHS", raising=False)
    return tmp_path


def gradio_serves(path, allowed_paths) -> bool:
    from gradio.utils import is_allowed_file

    served = [*allowed_paths, os.getcwd(), tempfile.gettempdir()]
    return is_allowed_file(Path(path), blocked_paths=[], allowed_paths=served, created_paths=[])[0]


@require_module("gradio")
def test_a_gallery_under_the_working_or_temp_folder_adds_no_allowed_paths(tmp_path, monkeypatch):
    from imagebert_hf.app.ui import launch_app

    monkeypatch.delenv("GRADIO_ALLOWED_PATHS", raising=False)
    photos = touched(tmp_path / "photos", "a.png", "b.png") + touched(tmp_path / "photos" / "more", "c.png")
    (tmp_path / "photos" / "notes.txt").touch()
    for work, temp in ((tmp_path / "photos", tmp_path / "temp"), (tmp_path / "work", tmp_path)):
        work.mkdir(exist_ok=True)
        monkeypatch.chdir(work)
        monkeypatch.setattr(tempfile, "tempdir", str(temp))
        blocks = RecordingBlocks(photos)
        launch_app(blocks)
        assert blocks.launched["allowed_paths"] is None
        assert all(gradio_serves(photo, []) for photo in photos)


@require_module("gradio")
def test_a_folder_gallery_elsewhere_is_allowed_as_its_folder(elsewhere):
    from imagebert_hf.app.ui import launch_app

    folder = elsewhere / "photos"
    photos = touched(folder, "a.png", "b.png") + touched(folder / "2024", "c.png")
    # A link is no file of the folder to gradio, which refuses what it points to outside the folder.
    (elsewhere / "secret.txt").touch()
    (folder / "secret.txt").symlink_to(elsewhere / "secret.txt")
    blocks = RecordingBlocks([folder / ".." / "photos" / "a.png", *photos[1:]])
    launch_app(blocks, allowed_paths=[])
    assert blocks.launched["allowed_paths"] == [str(folder.resolve())]
    assert all(gradio_serves(photo, [str(folder.resolve())]) for photo in photos)
    assert not gradio_serves(folder / "secret.txt", [str(folder.resolve())])


@require_module("gradio")
def test_a_manifest_gallery_elsewhere_allows_only_its_photo_files(elsewhere):
    from imagebert_hf.app.ui import launch_app

    photos = touched(elsewhere / "data", "a.png", "b.png")
    (elsewhere / "data" / "captions.jsonl").touch()
    # A folder of photos only, but for a file in a subfolder, which gradio would serve too.
    photos += touched(elsewhere / "images", "c.png", "d.png")
    touched(elsewhere / "images" / "private", "e.png")
    blocks = RecordingBlocks(photos)
    launch_app(blocks)
    allowed = blocks.launched["allowed_paths"]
    assert allowed == sorted(str(photo.resolve()) for photo in photos)
    assert all(gradio_serves(photo, allowed) for photo in photos)
    assert not gradio_serves(elsewhere / "data" / "captions.jsonl", allowed)
    assert not gradio_serves(elsewhere / "images" / "private" / "e.png", allowed)


# ------------------------------------------------------------------------------------ manifest sizes and regions


def test_a_photo_resized_after_its_manifest_was_written_is_refused(retriever, app_files, tmp_path):
    lines = manifest_lines(app_files[1], 2)
    (tmp_path / "images").mkdir()
    for line in lines:
        Image.open(app_files[1].parent / line["image"]).resize((40, 40)).save(tmp_path / line["image"])
    gallery = read_gallery(write_manifest(tmp_path / "captions.jsonl", lines))
    message = (
        f"2 gallery photo(s) are not the size their manifest lines state, so their boxes would be misplaced: "
        f"{lines[0]['image']}: the manifest says 48x48, the photo is 40x40; {lines[1]['image']}: the manifest says "
        "48x48, the photo is 40x40. Give each line the photo's width, height and boxes; boxes are not rescaled."
    )
    with pytest.raises(AppInputError, match=f"^{re.escape(message)}$"):
        RetrievalDemo(retriever, gallery)


def test_a_manifest_giving_the_stored_frame_of_a_rotated_photo(retriever, stored_frame_retriever, tmp_path):
    """A phone photo whose EXIF turns it: the manifest's size and boxes are of the stored pixels (96 x 48). An
    extractor that applies the EXIF rotation sees 48 x 96 and the app refuses, saying why; one saved without it
    reads the stored frame, which the manifest describes."""
    (tmp_path / "images").mkdir()
    rotated_jpeg(tmp_path / "images" / "phone.jpg", 96, 48)
    objects = [
        {"label": "red square", "bbox_xyxy": [8, 8, 40, 40]},
        {"label": "blue square", "bbox_xyxy": [56, 8, 88, 40]},
    ]
    line = {"image": "images/phone.jpg", "captions": ["a red square"], "width": 96, "height": 48, "objects": objects}
    gallery = read_gallery(write_manifest(tmp_path / "captions.jsonl", [line]))
    with pytest.raises(AppInputError) as refusal:
        RetrievalDemo(retriever, gallery)
    assert (
        "images/phone.jpg: the manifest says 96x48, the photo is 48x96 once its EXIF orientation turns it (the "
        "manifest must give the photo as shown)."
    ) in str(refusal.value)

    record = RetrievalDemo(stored_frame_retriever, gallery).records[0]
    assert (record["image_width"], record["image_height"]) == (96, 48)
    boxes = np.asarray(record["region_boxes"]).reshape(-1, 4)
    np.testing.assert_allclose(boxes, [[8, 8, 40, 40], [56, 8, 88, 40], [0, 0, 96, 48]])


def test_a_photo_with_more_objects_than_regions_keeps_the_whole_image(retriever, tmp_path):
    assert retriever.processor.regions_to_extract() == 6
    Image.new("RGB", (48, 48), (90, 90, 90)).save(tmp_path / "crowd.png")
    objects = [{"label": f"thing {i}", "bbox_xyxy": [i * 5, 0, i * 5 + 8, 8]} for i in range(8)]
    line = {"image": "crowd.png", "captions": ["a crowd"], "width": 48, "height": 48, "objects": objects}
    crowd = RetrievalDemo(retriever, read_gallery(write_manifest(tmp_path / "captions.jsonl", [line])))
    image, record = crowd.gallery[0], crowd.records[0]
    names = [label.name for label in crowd.labels_for(record, image)]
    assert names == ["thing 0", "thing 1", "thing 2", "thing 3", "thing 4", "whole image"]
    assert len(image.boxes) == len(image.box_labels) == 6
    np.testing.assert_allclose(np.asarray(record["region_boxes"]).reshape(-1, 4)[-1], [0, 0, 48, 48])


def test_an_extractor_without_exif_rotation_is_followed_by_the_app(stored_frame_retriever, tmp_path):
    """The gallery's grid, the photo a region picture is drawn on, and an upload's regions are all in the stored
    frame when the extractor was saved with `apply_exif_orientation=False`."""
    (tmp_path / "photos").mkdir()
    path = rotated_jpeg(tmp_path / "photos" / "rotated.jpg", 96, 80)
    demo = RetrievalDemo(stored_frame_retriever, read_gallery(tmp_path / "photos"))
    record = demo.records[0]
    assert (record["image_width"], record["image_height"]) == (96, 80)
    boxes = np.asarray(record["region_boxes"]).reshape(-1, 4)
    assert boxes[:, 2].max() == 96 and boxes[:, 3].max() == 80  # the covering grid reaches every side
    photo = demo.load_photo(str(path))
    assert photo.size == (96, 80)
    upload = demo.photo_regions(photo)
    assert (upload["image_width"], upload["image_height"]) == (96, 80)


# --------------------------------------------------------------------------------- gallery text in the Markdown


TRACKER = "https://tracker.example.com/pixel.png"


@require_module("markdown_it")
def test_gallery_captions_and_names_are_shown_literally(demo, retriever, app_files, tmp_path):
    """Captions, labels and file names are anyone's text: a Markdown image in one must not become an <img> every
    viewer's browser fetches, and a newline must not start a forged table row."""
    from imagebert_hf.app.relations import KIND_NAMES, RelationView
    from imagebert_hf.app.ui import photo_view, relation_view, search_view

    lines = manifest_lines(app_files[1], 2)
    lines[0]["captions"] = ["a yellow cross\n| 1 | 9.999 | 1.000 | a made-up winner |"]
    lines[1]["captions"] = [f"a red circle ![]({TRACKER}) <img src='{TRACKER}'> *bold* `code`"]
    (tmp_path / "images").mkdir()
    for line in lines:
        (tmp_path / line["image"]).write_bytes((app_files[1].parent / line["image"]).read_bytes())
    captioned = RetrievalDemo(retriever, read_gallery(write_manifest(tmp_path / "captions.jsonl", lines)))
    text, _, error = photo_view(captioned, None, captioned.gallery[0].key, "", 5)
    page = rendered(text)
    assert error == "" and "<img" not in page and "<em>" not in page and "<code>" not in page
    assert page.count("<tr>") == 3  # the header and one row per caption
    assert "a yellow cross | 1 | 9.999 | 1.000 | a made-up winner |</td>" in page
    assert f"a red circle ![]({TRACKER}) &lt;img src='{TRACKER}'&gt; *bold* `code`</td>" in page

    # A file name, in the search table and the caption table's title.
    (tmp_path / "named").mkdir()
    name = f"![x]({TRACKER.rsplit('/', 1)[-1]}) _a_.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "named" / name)
    named = RetrievalDemo(retriever, read_gallery(tmp_path / "named"))
    _, table, _, error = search_view(named, QUERY, 1)
    assert error == "" and "<img" not in rendered(table) and f"<td>{name}</td>" in rendered(table)
    text, _, error = photo_view(named, str(tmp_path / "named" / name), None, "a red circle", 1)
    assert error == "" and f"the uploaded photo <strong>{name}</strong>" in rendered(text)

    # Object labels, in the relation table and in where the objects are.
    labels = (f"dog ![]({TRACKER})", "person\n| forged | row |", "whole image")
    boxes = ((2.0, 10.0, 14.0, 30.0), (30.0, 8.0, 46.0, 40.0), (0.0, 0.0, 48.0, 48.0))
    street = GalleryImage("street.png", demo.gallery[0].path, (), boxes, labels)
    view = RelationView(RetrievalDemo(retriever, [street]))
    text, _, _, error = relation_view(view, "street.png", KIND_NAMES["object_swap"])
    page = rendered(text)
    assert error == "" and "<img" not in page
    assert page.count("<tr>") == 4  # the header, the two captions and the verdicts
    assert f"the dog ![]({TRACKER}) (region centre x = 8 of 48) is to the left of the person | forged | row |" in page


# ---------------------------------------------------------------------------------------- JSON nested too deep


def test_json_nested_too_deep_is_bad_json_naming_its_place(tmp_path):
    with pytest.raises(json.JSONDecodeError, match=r"^arrays or objects nested 5000 deep, too deep to read: line 1 "):
        loads_json(DEEP)
    path = tmp_path / "config.json"
    path.write_text('{"lr": 0.1,\n "layers": ' + DEEP + "}")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} is not valid JSON \(line 2, column 5011: arrays "):
        read_json_file(path, "a JSON object")
    manifest = tmp_path / "captions.jsonl"
    good = {"image": "a.png", "captions": ["a dog"]}
    manifest.write_text(json.dumps(good) + '\n{"image": "b.png", "captions": ["x"], "extra": ' + DEEP + "}\n")
    with pytest.raises(
        ManifestError, match=rf"^{re.escape(str(manifest))}:2: invalid JSON \(arrays or objects nested"
    ):
        read_manifest(manifest)


def test_the_app_ends_with_one_line_for_a_manifest_nested_too_deep(app_files, tmp_path, monkeypatch):
    from imagebert_hf.app import engine

    monkeypatch.setattr(engine, "load_retriever", lambda model, device=None: None)
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text('{"image": "a.png", "captions": ["x"], "extra": ' + DEEP + "}\n")
    with pytest.raises(SystemExit) as stop:
        cli.main(["--model", str(app_files[0]), "--gallery", str(manifest)])
    message = stop.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith(f"imagebert-app: error: {manifest}:1: invalid JSON (arrays or objects nested 5001 deep")


# ------------------------------------------------------------------------------------------ --allow_outside_root


def test_the_app_flag_follows_manifest_paths_outside_the_root(app_files, tmp_path, monkeypatch):
    from imagebert_hf.app import engine

    (tmp_path / "photos").mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "photos" / "a.png")
    (tmp_path / "lists").mkdir()
    manifest = write_manifest(tmp_path / "lists" / "captions.jsonl", [{"image": "../photos/a.png", "caption": "x"}])
    seen = {}
    monkeypatch.setattr(engine, "load_retriever", lambda model, device=None: None)
    monkeypatch.setattr(engine, "RetrievalDemo", lambda retriever, photos, **kwargs: seen.setdefault("photos", photos))
    argv = ["--model", str(app_files[0]), "--gallery", str(manifest)]

    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == (
        f"imagebert-app: error: {manifest}:1: 'image' '../photos/a.png' points outside the image root "
        f"{manifest.parent}; give a path inside it, or pass --allow_outside_root to follow it"
    )
    assert "photos" not in seen

    args = cli.parse_args([*argv, "--allow_outside_root"])
    assert args.allow_outside_root and not cli.parse_args(argv).allow_outside_root
    cli.load_demo(args)
    [photo] = seen["photos"]
    assert photo.key == "../photos/a.png" and photo.path.resolve() == (tmp_path / "photos" / "a.png").resolve()


# --------------------------------------------------------------------------------------------- the metric module


@require_module("evaluate")
def test_the_metric_names_ragged_rows_bad_scores_and_bad_cut_offs(tmp_path, monkeypatch):
    import evaluate

    from imagebert_hf.metrics import retrieval_metric_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    metric = evaluate.load(retrieval_metric_path(), cache_dir=str(tmp_path / "cache"))

    def refusal(**kwargs) -> str:
        with pytest.raises(ValueError) as error:
            metric.compute(**kwargs)
        return str(error.value)

    square = {"predictions": [[0.9, 0.1], [0.2, 0.8]], "references": [0, 1]}
    assert refusal(predictions=[[0.9, 0.1], [0.2]], references=[0, 1]) == (
        "predictions: text 1 has 1 scores where 2 were expected (one per gallery image, the same number for every "
        "text)."
    )
    nan = "is nan; every score must be a finite number (a missing score reads as nan)."
    assert refusal(predictions=[[0.9, float("nan")], [0.2, 0.8]], references=[0, 1]) == f"predictions[0][1] {nan}"
    assert refusal(predictions=[[0.9, 0.1], [None, 0.8]], references=[0, 1]) == f"predictions[1][0] {nan}"
    expected = "ks must be a non-empty list of positive integers (the cut-offs K), got {}."
    for ks in ("15", [0, 1], [1.5], [True], []):
        assert refusal(**square, ks=ks) == expected.format(repr(ks))
    assert metric.compute(**square, ks=[1, 2])["rsum"] == 400.0


@require_module("evaluate")
def test_the_metric_takes_cut_offs_as_a_numpy_array(tmp_path, monkeypatch):
    import evaluate

    from imagebert_hf.metrics import retrieval_metric_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    metric = evaluate.load(retrieval_metric_path(), cache_dir=str(tmp_path / "cache"))
    square = {"predictions": [[0.9, 0.1], [0.2, 0.8]], "references": [0, 1]}
    for ks in (np.array([1, 2]), np.array([1, 2], dtype=np.uint8), range(1, 3), [np.int32(1), 2]):
        assert metric.compute(**square, ks=ks)["rsum"] == 400.0
    expected = "ks must be a non-empty list of positive integers (the cut-offs K), got {}."
    for ks in (np.array([1.0, 2.0]), np.array([True]), np.array([], dtype=int), np.array(1), np.array([[1, 2]])):
        with pytest.raises(ValueError) as error:
            metric.compute(**square, ks=ks)
        assert str(error.value) == expected.format(repr(ks))
