"""Tests of the LAIT-style curation stages and of the local runner, on generated pages around real photos."""

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagebert_hf.curation import (
    AggregationConfig,
    CurationConfig,
    ImageFilterConfig,
    ParseConfig,
    RelevanceConfig,
    Tally,
    TextCleaningConfig,
    aggregate,
    check_text,
    clean_texts,
    filter_images,
    load_curated,
    parse_pages,
    run_local,
    score_relevance,
    synthetic,
)
from imagebert_hf.curation.image_filters import STAT_NAMES, NudeNetDetector, get_natural_classifier
from imagebert_hf.curation.inputs import ImageResolver, discover_sources, scan_source
from imagebert_hf.curation.relevance import load_relevance_model, relevance_features
from imagebert_hf.curation.tally import INPUT, KEPT, load_funnel

from .testing_utils import COCO_DIR, FLICKR_DIR, require_module, require_shared_data


pytestmark = [require_module("fastwarc"), require_module("resiliparse"), require_module("warcio")]

FILLER_TEXT = " ".join(synthetic.FILLER_PARAGRAPHS)


def select_photos(n: int) -> list[tuple[bytes, list[str]]]:
    """COCO photos usable as known survivors: large enough and confidently natural."""
    from imagebert_hf.curation.fitting import photo_statistics

    classifier = get_natural_classifier("default")
    photos = []
    for line in (COCO_DIR / "captions.jsonl").read_text().splitlines():
        record = json.loads(line)
        w, h = record["width"], record["height"]
        if min(w, h) <= 300 or max(w, h) / min(w, h) > 3:
            continue
        path = COCO_DIR / record["image"]
        if classifier.score([], photo_statistics(path)[None])[0] < 0.9:
            continue
        photos.append((path.read_bytes(), record["captions"]))
        if len(photos) == n:
            return photos
    raise RuntimeError("not enough usable photos in the shared data")


def lenient_config():
    config = CurationConfig()
    config.relevance.relevance_threshold = 0.0
    return config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if not (COCO_DIR / "captions.jsonl").is_file():
        pytest.skip("shared data not available")
    return synthetic.build_corpus(tmp_path_factory.mktemp("corpus"), select_photos(synthetic.PHOTOS_NEEDED))


@pytest.fixture(scope="module")
def local_run(corpus, tmp_path_factory):
    return run_local(corpus["inputs"], tmp_path_factory.mktemp("local"), lenient_config(), num_proc=1)


# End to end ------------------------------------------------------------------------------------------------------


@require_shared_data
def test_known_survivors(corpus, local_run):
    rows = local_run.dataset.remove_columns("image").to_list()
    survivors = {row["image_hash"]: row for row in rows}
    assert len(survivors) == len(rows), "aggregation must leave one pair per image"
    assert set(survivors) == set(corpus["expected"])
    for image_hash, row in survivors.items():
        assert row["text"] in corpus["expected"][image_hash] or row["text"] in FILLER_TEXT
        assert 0.0 <= row["relevance_score"] <= 1.0 and row["width"] > 300 and row["height"] > 300
        assert row["page_url"].startswith(("https://", "file:"))
    assert not set(survivors) & set(corpus["rejected"])
    # The folder page with a canonical link reports its canonical URL.
    assert "https://travel.example.com/trip" in {row["page_url"] for row in rows}


@require_shared_data
def test_every_bad_case_is_counted(corpus, local_run):
    tally = local_run.tally
    missing = [key for key in corpus["expected_reasons"] if tally.get(key, 0) == 0]
    assert not missing, f"expected drop reasons not counted: {missing}"


