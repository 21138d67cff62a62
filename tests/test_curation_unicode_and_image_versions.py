"""Text cleaning judges captions of any script alike: an all-caps caption with accents or in another alphabet gets the
verdict of its ASCII spelling, while mojibake, control and private-use characters stay `bad_characters`; phrases
match whole words of any script. A Spark rerun redoes a part when an image saved next to one of its pages changed,
and the runners check the output folder once, naming it as the command's flag when the command calls them."""

import time

import pytest

from imagebert_hf.curation import run_local, synthetic
from imagebert_hf.curation.cli import main
from imagebert_hf.curation.config import TextCleaningConfig
from imagebert_hf.curation.text_cleaning import check_text, normalize_text

from .test_curation import photo_bytes
from .test_curation_cli_inputs import LENIENT
from .test_curation_reruns_and_overlaps import CAPTION, _config, _write_page
from .testing_utils import require_module


# Each caption with its spelling in ASCII letters, which the same rules judge.
ALL_CAPS = [
    ("SÃO PAULO À NOITE", "SAO PAULO A NOITE"),
    ("A IRMÃ E O IRMÃO DA MÃE NA PRAIA", "A IRMA E O IRMAO DA MAE NA PRAIA"),
    ("ÉCOLE DE MUSIQUE À PARIS", "ECOLE DE MUSIQUE A PARIS"),
    ("ΣΠΙΤΙ ΣΤΗΝ ΑΘΗΝΑ ΤΟ ΒΡΑΔΥ", "SPITI STIN ATHINA TO VRADY"),
    ("ДОМ НА БЕРЕГУ РЕКИ ВЕЧЕРОМ", "DOM NA BEREGU REKI VECHEROM"),
]


def _multilingual_config(**changes) -> TextCleaningConfig:
    words = ["a", "à", "de", "da", "na", "o", "e", "to", "στην", "stin", "на"]
    return TextCleaningConfig(function_words=words, max_rare_word_ratio=1.0, **changes)


def test_all_caps_captions_in_any_script_get_the_verdict_of_their_ascii_spelling():
    config = _multilingual_config()
    for caption, ascii_spelling in ALL_CAPS:
        assert check_text(caption, config)[0] == check_text(ascii_spelling, config)[0] == "capitalized", caption
        lower = caption.lower()
        assert check_text(lower, config)[0] == check_text(ascii_spelling.lower(), config)[0] is None, lower


def test_mojibake_control_and_private_use_characters_stay_bad():
    junk = [
        "A cafÃ©Ã© on the corner of the street",  # "é" read as cp1252, twice
        "Ã‰COLE DE MUSIQUE Ã€ PARIS",  # capitals read as cp1252
        "Un chien voilÃ  la plage de la ville",  # "à" and its no-break space read as cp1252
        "A dog on the beach atÂ noon today",  # a no-break space read as cp1252
        "A dog on the beach \ufffd at noon",
        "A dog on the beach\x07 at noon",
        "A dog on the beach\x9c at noon",  # C1 control
        "\ue001 A dog on the beach at noon",  # an icon font's glyph
        "A dog on the beach \U000f0001 at noon",
        "A dog on the beach \ud800 at noon",
    ]
    for text in junk:
        assert check_text(normalize_text(text), _multilingual_config())[0] == "bad_characters", ascii(text)


# (phrase, text, whether the phrase is found as a whole word)
PHRASES = [
    ("секс", "Девушка и сексуальный мужчина на пляже", False),
    ("секс", "Девушка и секс на пляже у моря", True),
    ("φωτο", "Μια φωτογραφία από την Αθήνα το βράδυ", False),
    ("promoção", "Grande PROMOÇÃO de verão na loja", True),
    ("cafe", "A cafe\u0301 at the corner of the street", False),  # a combining accent belongs to the word
    ("café", "A cafe\u0301 at the corner of the street", True),  # typed composed, written decomposed
    ("ad", "An éad at the corner of the street", False),
    ("ad", "A bread at the corner of the street", False),
    ("ad", "An ad at the corner of the street", True),
]


