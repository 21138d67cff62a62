"""Driving the app in a real headless Chromium (Selenium with the system `chromedriver`): what the browser tests do,
and how the screenshots in docs/ are taken.

    python -m tests.browser_helpers --output_dir docs     # the `make demo` model, as `imagebert-app` serves it

The browser is kept on the loopback interface: every host name other than 127.0.0.1 fails to resolve.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver",)
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


def find_chromium() -> tuple[str, str] | None:
    """`(browser, driver)` executables (Debian's `chromium` and `chromium-driver`), or None when either is absent."""
    browser = next((shutil.which(name) for name in CHROMIUM_NAMES if shutil.which(name)), None)
    driver = next((shutil.which(name) for name in DRIVER_NAMES if shutil.which(name)), None)
    return (browser, driver) if browser and driver else None


def open_chromium(width: int = 1200, height: int = 900):
    """A headless Chromium webdriver of that window size; raises RuntimeError when Chromium is not installed."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise RuntimeError("Chromium and its driver are needed: apt-get install chromium chromium-driver.")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service(found[1]), options=options)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(blocks):
    """Serves a built app on a free loopback port for the duration of the block; yields its URL."""
    from imagebert_hf.app.ui import launch_app

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    port = free_port()
    launch_app(blocks, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        blocks.close()


# ------------------------------------------------------------------------------------------------ page actions


def wait_until(driver, condition, timeout: float = 60.0):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page re-renders as results arrive: an element read mid-update is tried again at the next poll.
    wait = WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])
    return wait.until(lambda d: condition(d))


def _elements(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait_until(driver, lambda d: _elements(d, "#search-button"))


def show_tab(driver, name: str) -> None:
    """Clicks the tab whose title starts with `name` ("Text", "Image")."""
    tab = wait_until(driver, lambda d: [t for t in _elements(d, "button[role='tab']") if t.text.startswith(name)])[0]
    tab.click()


def search(driver, query: str, expect: int | None = None) -> list[str]:
    """Types the query, presses Enter, and returns the result gallery's captions (once `expect` of them, or any, or an
    error message, are shown)."""
    from selenium.webdriver.common.keys import Keys

    box = wait_until(driver, lambda d: _elements(d, "#query textarea, #query input"))[0]
    box.clear()
    # Enter submits, as the Search button does; warning toasts from earlier requests may cover the button.
    box.send_keys(query + Keys.ENTER)

    def done(d):
        captions = [c.text for c in _elements(d, "#result-gallery .caption-label")]
        if expect is None:
            return (captions,) if captions or error_text(d, "search-error") else None
        return (captions,) if len(captions) == expect else None

    return wait_until(driver, done)[0]


def upload_photo(driver, path: str | os.PathLike) -> None:
    """Sends a file to the photo upload field (the upload then ranks the captions), clearing the earlier one."""
    for button in _elements(driver, "#photo-upload button[aria-label='Clear']"):
        button.click()
    field_ = wait_until(driver, lambda d: _elements(d, "#photo-upload input[type='file']"))[0]
    field_.send_keys(str(Path(path).resolve()))


def pick_photo(driver, key: str) -> None:
    """Picks a gallery photo in the dropdown: opens its list and clicks the option of that name."""
    box = wait_until(driver, lambda d: _elements(d, "#photo-pick input"))[0]
    box.click()
    options = "li[data-testid='dropdown-option']"
    option = wait_until(driver, lambda d: [o for o in _elements(d, options) if o.get_attribute("aria-label") == key])
    driver.execute_script("arguments[0].scrollIntoView({block: 'nearest'})", option[0])
    option[0].click()


def dropdown_value(driver, elem_id: str) -> str:
    found = _elements(driver, f"#{elem_id} input")
    return found[0].get_attribute("value") if found else ""


def wrapped_headers(driver, elem_id: str) -> list[str]:
    """The header cells of the table in `#elem_id` whose text takes more than one line."""
    script = """
        return Array.from(arguments[0].querySelectorAll('th')).filter(th => {
            const range = document.createRange();
            range.selectNodeContents(th);
            return new Set(Array.from(range.getClientRects()).map(r => Math.round(r.top))).size > 1;
        }).map(th => th.textContent);
    """
    found = _elements(driver, f"#{elem_id}")
    return driver.execute_script(script, found[0]) if found else []


def covers_header(driver) -> bool:
    """Whether something (a toast, say) lies over the page header's text."""
    script = """
        const header = document.querySelector('#page-header');
        const box = header.getBoundingClientRect();
        const points = [[0.25, 0.3], [0.5, 0.3], [0.9, 0.3], [0.5, 0.8], [0.95, 0.8]];
        return points.some(([fx, fy]) => {
            const hit = document.elementFromPoint(box.left + fx * box.width, box.top + fy * box.height);
            return hit !== null && !header.contains(hit) && !hit.contains(header);
        });
    """
    return bool(driver.execute_script(script))