@require_shared_data
def test_nothing_disappears_without_a_count(local_run):
    tally = local_run.tally
    for stage, unit in [
        ("read", "record"),
        ("parse", "page"),
        ("parse", "image"),
        ("images", "image"),
        ("text", "image"),
        ("text", "pair"),
        ("relevance", "pair"),
        ("aggregation", "pair"),
    ]:
        received = tally.get_count(stage, unit, INPUT)
        kept = tally.get_count(stage, unit, KEPT)
        assert received > 0
        assert received == kept + sum(tally.drops(stage, unit).values()), (stage, unit)
    # Each stage receives what the previous one kept.
    assert tally.get_count("parse", "page", INPUT) == tally.get_count("read", "record", KEPT)
    assert tally.get_count("images", "image", INPUT) == tally.get_count("parse", "image", KEPT)
    assert tally.get_count("text", "image", INPUT) == tally.get_count("images", "image", KEPT)
    assert tally.get_count("relevance", "pair", INPUT) == tally.get_count("text", "pair", KEPT)
    assert tally.get_count("aggregation", "pair", INPUT) == tally.get_count("relevance", "pair", KEPT)
    assert tally.get_count("aggregation", "pair", KEPT) == len(local_run.dataset)


@require_shared_data
def test_rerun_with_more_processes_is_identical(corpus, local_run, tmp_path):
    again = run_local(corpus["inputs"], tmp_path / "again", lenient_config(), num_proc=2, batch_size=5)
    assert again.dataset.to_list() == local_run.dataset.to_list()
    assert again.tally == local_run.tally


@require_shared_data
def test_output_and_funnel_report(local_run):
    out = local_run.output_dir
    assert sorted(p.name for p in (out / "data").glob("*.parquet"))
    reloaded = load_curated(out)
    assert reloaded.to_list() == local_run.dataset.to_list()
    assert reloaded["pair_id"] == sorted(reloaded["pair_id"])
    image = Image.open(io.BytesIO(reloaded[0]["image"]))
    assert min(image.size) > 300
    assert load_funnel(out) == local_run.tally
    assert "| parse | image | dropped: logo_or_icon |" in (out / "funnel.md").read_text()
    with Image.open(out / "funnel.png") as chart:
        assert chart.format == "PNG" and chart.size[0] > 500
    assert CurationConfig.load(out / "config.json") == lenient_config()


@require_shared_data
def test_default_relevance_threshold_only_removes_pairs(corpus, local_run, tmp_path):
    strict = CurationConfig()
    strict.relevance.relevance_threshold = 0.5
    result = run_local(corpus["inputs"], tmp_path / "strict", strict)
    assert set(result.dataset["image_hash"]) <= set(corpus["expected"])
    assert result.tally.get_count("relevance", "pair", "low_relevance") > 0
    assert all(score >= 0.5 for score in result.dataset["relevance_score"])


# Reading ---------------------------------------------------------------------------------------------------------


def write_damaged_warcs(folder: Path) -> None:
    """A good WARC, one with a corrupt gzip member, a truncated one, an empty one and a text file named like one."""
    page = synthetic.page_html("T", "/a.jpg", alt="A cat on a mat", paragraphs=synthetic.FILLER_PARAGRAPHS[:2])
    records = [("https://x.example.com/p.html", "text/html; charset=utf-8", page.encode())] * 3
    whole = synthetic.write_warc(folder / "a.warc.gz", records).read_bytes()
    (folder / "junk.warc.gz").write_bytes(whole[:300] + b"\x1f\x8b\x08junk" + whole[300:])
    (folder / "cut.warc.gz").write_bytes(whole[: len(whole) - 200])
    (folder / "empty.warc").write_bytes(b"")
    (folder / "text.warc").write_bytes(b"this is not a warc file\n" * 100)


def test_scan_survives_corrupt_and_truncated_warcs(tmp_path):
    write_damaged_warcs(tmp_path)
    tally = Tally()
    pages = []
    for source in discover_sources([tmp_path]):
        pages.extend(scan_source(source, ParseConfig(), tally))
    assert len([p for p in pages if p["source"].endswith("/a.warc.gz")]) == 3
    assert tally.get_count("read", "record", "unreadable_segment") >= 2
    assert tally.get_count("read", "record", KEPT) == len(pages)
    assert tally.get_count("read", "record", INPUT) == len(pages) + sum(tally.drops("read", "record").values())