def test_phrases_match_whole_words_of_any_script():
    for phrase, text, found in PHRASES:
        config = _multilingual_config(spam_phrases=[phrase], require_function_word=False, max_capitalized_ratio=1.0)
        assert check_text(text, config)[0] == ("spam" if found else None), (phrase, text)


@require_module("pyspark")
@require_module("resiliparse")
@require_module("fastwarc")
def test_a_spark_rerun_redoes_a_part_whose_page_image_was_rewritten(spark, tmp_path):
    from imagebert_hf.curation.spark import run_spark

    site = _write_page(tmp_path / "site")
    page = (site / "page.html").read_bytes()
    first = run_spark([site], tmp_path / "out", _config(), spark=spark, num_partitions=1)
    assert first.dataset["text"] == [CAPTION] and first.dataset["width"] == [640]
    time.sleep(0.01)  # a new modification time, besides a new size
    (site / "page_files" / "photo.jpg").write_bytes(photo_bytes((800, 600), seed=1))
    assert (site / "page.html").read_bytes() == page
    again = run_spark([site], tmp_path / "out", _config(), spark=spark, num_partitions=1)
    local = run_local([site], tmp_path / "local", _config())
    assert again.dataset["width"] == local.dataset["width"] == [800]
    assert again.dataset["image_hash"] == local.dataset["image_hash"] and again.tally == local.tally


def _saved_site(folder):
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "walk.jpg").write_bytes(photo_bytes())
    page = synthetic.page_html(
        "Walk", "images/walk.jpg", alt="A man walking a dog in the park", paragraphs=synthetic.FILLER_PARAGRAPHS[:3]
    )
    (folder / "walk.html").write_text(page)
    return folder


@require_module("resiliparse")
@require_module("wordfreq")
def test_the_command_checks_its_output_folder_once_through_the_runner(tmp_path, monkeypatch):
    import imagebert_hf.curation.inputs as inputs
    import imagebert_hf.curation.pipeline as pipeline

    calls = []

    def counted(check):
        def count(*args, **kwargs):
            calls.append(check.__name__)
            return check(*args, **kwargs)

        return count

    for module in (inputs, pipeline):
        for name in ("check_output_apart", "check_data_replaceable"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, counted(getattr(module, name)))
    site = _saved_site(tmp_path / "site")
    assert main(["--inputs", str(site), "--output_dir", str(tmp_path / "out"), *LENIENT]) == 0
    assert sorted(calls) == ["check_data_replaceable", "check_output_apart"]


@require_module("resiliparse")
@require_module("pyspark")
def test_the_runners_name_the_output_folder_as_the_command_does(tmp_path, monkeypatch):
    from imagebert_hf.curation import spark

    def no_session(*args, **kwargs):
        raise AssertionError("a session was started")

    monkeypatch.setattr(spark, "local_spark_session", no_session)
    crawl = _saved_site(tmp_path / "crawl")
    with pytest.raises(ValueError, match=r"^--output_dir .*crawl/lait is inside the input"):
        run_local([str(crawl)], crawl / "lait", output_flag="--output_dir")
    with pytest.raises(ValueError, match=r"^--output_dir .*crawl/lait is inside the input"):
        spark.run_spark([str(crawl)], crawl / "lait", spark_master="local[1]", output_flag="--output_dir")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"^--output_dir .*afile exists and is not a folder"):
        spark.run_spark([str(crawl)], tmp_path / "afile", spark_master="local[1]", output_flag="--output_dir")
    assert not (crawl / "lait").exists()


def test_context_sentences_split_before_capitals_of_any_script():
    from imagebert_hf.curation.parse import _sentences

    text = 'Vue de Paris. Élégante maison!  Ωραίο σπίτι. Дом у моря. e.g. not here. 3 dogs. "Quoted" one.'
    assert _sentences(text) == [
        "Vue de Paris.",
        "Élégante maison!",
        "Ωραίο σπίτι.",
        "Дом у моря. e.g. not here.",
        "3 dogs.",
        '"Quoted" one.',
    ]
