"""The retrieval app in a real headless Chromium: the page served on a loopback port and driven like a person would.

Needs Debian's `chromium` and `chromium-driver` (`make browser` installs them) and selenium (the `testing` extra);
skips, saying which is missing, where they are absent.
"""

import re

import pytest

from .test_app import QUERY, make_tiny_demo
from .test_bad_images import png_header_only
from .testing_utils import require_module


pytestmark = [require_module("gradio"), require_module("selenium")]


def _chromium_or_skip():
    from .browser_helpers import find_chromium

    if find_chromium() is None:
        pytest.skip("Chromium or chromedriver not found: `make browser` installs them (apt-get, as root)")


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer, make_tiny_extractor, make_tiny_config):
    _chromium_or_skip()
    from imagebert_hf.app import build_app

    from .browser_helpers import open_chromium, open_page, serving

    demo = make_tiny_demo(tmp_path_factory.mktemp("browser-app"), tokenizer, make_tiny_extractor, make_tiny_config)
    driver = open_chromium()
    try:
        with serving(build_app(demo, top_k=5)) as url:
            assert url.startswith("http://127.0.0.1:")
            open_page(driver, url)
            yield demo, driver
    finally:
        driver.quit()


def test_a_text_query_shows_the_gallery_in_score_order(served):
    from imagebert_hf.app.ui import GENERIC_PLACEHOLDER

    from .browser_helpers import region_picture_shown, search, table_rows, wrapped_headers

    demo, driver = served
    # The placeholder is a query the gallery answers (or a plain prompt where none is found).
    placeholder = driver.find_element("css selector", "#query textarea").get_attribute("placeholder")
    assert placeholder == (demo.example_queries() or [GENERIC_PLACEHOLDER])[0]
    captions = search(driver, QUERY, expect=5)
    ranks = [int(re.match(r"#(\d+)", caption).group(1)) for caption in captions]
    scores = [float(caption.split()[1]) for caption in captions]
    assert ranks == [1, 2, 3, 4, 5]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
    expected = demo.search_images(QUERY, 5)
    assert scores == pytest.approx([round(hit.score, 3) for hit in expected], abs=1e-3)
    shown = [
        driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image)
        for image in driver.find_elements("css selector", "#result-gallery img")
    ]
    assert len(shown) == 5 and all(shown)  # five photos actually loaded, not just captions
    assert [row[3] for row in table_rows(driver, "search-results")] == [hit.image.path.name for hit in expected]
    assert region_picture_shown(driver, "search-regions")
    assert wrapped_headers(driver, "search-results") == []  # "score", not "sco" over "re"


def test_an_uploaded_photo_gets_captions_and_its_region_picture(served):
    from .browser_helpers import (
        dropdown_value,
        pick_photo,
        region_picture_shown,
        show_tab,
        upload_photo,
        wait_for_captions_or_error,
        wrapped_headers,
    )

    demo, driver = served
    show_tab(driver, "Image")
    pick_photo(driver, demo.gallery[1].key)
    wait_for_captions_or_error(driver)
    table = driver.find_element("css selector", "#caption-results").text
    assert table.startswith(f"Captions ranked for the gallery photo {demo.gallery[1].path.name}")
    assert dropdown_value(driver, "photo-pick") == demo.gallery[1].key

    # An upload replaces the pick: the dropdown empties, and the table names the uploaded photo.
    upload_photo(driver, demo.gallery[4].path)
    rows, error = wait_for_captions_or_error(driver, table)
    assert error == "" and len(rows) == 5
    table = driver.find_element("css selector", "#caption-results").text
    assert table.startswith(f"Captions ranked for the uploaded photo {demo.gallery[4].path.name}")
    assert dropdown_value(driver, "photo-pick") == ""
    assert wrapped_headers(driver, "caption-results") == []
    assert [int(row[0]) for row in rows] == [1, 2, 3, 4, 5]
    scores = [float(row[1]) for row in rows]
    assert scores == sorted(scores, reverse=True) and all(row[3] in demo.captions for row in rows)
    assert region_picture_shown(driver, "photo-regions")