@pytest.fixture
def memory_fs():
    """fsspec's in-process `memory://` filesystem, emptied afterwards (it is shared by the whole process)."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    yield fs
    if fs.exists("/curation-test"):
        fs.rm("/curation-test", recursive=True)


def copy_to_memory(fs, local: Path, url_folder: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.pipe(f"{url_folder}/{path.relative_to(local).as_posix()}", path.read_bytes())


def test_scan_reads_fsspec_urls_as_local_files(tmp_path, memory_fs):
    write_damaged_warcs(tmp_path)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "page.html").write_text("<html><body><p>hi</p></body></html>")
    (tmp_path / "site" / "notes.txt").write_text("not an input")
    copy_to_memory(memory_fs, tmp_path, "memory://curation-test/crawl")
    by_url, by_path = Tally(), Tally()
    pages = {
        name: [page for source in discover_sources(inputs) for page in scan_source(source, ParseConfig(), tally)]
        for name, inputs, tally in (
            ("url", ["memory://curation-test/crawl/"], by_url),
            ("path", [tmp_path], by_path),
        )
    }
    assert by_url == by_path and len(pages["url"]) == len(pages["path"]) > 3
    for url_page, path_page in zip(pages["url"], pages["path"]):
        assert url_page["source"].startswith("memory://curation-test/crawl/")
        assert url_page["source"].removeprefix("memory://curation-test/crawl/") == (
            Path(path_page["source"]).relative_to(tmp_path).as_posix()
        )
        assert {k: v for k, v in url_page.items() if k not in ("page_id", "source")} == (
            {k: v for k, v in path_page.items() if k not in ("page_id", "source")}
        )
    # A glob, a file by name, file:// URLs (read as the local paths they name) and a missing URL.
    html = discover_sources(["memory://curation-test/crawl/**/*.html"])
    assert [(s.kind, s.path) for s in html] == [("html", "memory://curation-test/crawl/site/page.html")]
    assert [s.kind for s in discover_sources(["memory://curation-test/crawl/a.warc.gz"])] == ["warc"]
    assert discover_sources([f"file://{tmp_path}"]) == discover_sources([tmp_path])
    with pytest.raises(FileNotFoundError, match="input not found: memory://curation-test/nowhere"):
        discover_sources(["memory://curation-test/nowhere"])


def test_images_next_to_a_page_url_are_read_and_kept_inside_its_folder(memory_fs):
    from imagebert_hf.curation.inputs import input_version, resolver_for

    memory_fs.pipe("/curation-test/site/page.html", b"<html></html>")
    memory_fs.pipe("/curation-test/site/page_files/cat.jpg", b"cat")
    memory_fs.pipe("/curation-test/site/dog.jpg", b"dog" * 100)
    memory_fs.pipe("/curation-test/secret.jpg", b"secret")
    resolver = resolver_for("memory://curation-test/site/page.html")
    assert resolver.fetch("https://cdn.example.com/img/cat.jpg", 1000) == (b"cat", None)
    assert resolver.fetch("dog.jpg", 100) == (None, "image_too_large")
    assert resolver.fetch("dog.jpg", 1000) == (b"dog" * 100, None)
    assert resolver.fetch("../secret.jpg", 1000) == (None, "image_not_archived")
    assert resolver.fetch("/curation-test/secret.jpg", 1000) == (None, "image_not_archived")
    assert resolver.fetch("data:image/png;base64,AAAA", 1000) == (None, "data_uri")
    version = input_version("memory://curation-test/site/dog.jpg")
    memory_fs.pipe("/curation-test/site/dog.jpg", b"a longer dog" * 100)
    assert input_version("memory://curation-test/site/dog.jpg") != version


@require_shared_data
def test_local_run_on_fsspec_urls_matches_local_paths(corpus, local_run, memory_fs, tmp_path):
    folder = Path(corpus["inputs"][0]).parent
    copy_to_memory(memory_fs, folder, "memory://curation-test/corpus")
    inputs = [
        f"memory://curation-test/corpus/{Path(item).relative_to(folder).as_posix()}" for item in corpus["inputs"]
    ]
    result = run_local(inputs, tmp_path / "from-urls", lenient_config())
    assert result.tally == local_run.tally
    # Pair ids hash the page id, which names the input; everything else is the same, pair for pair.
    drop = ("pair_id", "source")

    def rows(dataset):
        return sorted(
            ({k: v for k, v in row.items() if k not in drop} for row in dataset.to_list()),
            key=lambda r: (r["image_hash"], r["text"]),
        )

    assert rows(result.dataset) == rows(local_run.dataset)
    assert all(source.startswith("memory://curation-test/corpus/") for source in result.dataset["source"])
    with pytest.raises(ValueError, match="writes to a local folder"):
        run_local(inputs, "memory://curation-test/out", lenient_config())


# Stage 1: parsing ------------------------------------------------------------------------------------------------


class DictResolver(ImageResolver):
    def __init__(self, images: dict[str, bytes]):
        self.images = images

    def fetch(self, url, max_bytes):
        data = self.images.get(url)
        return (data, None) if data is not None else (None, "image_not_archived")


def photo_bytes(size=(640, 480), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1] // 8, size[0] // 8, 3)) * 255).astype(np.uint8)
    return synthetic.encode_image(Image.fromarray(arr).resize(size, Image.Resampling.BICUBIC))


def page_batch(html: str | bytes, url="https://news.example.com/a.html", source="x.warc.gz") -> dict:
    data = html.encode() if isinstance(html, str) else html
    return {"page_id": ["p1"], "page_url": [url], "source": [source], "html": [data], "charset": [None]}


def test_parse_picks_the_dominant_image_and_its_texts():
    html = synthetic.page_html(
        "A day out",
        "/photos/main.jpg",
        alt="A dog catching a frisbee in a park",
        caption="The dog jumps high in the air.",
        paragraphs=synthetic.FILLER_PARAGRAPHS[:2],
        extra_images=["/thumbs/small.jpg"],
    ).replace("<h1>", '<img src="/img/side.jpg" width="120" height="90"><h1>')
    images = {
        "https://news.example.com/photos/main.jpg": photo_bytes(),
        "https://news.example.com/thumbs/small.jpg": photo_bytes((200, 150)),
    }
    out, tally = parse_pages(page_batch(html), ParseConfig(), DictResolver(images))
    assert out["image_url"] == ["https://news.example.com/photos/main.jpg"]
    assert out["texts"][0][:2] == ["A dog catching a frisbee in a park", "The dog jumps high in the air."]
    assert out["text_sources"][0][:3] == ["alt", "figcaption", "context"]
    assert out["texts"][0][2] in synthetic.FILLER_PARAGRAPHS[1] or out["texts"][0][2] in synthetic.FILLER_PARAGRAPHS[0]
    assert tally.drops("parse", "image") == {
        "logo_or_icon": 1,
        "advertisement": 1,
        "tracking_pixel": 1,
        "small_declared_size": 1,
        "not_dominant": 1,
    }


def test_parse_drops_bad_pages_with_reasons():
    config = ParseConfig(max_page_bytes=50_000)
    rng = np.random.default_rng(0)
    english = synthetic.page_html("T", "/a.jpg", alt="A cat", paragraphs=synthetic.FILLER_PARAGRAPHS[:2])
    cases = {
        "wrong_language": synthetic.page_html("T", "/a.jpg", paragraphs=[synthetic.GERMAN_PARAGRAPH] * 2),
        "page_too_large": english + "<p>" + "word " * 20_000 + "</p>",
        "no_images": english.replace("<img", "<span"),
        "no_dominant_image": english,  # its image is not in the archive
        "bad_encoding": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "no_text": "<html><body><img src='/a.jpg'></body></html>",
    }
    for reason, html in cases.items():
        out, tally = parse_pages(page_batch(html), config, DictResolver({}))
        assert out["image_id"] == [], reason
        assert tally.drops("parse", "page") == {reason: 1}, reason


def test_parse_never_raises_on_garbage():
    rng = random.Random(0)
    pieces = ["<img src=", "<div", "</p>", "<figure>", "alt='", "\x00", "é", "<script>", "&amp;", ">", '"', "<<"]
    batch = {"page_id": [], "page_url": [], "source": [], "html": [], "charset": []}
    for i in range(60):
        html = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 400)))
        charset = rng.choice([None, "utf-8", "x-unknown-charset", "latin-1"])
        for key, value in zip(batch, [str(i), "https://g.example/p", "x.warc", html.encode("utf-8"), charset]):
            batch[key].append(value)
    out, tally = parse_pages(batch, ParseConfig(), DictResolver({}))
    assert tally.get_count("parse", "page", INPUT) == 60
    assert tally.get_count("parse", "page", KEPT) + sum(tally.drops("parse", "page").values()) == 60


def test_parse_bounds_thousands_of_images():
    thumbs = [f"/t/{i}.jpg" for i in range(3000)]
    html = synthetic.page_html(
        "G", "/main.jpg", alt="A horse in a field", paragraphs=synthetic.FILLER_PARAGRAPHS[:2], extra_images=thumbs
    )
    resolver = DictResolver({"https://news.example.com/main.jpg": photo_bytes()})
    out, tally = parse_pages(page_batch(html), ParseConfig(max_images_per_page=100), resolver)
    assert out["image_url"] == ["https://news.example.com/main.jpg"]
    assert tally.get_count("parse", "image", "beyond_image_limit") == html.count("<img") - 100


# Stage 2: image filters ------------------------------------------------------------------------------------------


class AlwaysNSFW:
    """A plug-in for the NSFW interface that flags everything."""

    def score(self, images, stats):
        return [0.99] * len(images)


def image_batch(images: list[bytes]) -> dict:
    n = len(images)
    return {
        "image_id": [str(i) for i in range(n)],
        "page_url": ["https://e.example/p"] * n,
        "source": ["x.warc"] * n,
        "image_url": [f"https://e.example/{i}.jpg" for i in range(n)],
        "image": images,
        "dom_score": [1.0] * n,
        "language_rank": [500.0] * n,
        "texts": [["A cat on a mat"]] * n,
        "text_sources": [["alt"]] * n,
    }


def test_image_filters_reasons():
    good = photo_bytes()
    cases = {
        "too_small": photo_bytes((300, 600)),
        "extreme_aspect_ratio": photo_bytes((1600, 400)),
        "decompression_bomb": synthetic.decompression_bomb_png(),
        "not_an_image": b"GIF89a but not really" * 10,
        "corrupt_image": good[: len(good) // 3],
        "empty_image": b"",
    }
    config = ImageFilterConfig(natural_classifier="none", nsfw_detector="none")
    out, tally = filter_images(image_batch([good, *cases.values()]), config)
    assert out["image_id"] == ["0"]
    assert out["width"] == [640] and out["height"] == [480]
    assert len(out["image_stats"][0]) > 40
    assert tally.drops("images", "image") == dict.fromkeys(cases, 1)


def test_nsfw_and_natural_plugins():
    chart = synthetic.encode_image(synthetic.graphic_image("chart", np.random.default_rng(1), (640, 480)))
    batch = image_batch([photo_bytes(), chart])
    flagged = ImageFilterConfig(natural_classifier="none", nsfw_detector=f"{__name__}:AlwaysNSFW")
    out, tally = filter_images(batch, flagged)
    assert out["image_id"] == [] and tally.drops("images", "image") == {"nsfw": 2}
    out, tally = filter_images(batch, ImageFilterConfig(nsfw_detector="none"))
    assert "1" not in out["image_id"] and tally.get_count("images", "image", "not_natural_photo") >= 1


def test_nudenet_detector_discounts_lone_detections():
    detector = NudeNetDetector.__new__(NudeNetDetector)
    lone = [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.7}]
    assert detector.score_detections(lone) == pytest.approx(0.35)
    assert detector.score_detections([*lone, {"class": "FACE_FEMALE", "score": 0.6}]) == pytest.approx(0.7)
    assert detector.score_detections([{"class": "FACE_MALE", "score": 0.9}]) == 0.0


@require_module("nudenet")
@require_shared_data
def test_nudenet_runs_offline_on_everyday_photos():
    detector = NudeNetDetector()
    paths = sorted((COCO_DIR / "images").glob("*.jpg"))[:12]
    images = [Image.open(p).convert("RGB") for p in paths]
    scores = detector.score(images, np.zeros((len(images), 1)))
    assert len(scores) == 12 and max(scores) < ImageFilterConfig().nsfw_threshold


# Stage 3: text cleaning ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("A man riding a wave on top of a surfboard.", None),
        ("Two dogs play with a ball in the snow", None),
        ("IMG_2041.JPG", "filename_like"),
        ("DSC01234 holiday", "filename_like"),
        ("Visit www.example.com for the best photos of the city", "url_like"),
        ("Buy cheap sunglasses now with free shipping", "spam"),
        ("A sexy girl in the xxx video of the week", "porn"),
        ("Stock photo of a businessman in an office", "boilerplate"),
        ("Dog", "too_short"),
        ("word " * 60, "too_long"),
        ("Sunset beach palm trees", "no_function_word"),
        ("The Best Hotel Deals In Paris This Summer", "capitalized"),
        ("shoes in the shoes with shoes and shoes", "repeated_words"),
        ("A photo of the 2019 12 31 23 59 event", "too_many_digits"),
        ("A qwzx vbnmr plokij in the trqwe", "rare_words"),
        ("A cafÃ© on the corner of the street", "bad_characters"),
    ],
)
def test_text_rules(text, reason):
    assert check_text(text, TextCleaningConfig())[0] == reason


def test_text_rules_are_configurable(tmp_path):
    assert check_text("Sunset beach palm trees", TextCleaningConfig(require_function_word=False))[0] is None
    assert check_text("A dog on a red sofa", TextCleaningConfig(spam_phrases=["sofa"]))[0] == "spam"
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\na\non\ndog\n##s\n")
    config = TextCleaningConfig(vocabulary=str(vocab), max_rare_word_ratio=0.1)
    assert check_text("A dog on a dog bed", config)[0] == "rare_words"
    assert check_text("A dog on a dog", config)[0] is None


def test_clean_texts_explodes_pairs_and_counts():
    batch = image_batch([b"x", b"y"])
    batch["texts"] = [["A cat on a mat", "a cat on a mat.", "IMG_1.jpg"], ["click here"]]
    batch["text_sources"] = [["alt", "title", "context"], ["alt"]]
    for name in ("image_hash", "width", "height", "nsfw_score", "natural_score", "image_stats"):
        batch[name] = [None, None]
    out, tally = clean_texts(batch, TextCleaningConfig())
    assert out["text"] == ["A cat on a mat"] and out["image_id"] == ["0"]
    assert tally.drops("text", "pair") == {"duplicate_text": 1, "filename_like": 1, "too_short": 1}
    assert tally.drops("text", "image") == {"no_clean_text": 1}


# Stage 4: relevance ----------------------------------------------------------------------------------------------


def test_relevance_threshold_drops_exactly_the_low_scores():
    rng = np.random.default_rng(0)
    texts = ["A red bus on a city street", "A man skiing down a snowy slope", "We hope you enjoyed this post"] * 4
    stats = rng.random((len(texts), len(STAT_NAMES))).astype(np.float32)
    scores = load_relevance_model().predict_proba(relevance_features(texts, stats))
    threshold = float(np.median(scores))
    batch = {"pair_id": [str(i) for i in range(len(texts))], "text": texts, "image_stats": stats.tolist()}
    out, tally = score_relevance(batch, RelevanceConfig(relevance_threshold=threshold))
    assert out["pair_id"] == [str(i) for i, s in enumerate(scores) if s >= threshold]
    assert out["relevance_score"] == pytest.approx([s for s in scores if s >= threshold])
    assert tally.drops("relevance", "pair") == {"low_relevance": int((scores < threshold).sum())}


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    if not (FLICKR_DIR / "captions.jsonl").is_file():
        pytest.skip("shared data not available")
    from imagebert_hf.curation.fitting import load_captioned_images

    flickr = load_captioned_images(FLICKR_DIR, limit=400)
    coco = load_captioned_images(COCO_DIR)
    return flickr, coco


@require_shared_data
def test_train_relevance_model_on_shared_data(captioned, tmp_path):
    from imagebert_hf.curation.fitting import ranking_accuracy, train_relevance_model
    from imagebert_hf.curation.linear import LinearModel

    flickr, coco = captioned
    model = train_relevance_model(flickr)
    # Trained on Flickr8k, evaluated on COCO: a true caption must outrank a mismatched one well above chance.
    assert ranking_accuracy(model, coco) > 0.6
    model.save(tmp_path / "relevance.json")
    reloaded = LinearModel.load(tmp_path / "relevance.json")
    features = relevance_features(["A dog on the grass"], coco[0].stats[None])
    assert reloaded.predict_proba(features) == pytest.approx(model.predict_proba(features))


@require_shared_data
def test_train_natural_photo_model_on_shared_data(captioned):
    from imagebert_hf.curation.fitting import graphic_statistics, train_natural_photo_model

    flickr, coco = captioned
    model = train_natural_photo_model(np.stack([x.stats for x in flickr]), graphic_statistics(120, seed=0))
    photos = model.predict_proba(np.stack([x.stats for x in coco]))
    graphics = model.predict_proba(graphic_statistics(48, seed=7))
    assert (photos >= 0.5).mean() > 0.9
    assert (graphics >= 0.5).mean() < 0.15


# Stage 5: aggregation --------------------------------------------------------------------------------------------


def test_aggregation_rules():
    keys = [
        {"pair_id": "a", "image_hash": "h1", "text_key": "a dog", "relevance_score": 0.4},
        {"pair_id": "b", "image_hash": "h1", "text_key": "a brown dog", "relevance_score": 0.9},
        {"pair_id": "c", "image_hash": "h1", "text_key": "a dog running", "relevance_score": 0.9},
        *(
            {"pair_id": f"s{i}", "image_hash": f"x{i}", "text_key": "photo of the day", "relevance_score": 1.0}
            for i in range(4)
        ),
        {"pair_id": "d", "image_hash": "x0", "text_key": "a cat", "relevance_score": 0.1},
    ]
    kept, tally = aggregate(keys, AggregationConfig(max_images_per_text=3))
    assert kept == {"b", "d"}
    assert tally.drops("aggregation", "pair") == {
        "text_shared_by_too_many_images": 4,
        "duplicate_image_lower_score": 2,
    }
    kept, _ = aggregate(keys, AggregationConfig(max_images_per_text=4))
    assert kept == {"b", "s0", "s1", "s2", "s3"}


# Command line ----------------------------------------------------------------------------------------------------


@require_shared_data
def test_cli_on_saved_html_pages(corpus, tmp_path, capsys):
    from imagebert_hf.curation.cli import main

    folder = next(p for p in corpus["inputs"] if Path(p).is_dir())
    out = tmp_path / "cli"
    args = ["--inputs", folder, "--output_dir", str(out), "--relevance_threshold", "0", "--max_images_per_text", "3"]
    assert main(args) == 0
    dataset = load_curated(out)
    assert len(dataset) == 2 and set(dataset["source"]) == {
        str(Path(folder) / "trip.html"),
        str(Path(folder) / "walk.html"),
    }
    assert CurationConfig.load(out / "config.json").aggregation.max_images_per_text == 3
    assert '"pairs": 2' in capsys.readouterr().out


def test_a_warc_s_image_is_its_200_response_not_its_request_record_or_an_error_capture(tmp_path):
    """Crawlers store each capture's request record before its response, and a failed capture may come first: the
    image is the bytes of the 200 response."""
    import io

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    from imagebert_hf.curation.inputs import WarcImageResolver

    image = b"\xff\xd8\xff\xe0 a jpeg body"
    url = "https://news.example.com/photos/bear.jpg"
    path = tmp_path / "crawl.warc.gz"
    with open(path, "wb") as handle:
        writer = WARCWriter(handle, gzip=True)
        request = StatusAndHeaders(
            "GET /photos/bear.jpg HTTP/1.1", [("Host", "news.example.com")], is_http_request=True
        )
        writer.write_record(writer.create_warc_record(url, "request", payload=io.BytesIO(b""), http_headers=request))
        for status, content_type, body in (("404 Not Found", "image/jpeg", b"<html>gone</html>"),
                                           ("200 OK", "image/jpeg", image)):  # fmt: skip
            headers = StatusAndHeaders(
                status, [("Content-Type", content_type), ("Content-Length", str(len(body)))], protocol="HTTP/1.1"
            )
            writer.write_record(
                writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers)
            )
    assert WarcImageResolver(str(path)).fetch(url, 1 << 20) == (image, None)