def table_rows(driver, elem_id: str) -> list[list[str]]:
    """The body rows of the Markdown table in `#elem_id`, as cell texts."""
    rows = _elements(driver, f"#{elem_id} tbody tr")
    return [[cell.text for cell in row.find_elements("css selector", "td")] for row in rows]


def error_text(driver, elem_id: str) -> str:
    found = _elements(driver, f"#{elem_id}")
    return found[0].text.strip() if found else ""


def wait_for_captions_or_error(driver, previous: str = "", timeout: float = 60.0) -> tuple[list[list[str]], str]:
    """Waits for the caption table to change from `previous` (its text before) or for an error; returns both."""

    def done(d):
        table = _elements(d, "#caption-results")
        text = table[0].text if table else ""
        error = error_text(d, "photo-error")
        return (table_rows(d, "caption-results"), error) if (text and text != previous) or error else None

    return wait_until(driver, done, timeout)


def region_picture_shown(driver, elem_id: str) -> bool:
    """Whether `#elem_id` shows a loaded image (its natural width is not zero)."""
    images = _elements(driver, f"#{elem_id} img")
    return bool(images) and bool(driver.execute_script("return arguments[0].naturalWidth", images[0]))


def click_example(driver, elem_id: str, row: int = 0) -> None:
    """Clicks row `row` of the `gr.Examples` table in `#elem_id` (the view then runs on it)."""
    css = f"#{elem_id} td[data-testid='dataset-cell-{row}-0']"
    wait_until(driver, lambda d: _elements(d, css))[0].click()


def wait_for_relations(
    driver, previous: str = "", timeout: float = 60.0, captions: list[str] | None = None
) -> tuple[list[list[str]], str]:
    """Waits for the relations table to change from `previous` (its text before) with both region pictures shown, or
    for an error; returns the table's rows and the error. With `captions` (true, twin), waits for the table to show
    those: picking an example sets the photo and then the kind of swap, and the table may show the photo's other
    twin in between."""

    def done(d):
        table = _elements(d, "#relation-results")
        text = table[0].text if table else ""
        error = error_text(d, "relation-error")
        pictures = region_picture_shown(d, "relation-true-regions") and region_picture_shown(
            d, "relation-twin-regions"
        )
        if error:
            return table_rows(d, "relation-results"), error
        if not (text and text != previous and pictures):
            return None
        rows = table_rows(d, "relation-results")
        if captions is not None and [row[1] for row in rows[:2]] != list(captions):
            return None
        return rows, error

    return wait_until(driver, done, timeout)


def scroll_to_tabs(driver) -> None:
    """Scrolls the page so that the tab bar is at the top of the window."""
    driver.execute_script(
        "window.scrollTo(0, document.querySelector(\"button[role='tab']\").getBoundingClientRect().top"
        " + window.scrollY - 8)"
    )
    time.sleep(0.3)


