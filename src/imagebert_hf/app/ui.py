"""The Gradio page: text -> images and image -> texts, each with the region picture of its top match, and relations: a
gallery photo's true relation caption against its swapped twin, scored side by side.

Every handler turns a bad input (an empty query, a file that is not an image, a decompression bomb) into a message in
the page, beside the results it replaces (no toast, which would stay over the header); anything unexpected is logged
with its traceback on the server and shown as one readable line, never as a stack trace.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..models.imagebert.roi_image_loading import DEFAULT_MAX_FILE_BYTES
from .drawing import render_regions
from .engine import MAX_RESULTS, AppInputError, RetrievalDemo, parse_caption_list
from .relations import KIND_NAMES, SCORER_NAMES, RelationView


logger = logging.get_logger(__name__)

CSS = """
#search-results table, #caption-results table, #relation-results table { font-size: 0.95em; }
#search-results th, #caption-results th, #search-results td:not(:last-child), #caption-results td:not(:last-child),
#relation-results th, #relation-results td:not(:nth-child(2)) {
  white-space: nowrap;
}
.error-message { color: #b00020; font-weight: 600; }
"""
# The query box's placeholder where the gallery has no caption the model answers (a folder of photos, say).
GENERIC_PLACEHOLDER = "Describe a photo"
# The most photos a picker lists: a page listing a gallery of millions would not load. Past it, a photo is picked by
# typing its name.
MAX_PICKER_CHOICES = 1000
# What Markdown (with gradio's tables, strikethrough and LaTeX) reads as markup inside a line: links and images,
# emphasis, code, HTML and entities, table cells. User text never starts a line here (newlines become spaces), so
# the line-start markers (#, >, lists) need no escape.
_MARKDOWN_MARKUP = re.compile(r"([\\`*_\[\]<>&|~$!])")


def _theme():
    import gradio as gr

    # System fonts only: the default theme's web fonts would make every browser fetch them from outside.
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
        font_mono=["ui-monospace", "Consolas", "monospace"],
    )


def markdown_text(value: Any) -> str:
    """`value` as Markdown that shows it literally on one line: the page renders Markdown, and a gallery's captions,
    labels and file names are anyone's text (an image link in a caption would make every viewer's browser fetch
    it, a newline would start a new table row)."""
    return _MARKDOWN_MARKUP.sub(r"\\\1", " ".join(str(value).split()))


def error_markdown(message: str) -> str:
    return f"**Could not do that:** {markdown_text(message)}"


def _report(error: Exception) -> str:
    """The message a person sees in the page for a failed request."""
    if isinstance(error, AppInputError):
        message = str(error)
    else:
        logger.error("request failed", exc_info=error)
        message = f"something went wrong on the server ({type(error).__name__}: {error})."
    return error_markdown(message)


def page_header(demo: RetrievalDemo, title: str) -> str:
    """The header's Markdown: the model, the gallery's counts and how a query is ranked (from the engine's state)."""
    model_name = getattr(demo.retriever.model, "name_or_path", "") or "the model"
    num_images, lines, distinct = len(demo.gallery), demo.num_caption_lines, len(demo.captions)
    captions = f"{lines} captions" + (f" ({distinct} distinct texts, each ranked once)" if distinct != lines else "")
    return (
        f"# {title}\nModel `{model_name}` · gallery of {num_images} photos with {captions} · {demo.ranking_summary()}"
    )


def _results_table(rows: list[tuple], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(markdown_text(cell) for cell in row) + " |")
    return "\n".join(lines)


def search_view(demo: RetrievalDemo, query: str, top_k: float) -> tuple[list, str, Any, str]:
    """Text -> images: the gallery items `(path, caption)`, the results table, the region picture of the top photo
    and the error message (empty on success)."""
    try:
        hits = demo.search_images(query, top_k)
        top = hits[0]
        importance = demo.region_importance(query.strip(), top.record)
        # The photo as the model saw it (EXIF rotation, 16-bit scaling), as in every view.
        photo = demo.load_photo(str(top.image.path))
        picture = render_regions(
            photo, top.record, demo.labels_for(top.record, top.image), importance, text=query.strip()
        )
    except Exception as error:
        return [], "", None, _report(error)
    items = [(str(hit.image.path), f"#{hit.rank}  {hit.score:.3f}") for hit in hits]
    table = _results_table(
        [(hit.rank, f"{hit.score:.3f}", f"{hit.probability:.3f}", Path(hit.image.key).name) for hit in hits],
        ("#", "score", "p(match)", "photo"),
    )
    return items, table, picture, ""


def picker_settings(keys: list[str], info: str | None = None) -> dict[str, Any]:
    """`gr.Dropdown` settings for picking one photo of `keys`: all of them listed, or the first `MAX_PICKER_CHOICES`
    with any other typed by its name (the page says so)."""
    if len(keys) <= MAX_PICKER_CHOICES:
        return {"choices": keys, "info": info}
    listed = f"the first {MAX_PICKER_CHOICES} of {len(keys)} are listed; type another's name"
    return {
        "choices": keys[:MAX_PICKER_CHOICES],
        "allow_custom_value": True,
        "info": f"{info} ({listed})" if info else listed.capitalize(),
    }


def photo_view(demo: RetrievalDemo, upload: str | None, pick: str | None, captions: str, top_k: float):
    """Image -> texts: the captions table, the region picture for the best caption, and the error message. An
    upload is used when there is one, else the picked gallery photo."""
    try:
        if upload:
            photo = demo.load_photo(upload)
            record = demo.photo_regions(photo)
            labels = demo.labels_for(record)
            which = f"the uploaded photo **{markdown_text(Path(upload).name)}**"
        elif pick:
            image, record = demo.gallery_image(pick)
            photo = demo.load_photo(str(image.path))
            labels = demo.labels_for(record, image)
            which = f"the gallery photo **{markdown_text(Path(image.key).name)}**"
        else:
            raise AppInputError("Upload a photo or pick one from the gallery first.")
        hits = demo.rank_captions(record, parse_caption_list(captions), top_k)
        importance = demo.region_importance(hits[0].text, record)
        picture = render_regions(photo, record, labels, importance, text=hits[0].text)
    except Exception as error:
        return "", None, _report(error)
    table = _results_table(
        [(hit.rank, f"{hit.score:.3f}", f"{hit.probability:.3f}", hit.text) for hit in hits],
        ("#", "score", "p(match)", "caption"),
    )
    return f"Captions ranked for {which}:\n\n{table}", picture, ""


def relation_view(view: RelationView, key: str | None, kind_name: str | None) -> tuple[str, Any, Any, str]:
    """Relations: for a gallery photo and a kind of twin ("objects swapped", "colours swapped"), the Markdown with
    both captions' scores per scorer, which one wins, where the objects are and the gallery's rate; the region
    picture for the true caption and for the twin; and the error message (empty on success)."""
    try:
        kinds = {name: kind for kind, name in KIND_NAMES.items()}
        example = view.example(key, kinds.get(kind_name or ""))
        comparison = view.compare(example)
        image, record = view.demo.gallery_image(example.key)
        labels = view.demo.labels_for(record, image)
        photo = view.demo.load_photo(str(image.path))
        pictures = [
            render_regions(photo, record, labels, importance, text=caption)
            for importance, caption in (
                (comparison.true_importance, example.true_caption),
                (comparison.swapped_importance, example.swapped_caption),
            )
        ]
        gallery = view.summary_lines(example.kind)
    except Exception as error:
        return "", None, None, _report(error)
    header = ("", "caption", *(SCORER_NAMES[score.scorer] for score in comparison.scores))
    rows = [
        ("true", example.true_caption, *(f"{score.true_score:.3f}" for score in comparison.scores)),
        ("twin", example.swapped_caption, *(f"{score.swapped_score:.3f}" for score in comparison.scores)),
        ("", "", *(score.verdict() for score in comparison.scores)),
    ]
    lines = [
        f"**{markdown_text(image.path.name)}**, {KIND_NAMES[example.kind]}: {markdown_text(view.where(example))}",
        "",
        _results_table(rows, header),
        "",
        "Below, each caption's region picture: how much its score drops when each region is masked out.",
    ]
    if "dual_encoder" not in view.scorers:
        lines += [
            "",
            "Dual encoder not shown: this checkpoint's projection heads are untrained (a pretraining checkpoint), so "
            "their cosines mean nothing.",
        ]
    lines += ["", f"**On this gallery** ({KIND_NAMES[example.kind]}):", *(f"- {line}" for line in gallery)]
    return "\n".join(lines), pictures[0], pictures[1], ""


def build_app(demo: RetrievalDemo, title: str = "ImageBERT image-text retrieval", top_k: int = 8):
    """The app's `gr.Blocks` over a `RetrievalDemo` (model + prebuilt gallery). Launch it with `launch_app`."""
    # No usage reports or version checks: the app runs offline (set before gradio is first imported).
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    num_images = len(demo.gallery)
    # Gallery captions whose best match is their own photo: the placeholder is a query the app answers.
    examples = demo.example_queries()
    relations = RelationView(demo)
    with gr.Blocks(title=title, analytics_enabled=False) as blocks:
        gr.Markdown(page_header(demo, title), elem_id="page-header")
        with gr.Tab("Text → images", id="text-to-images"):
            with gr.Row():
                query = gr.Textbox(
                    label="Describe a photo",
                    placeholder=examples[0] if examples else GENERIC_PLACEHOLDER,
                    elem_id="query",
                    scale=4,
                )
                # A slider needs two ends: a one-photo gallery still gets 1..2 (a search returns what there is).
                search_k = gr.Slider(
                    1, max(2, min(MAX_RESULTS, num_images)), value=min(top_k, num_images), step=1, label="photos"
                )
                search_button = gr.Button("Search", variant="primary", elem_id="search-button")
            if examples:
                gr.Examples(
                    [[example] for example in examples],
                    inputs=[query],
                    label="Gallery captions whose best match is their own photo (click one, then Search)",
                    elem_id="query-examples",
                )
            search_error = gr.Markdown(elem_id="search-error", elem_classes="error-message")
            results = gr.Gallery(
                label="Best matches, best first",
                columns=8,
                height=150,
                object_fit="contain",
                elem_id="result-gallery",
                allow_preview=False,
            )
            with gr.Row():
                search_table = gr.Markdown(elem_id="search-results")
                search_regions = gr.Image(
                    scale=2,
                    label="Regions of the best match",
                    show_label=False,  # the label would cover the picture's top left corner, where tags are
                    type="pil",
                    elem_id="search-regions",
                    interactive=False,
                )
        with gr.Tab("Image → texts", id="image-to-texts"), gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Upload a photo", type="filepath", elem_id="photo-upload")
                pick = gr.Dropdown(
                    **picker_settings([image.key for image in demo.gallery]),
                    value=None,
                    label="or pick a gallery photo",
                    elem_id="photo-pick",
                )
                captions = gr.Textbox(
                    label="Captions to rank, one per line (empty: the gallery's captions)",
                    lines=4,
                    elem_id="caption-list",
                )
                caption_k = gr.Slider(1, 20, value=5, step=1, label="captions")
                caption_button = gr.Button("Rank captions", variant="primary", elem_id="caption-button")
            with gr.Column(scale=2):
                photo_error = gr.Markdown(elem_id="photo-error", elem_classes="error-message")
                caption_table = gr.Markdown(elem_id="caption-results")
                photo_regions = gr.Image(
                    label="Regions, and which ones mattered for the best caption",
                    show_label=False,
                    type="pil",
                    elem_id="photo-regions",
                    interactive=False,
                )
        if relations.examples:
            with gr.Tab("Relations", id="relations", elem_id="relations-tab"):
                # The outputs are made first (unrendered) so that the examples can sit beside the controls.
                relation_error = gr.Markdown(elem_id="relation-error", elem_classes="error-message", render=False)
                relation_table = gr.Markdown(elem_id="relation-results", render=False)
                relation_pictures = [
                    gr.Image(
                        label=label,
                        show_label=False,  # the label would cover the picture's top left corner, where tags are
                        type="pil",
                        elem_id=elem_id,
                        interactive=False,
                        render=False,
                    )
                    for label, elem_id in (
                        ("Regions for the true caption", "relation-true-regions"),
                        ("Regions for the twin", "relation-twin-regions"),
                    )
                ]
                with gr.Row():
                    with gr.Column(scale=2):
                        gr.Markdown(
                            "A photo's true caption against its **twin**: the same words with the two objects (or "
                            "their colours) exchanged. Only a model that ties words to regions and their places can "
                            "tell them apart.",
                            elem_id="relation-intro",
                        )
                        relation_pick = gr.Dropdown(
                            **picker_settings(
                                relations.photos(), "gallery photos with two labelled objects in a clear relation"
                            ),
                            value=None,
                            label="photo",
                            elem_id="relation-pick",
                        )
                        relation_kind = gr.Radio(
                            list(KIND_NAMES.values()),
                            value=KIND_NAMES["object_swap"],
                            label="twin",
                            elem_id="relation-kind",
                        )
                        relation_button = gr.Button("Compare", variant="primary", elem_id="relation-button")
                        relation_inputs = [relation_pick, relation_kind]
                        relation_outputs = [relation_table, *relation_pictures, relation_error]
                        gr.Examples(
                            [[example.key, KIND_NAMES[example.kind]] for example in relations.examples[:3]],
                            inputs=relation_inputs,
                            outputs=relation_outputs,
                            fn=lambda p, k: relation_view(relations, p, k),
                            run_on_click=True,
                            cache_examples=False,
                            label="Examples: the gallery's first photos with a relation (click one)",
                            elem_id="relation-examples",
                        )
                    with gr.Column(scale=3):
                        relation_error.render()
                        relation_table.render()
                with gr.Row():
                    for picture in relation_pictures:
                        picture.render()
                for event in (relation_button.click, relation_pick.input, relation_kind.input):
                    event(lambda p, k: relation_view(relations, p, k), relation_inputs, relation_outputs)

        search_outputs = [results, search_table, search_regions, search_error]
        search_inputs = [query, search_k]
        search_button.click(lambda q, k: search_view(demo, q, k), search_inputs, search_outputs)
        query.submit(lambda q, k: search_view(demo, q, k), search_inputs, search_outputs)

        photo_outputs = [caption_table, photo_regions, photo_error]
        caption_button.click(
            lambda f, p, c, k: photo_view(demo, f, p, c, k), [upload, pick, captions, caption_k], photo_outputs
        )
        # One photo at a time: an upload clears the gallery pick, and a pick clears the upload, so the page never
        # shows one photo while ranking another (the caption table also names the photo it ranked).
        upload.upload(
            lambda f, c, k: (*photo_view(demo, f, None, c, k), None),
            [upload, captions, caption_k],
            [*photo_outputs, pick],
        )
        pick.input(
            lambda p, c, k: (*photo_view(demo, None, p, c, k), None),
            [pick, captions, caption_k],
            [*photo_outputs, upload],
        )
    # The photos a search returns, which `launch_app` lets gradio serve from wherever the gallery lies.
    blocks.gallery_files = sorted({str(image.path.resolve()) for image in demo.gallery})
    # Gradio refuses a larger upload itself, before it is stored: the extractor would refuse it after.
    blocks.max_upload_bytes = int(demo.extractor.max_file_bytes)
    return blocks


def _raise(error: OSError):
    raise error


def _holds_only(folder: Path, photos: set[Path]) -> bool:
    """Whether every file gradio would serve from `folder` named in `allowed_paths` (any file below it, in any
    subfolder, whose real path lies there) is one of `photos` (real paths). A link is passed over: gradio serves
    what it points to only where that lies in the folder too, where the walk meets it. A subfolder that cannot be
    listed may still hold files gradio could serve, so it answers no."""
    try:
        for parent, _, names in os.walk(folder, onerror=_raise):
            for name in names:
                path = Path(parent, name)
                if path not in photos and not path.is_symlink():
                    return False
    except OSError:
        return False
    return True


def _gallery_allowed_paths(gallery_files) -> list[str]:
    """The fewest `allowed_paths` entries that let gradio serve the gallery's photos: gradio checks each file it
    serves or returns against every entry in turn, resolving both, so naming thousands of photos would cost seconds
    a file and hold up every user. Photos under the working folder or the temp folder need none; a folder whose every
    file is a gallery photo is named once; other photos are named one by one, so nothing else of their folder is
    served."""
    served = [Path(os.getcwd()).resolve(), Path(tempfile.gettempdir()).resolve()]
    photos = {Path(file).resolve() for file in gallery_files}
    by_folder: dict[Path, list[Path]] = {}
    for photo in photos:
        if any(photo.is_relative_to(folder) for folder in served):
            continue
        by_folder.setdefault(photo.parent, []).append(photo)
    allowed, whole = [], []
    # Sorted, a folder comes before its subfolders, which a folder named whole already covers.
    for folder in sorted(by_folder):
        if any(folder.is_relative_to(named) for named in whole):
            continue
        if _holds_only(folder, photos):
            whole.append(folder)
            allowed.append(str(folder))
        else:
            allowed.extend(sorted(str(photo) for photo in by_folder[folder]))
    return allowed


def launch_app(blocks, server_name: str | None = "127.0.0.1", server_port: int | None = None, **kwargs):
    """`blocks.launch` with the app's theme and styles, no share link, and the extractor's file size limit. Pass
    `server_name=None` where the host sets `GRADIO_SERVER_NAME` (a Space).

    Gradio serves only files under the working folder or the temp folder, unless `allowed_paths` names them: the
    gallery's photos elsewhere (`build_app` records them) are added, a folder by its name where its every file is a
    gallery photo and the others one by one, so a gallery may lie anywhere and nothing else of its folder is
    served. `allowed_paths` given here, or in `GRADIO_ALLOWED_PATHS` (which an explicit list would otherwise
    replace), are kept.
    """
    kwargs.setdefault("max_file_size", getattr(blocks, "max_upload_bytes", DEFAULT_MAX_FILE_BYTES))
    given = kwargs.pop("allowed_paths", None)
    if given is None:
        given = [item.strip() for item in os.environ.get("GRADIO_ALLOWED_PATHS", "").split(",") if item.strip()]
    allowed = [*given, *_gallery_allowed_paths(getattr(blocks, "gallery_files", ()))]
    return blocks.launch(
        server_name=server_name,
        server_port=server_port,
        share=False,
        theme=_theme(),
        css=CSS,
        allowed_paths=allowed or None,
        **kwargs,
    )


__all__ = [
    "MAX_PICKER_CHOICES",
    "build_app",
    "launch_app",
    "page_header",
    "photo_view",
    "picker_settings",
    "relation_view",
    "search_view",
]