def test_a_bad_upload_shows_a_readable_message(served, tmp_path):
    from .browser_helpers import (
        covers_header,
        error_text,
        show_tab,
        upload_photo,
        wait_for_captions_or_error,
        wait_until,
    )

    _, driver = served
    show_tab(driver, "Image")
    previous = driver.find_element("css selector", "#caption-results").text
    not_an_image = tmp_path / "holiday-notes.txt"
    not_an_image.write_text("this is not a photo\n")
    upload_photo(driver, not_an_image)
    _, error = wait_for_captions_or_error(driver, previous)
    assert "holiday-notes.txt is not a usable image" in error and "Traceback" not in driver.page_source

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(30000, 30000))
    upload_photo(driver, bomb)
    wait_until(driver, lambda d: "bomb.png" in error_text(d, "photo-error"))
    assert "decompression bomb" in error_text(driver, "photo-error")
    # The message is in the page; nothing stays over the header, here or on the other tab.
    assert not covers_header(driver)
    show_tab(driver, "Text")
    assert not covers_header(driver)


def test_an_empty_query_shows_a_readable_message(served):
    from .browser_helpers import error_text, search, show_tab, wait_until

    _, driver = served
    show_tab(driver, "Text")
    search(driver, "   ")
    wait_until(driver, lambda d: error_text(d, "search-error"))
    assert "Type a query first" in error_text(driver, "search-error")


def test_the_relations_example_shows_both_captions_and_their_scores(served):
    from imagebert_hf.app.relations import KIND_NAMES, SCORER_NAMES, RelationView

    from .browser_helpers import (
        click_example,
        covers_header,
        dropdown_value,
        show_tab,
        wait_for_relations,
        wrapped_headers,
    )

    demo, driver = served
    view = RelationView(demo)
    show_tab(driver, "Relations")
    example = view.examples[0]
    click_example(driver, "relation-examples", 0)
    rows, error = wait_for_relations(driver, captions=[example.true_caption, example.swapped_caption])
    comparison = view.compare(example)
    assert error == "" and dropdown_value(driver, "relation-pick") == example.key
    headers = [th.text for th in driver.find_elements("css selector", "#relation-results thead th")]
    assert headers == ["", "caption", *(SCORER_NAMES[score.scorer] for score in comparison.scores)]
    assert len(rows) == 3 and rows[2][:2] == ["", ""]  # the captions, then who wins under each score
    assert [row[:2] for row in rows[:2]] == [["true", example.true_caption], ["twin", example.swapped_caption]]
    for column, score in enumerate(comparison.scores, start=2):
        shown_true, shown_twin = float(rows[0][column]), float(rows[1][column])
        assert (shown_true, shown_twin) == pytest.approx((score.true_score, score.swapped_score), abs=1e-3)
        # The page shows the two captions' scores apart where the model scores them apart, and says who wins.
        assert (shown_true != shown_twin) == (round(score.true_score, 3) != round(score.swapped_score, 3))
        assert rows[2][column] == score.verdict()
    assert any(shown_true != shown_twin for shown_true, shown_twin in zip(rows[0][2:], rows[1][2:]))
    assert view.where(example) in driver.find_element("css selector", "#relation-results").text
    assert wrapped_headers(driver, "relation-results") == [] and not covers_header(driver)

    # Another example (a colour swap when the first photos have one): the table follows it.
    row = next(i for i, e in enumerate(view.examples[:3]) if (e.key, e.kind) != (example.key, example.kind))
    other = view.examples[row]
    previous = driver.find_element("css selector", "#relation-results").text
    click_example(driver, "relation-examples", row)
    rows, error = wait_for_relations(driver, previous, captions=[other.true_caption, other.swapped_caption])
    assert error == "" and [row[1] for row in rows[:2]] == [other.true_caption, other.swapped_caption]
    checked = driver.find_element("css selector", "#relation-kind input:checked").get_attribute("value")
    assert checked == KIND_NAMES[other.kind]