def save_screenshot(driver, path: str | os.PathLike, colours: int = 96) -> Path:
    """The window as a palette PNG (a few dozen kilobytes rather than hundreds)."""
    from io import BytesIO

    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.open(BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    image.quantize(colours, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def scroll_to(driver, elem_id: str) -> None:
    found = _elements(driver, f"#{elem_id}")
    if found:
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", found[0])
        time.sleep(0.3)


# ------------------------------------------------------------------------------------------------ screenshots


@dataclass
class ScreenshotArguments:
    """Settings of the screenshot run (the app's own settings are those of `imagebert-app`)."""

    output_dir: str = field(default="docs", metadata={"help": "Where app_*.png go."})
    query: str | None = field(
        default=None,
        metadata={"help": "The text query shown (the page's placeholder, a query it answers, when unset)."},
    )
    photo: str | None = field(
        default=None, metadata={"help": "The photo uploaded (the gallery's first photo when unset)."}
    )


SCREENSHOT_SIZE = (1400, 1180)  # wide enough that the result tables sit beside the region pictures unsqueezed


def take_screenshots(
    blocks, demo, output_dir: str | os.PathLike, query: str | None = None, photo: str | None = None
) -> list[Path]:
    """The four views (text -> images, image -> texts, a refused upload, relations: its first example, scrolled to
    the tab bar) as docs/app_*.png."""
    from imagebert_hf.app.ui import GENERIC_PLACEHOLDER

    output_dir = Path(output_dir)
    query = query or (demo.example_queries() or [GENERIC_PLACEHOLDER])[0]
    photo = photo or str(demo.gallery[0].path)
    shots = []
    driver = open_chromium(*SCREENSHOT_SIZE)
    try:
        with serving(blocks) as url:
            open_page(driver, url)
            search(driver, query)
            wait_until(driver, lambda d: region_picture_shown(d, "search-regions"))
            if wrapped_headers(driver, "search-results"):
                raise RuntimeError(
                    f"table headers wrap at {SCREENSHOT_SIZE}: {wrapped_headers(driver, 'search-results')}"
                )
            shots.append(save_screenshot(driver, output_dir / "app_text_to_images.png"))
            show_tab(driver, "Image")
            upload_photo(driver, photo)
            wait_for_captions_or_error(driver)
            wait_until(driver, lambda d: region_picture_shown(d, "photo-regions"))
            if wrapped_headers(driver, "caption-results"):
                raise RuntimeError(f"caption table headers wrap at {SCREENSHOT_SIZE}")
            shots.append(save_screenshot(driver, output_dir / "app_image_to_texts.png"))
            not_an_image = output_dir / "not-an-image.txt"
            not_an_image.write_text("this is not a photo\n")
            try:
                upload_photo(driver, not_an_image)
                wait_until(driver, lambda d: error_text(d, "photo-error"))
                time.sleep(0.5)  # the page settles
                shots.append(save_screenshot(driver, output_dir / "app_bad_upload.png"))
            finally:
                not_an_image.unlink()
            show_tab(driver, "Relations")
            click_example(driver, "relation-examples", 0)
            _, error = wait_for_relations(driver)
            if error:
                raise RuntimeError(f"the relations example failed: {error}")
            if wrapped_headers(driver, "relation-results"):
                raise RuntimeError(f"relations table headers wrap at {SCREENSHOT_SIZE}")
            scroll_to_tabs(driver)
            shots.append(save_screenshot(driver, output_dir / "app_relations.png"))
    finally:
        driver.quit()
    return shots


def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser

    from imagebert_hf.app.cli import AppArguments, load_demo
    from imagebert_hf.app.ui import build_app

    app_args, shot_args = HfArgumentParser((AppArguments, ScreenshotArguments)).parse_args_into_dataclasses(args=argv)
    demo = load_demo(app_args)
    for path in take_screenshots(
        build_app(demo, top_k=app_args.top_k), demo, shot_args.output_dir, shot_args.query, shot_args.photo
    ):
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
