"""Sharing a retrieval model on the Hub: a folder that loads with `trust_remote_code=True`, and its model card.

`save_for_hub` writes what is uploaded: the model (safetensors, config with `auto_map`, modeling code), the processor
(tokenizer, region extractor config and backbone weights, processing and region extraction code), the `image-text-retrieval` pipeline code with its
`custom_pipelines` entry, and `README.md`, the model card. `push_to_hub` uploads that folder in one commit. The card
is built with `huggingface_hub.ModelCard` from its standard template (or another one), and its `model-index` holds
the recall@K of an evaluation run (the `results.json` that `examples/evaluate_retrieval.py` writes, read with
`load_results`).
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..formats.files import atomic_write_json, atomic_write_text, publish_folder_keeping_others, read_json_file
from ..models.imagebert.image_processing_imagebert import WEIGHTS_NAME
from ..models.imagebert.pipeline_image_text_retrieval import (
    ImageTextRetrievalPipeline,
    register_pipeline,
    untrained_heads,
)
from .recall import format_metrics_table


logger = logging.get_logger(__name__)


BASE_MODEL = "google-bert/bert-base-uncased"
DEFAULT_TAGS = ("imagebert", "image-text-retrieval", "vision-language", "multimodal", "cross-encoder", "custom_code")
METRIC_NAMES = {
    "tr_r1": "Text retrieval R@1",
    "tr_r5": "Text retrieval R@5",
    "tr_r10": "Text retrieval R@10",
    "ir_r1": "Image retrieval R@1",
    "ir_r5": "Image retrieval R@5",
    "ir_r10": "Image retrieval R@10",
    "rsum": "RSUM",
}
PAPER_BIBTEX = """@article{qi2020imagebert,
  title={ImageBERT: Cross-modal Pre-training with Large-scale Weak-supervised Image-Text Data},
  author={Qi, Di and Su, Lin and Song, Jia and Cui, Edward and Bharti, Taroon and Sacheti, Arun},
  journal={arXiv preprint arXiv:2001.07966},
  year={2020}
}"""


def load_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads the results json written by `examples/evaluate_retrieval.py` (`{"results": [...]}` or a list); a file
    that is not JSON or not of that form raises `ValueError` naming it (`build_model_card` checks the entries)."""
    expected = 'the results.json of examples/evaluate_retrieval.py ({"results": [...]} or a list of results)'
    data = read_json_file(path, expected)
    entries = data.get("results") if isinstance(data, Mapping) else data
    if not isinstance(entries, list):
        raise ValueError(f"{path} holds no list of results; expected {expected}.")
    return entries


def eval_results_from_run(results: Sequence[Mapping[str, Any]]):
    """`huggingface_hub.EvalResult`s (the card's `model-index`) from evaluation results.

    Args:
        results: one entry per evaluated split: `{"dataset_name": "MS-COCO 5k", "dataset_type": "coco",
            "dataset_split": "test", "metrics": {"tr_r1": ..., ..., "rsum": ...}}` (percent), optionally with
            `dataset_config` (e.g. `"1k"`) and `source_name`.
    """
    from huggingface_hub import EvalResult

    eval_results = []
    if isinstance(results, (str, bytes, Mapping)) or not isinstance(results, Sequence):
        raise TypeError(f"results must be a list of evaluation results (dicts), got {type(results).__name__}.")
    for number, result in enumerate(results):
        _check_result(number, result)
        for key, name in METRIC_NAMES.items():
            if key not in result["metrics"]:
                continue
            eval_results.append(
                EvalResult(
                    task_type="image-text-retrieval",
                    task_name="Image-Text Retrieval",
                    dataset_type=result["dataset_type"],
                    dataset_name=result["dataset_name"],
                    dataset_config=result.get("dataset_config"),
                    dataset_split=result.get("dataset_split"),
                    metric_type="recall" if key != "rsum" else "rsum",
                    metric_name=name + (f" ({ZERO_SHOT})" if result.get("evaluation") == ZERO_SHOT else ""),
                    metric_value=round(float(result["metrics"][key]), 2),
                    source_name=result.get("source_name"),
                )
            )
    return eval_results


def _check_result(number: int, result) -> None:
    """Refuses an evaluation result the card would misreport: missing fields, names that are not strings, metrics
    that are not finite numbers, recalls outside [0, 100] and RSUM outside [0, 600]."""
    if not isinstance(result, Mapping):
        raise TypeError(f"evaluation result {number} must be a dict, got {type(result).__name__}: {result!r}.")
    for key in ("dataset_name", "dataset_type", "metrics"):
        if key not in result:
            raise ValueError(f"evaluation result {number} has no {key!r}; got keys {sorted(result)}.")
    for key in ("dataset_name", "dataset_type", "dataset_config", "dataset_split", "source_name", "ranking"):
        value = result.get(key)
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise ValueError(f"evaluation result {number}: {key} must be a non-empty string, got {value!r}.")
        if value is not None and has_control_characters(value):
            raise ValueError(
                f"evaluation result {number}: {key} holds a line break or another control character ({value!r}): "
                "names go on one line of the card."
            )
    metrics = result["metrics"]
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError(
            f"evaluation result {number}: metrics must be a non-empty dict of {sorted(METRIC_NAMES)}, got {metrics!r}."
        )
    unknown = set(metrics) - set(METRIC_NAMES)
    if unknown:
        raise ValueError(f"evaluation result {number} has unknown metrics {sorted(unknown)}.")
    for key, value in metrics.items():
        top = 600.0 if key == "rsum" else 100.0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"evaluation result {number}: metric {key} must be a finite number, got {value!r}.")
        if not 0.0 <= value <= top:
            raise ValueError(
                f"evaluation result {number}: metric {key} is {value}, outside [0, {top:g}] (recalls are percent)."
            )
    for direction in ("tr", "ir"):
        keys = [key for key in (f"{direction}_r1", f"{direction}_r5", f"{direction}_r10") if key in metrics]
        for low, high in zip(keys, keys[1:]):
            if metrics[low] > metrics[high]:
                raise ValueError(
                    f"evaluation result {number}: {low} {metrics[low]} is above {high} {metrics[high]}; recall@K "
                    "cannot fall as K grows."
                )
    parts = [metrics.get(f"{direction}_r{k}") for direction in ("tr", "ir") for k in (1, 5, 10)]
    if "rsum" in metrics and None not in parts and abs(sum(parts) - metrics["rsum"]) > RSUM_TOLERANCE:
        raise ValueError(
            f"evaluation result {number}: rsum {metrics['rsum']} is not the sum of the six recalls ({sum(parts):.2f})."
        )


# Recalls are often stored rounded to two decimals, each on its own: their sum may then differ from the rounded RSUM.
RSUM_TOLERANCE = 0.1


def has_control_characters(text: str) -> bool:
    return any(ord(character) < 32 or ord(character) == 127 for character in text)


def _markdown_text(text: str) -> str:
    """`text` as it should read in the card's markdown: no HTML, and a `|` that does not end a table cell."""
    return html.escape(text, quote=False).replace("|", r"\|")


def is_one_line_name(value) -> bool:
    """A non-empty string on one line: what a card's names (model, base model, license, datasets) must be."""
    return isinstance(value, str) and bool(value.strip()) and not has_control_characters(value)


def _check_names(name: str, values) -> list[str] | None:
    """A list of non-empty strings (a single string is one name, never split into letters), or None."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty string or list of strings, got {values!r}.")
    for value in values:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must hold non-empty strings, got {value!r} in {list(values)!r}.")
    return list(values)


def full_ranking_results(results: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The entries a card reports: full-ranking recall, one per dataset, configuration and split. Entries of another
    `ranking` (shortlist + re-rank, as `examples/evaluate_retrieval.py --shortlist_k` adds them) are left out: the
    card's metrics are defined over the full ranking. Two full-ranking entries for one row raise `ValueError`, rather
    than one silently replacing the other in the table."""
    kept, seen = [], {}
    for number, result in enumerate(results):
        if isinstance(result, Mapping) and "ranking" in result:
            if not isinstance(result["ranking"], str):
                raise ValueError(
                    f"evaluation result {number}: ranking must be a non-empty string ('full', or 'shortlist k=K'), "
                    f"got {result['ranking']!r}."
                )
            _check_result(number, result)
            if result["ranking"] != "full":
                continue
        if isinstance(result, Mapping):
            row = _row_name(result)
            if row in seen:
                raise ValueError(
                    f"evaluation results {seen[row]} and {number} both report {row!r}; give them distinct "
                    "dataset_name, dataset_config or dataset_split."
                )
            seen[row] = number
        kept.append(result)
    if results and not kept:
        rankings = sorted({str(result.get("ranking")) for result in results if isinstance(result, Mapping)})
        raise ValueError(
            f"none of the {len(results)} evaluation results is of full ranking (their rankings: {rankings}); the "
            "card's metrics are defined over the full ranking."
        )
    return kept


def _row_name(result: Mapping[str, Any]) -> str:
    details = [str(result[key]) for key in ("dataset_config", "dataset_split") if result.get(key)]
    if result.get("evaluation") == ZERO_SHOT:
        details.append(ZERO_SHOT)
    return str(result.get("dataset_name")) + (f" ({', '.join(details)})" if details else "")


def _results_table(results: Sequence[Mapping[str, Any]]) -> str:
    return format_metrics_table({_markdown_text(_row_name(result)): result["metrics"] for result in results})


# What a result's `evaluation` says of a pretraining checkpoint ranked with its ITM head, not fine-tuned for retrieval.
ZERO_SHOT = "zero-shot"


def build_model_card(
    results: Sequence[Mapping[str, Any]] | None = None,
    model_id: str = "imagebert-base",
    config=None,
    datasets: Sequence[str] | None = None,
    base_model: str | None = None,
    license: str | None = None,
    tags: Sequence[str] = DEFAULT_TAGS,
    template_path: str | os.PathLike | None = None,
    shortlist_heads_trained: bool = True,
    **fields: str,
):
    """A model card: YAML metadata (license, library, tags, datasets, base model, `model-index` from `results`) and
    the sections of huggingface_hub's model card template, filled for ImageBERT retrieval.

    Args:
        results: evaluation results (see `eval_results_from_run`); they fill `model-index` and the results table.
        model_id: the card's title and `model-index` name.
        config: the model's `ImageBERTConfig`, to state its size in the card.
        datasets: Hub dataset ids the model was trained or evaluated on.
        base_model: the Hub id of the checkpoint the model started from (e.g. `BASE_MODEL` for a run from
            bert-base-uncased); left out when None, as a card must not claim a lineage nobody gave it.
        license: the card's license id (e.g. "apache-2.0"); left out when None: the weights' terms depend on the
            data they were trained on, which only the publisher knows.
        tags: Hub tags (the task has no Hub id, so it goes in the tags rather than `pipeline_tag`).
        template_path: a Jinja template; huggingface_hub's standard model card template by default.
        shortlist_heads_trained: whether the model's unimodal projection heads were trained (`untrained_heads` of
            the model is empty): a fine-tuned model without them shortlists nothing, and its card says so.
        **fields: any template section to set or override (e.g. `training_data="..."`).

    Returns:
        `huggingface_hub.ModelCard`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    if results is not None and not isinstance(results, (str, bytes, Mapping)) and isinstance(results, Sequence):
        results = full_ranking_results(results)
    eval_results = eval_results_from_run([] if results is None else results) or None
    results = list(results or [])
    for name, value in (("model_id", model_id), ("base_model", base_model), ("license", license)):
        if (value is not None or name == "model_id") and not is_one_line_name(value):
            raise ValueError(f"{name} must be a non-empty name on one line, got {value!r}.")
    zero_shot = bool(results) and all(result.get("evaluation") == ZERO_SHOT for result in results)
    datasets = _check_names("datasets", datasets)
    tags = _check_names("tags", tags) or []
    card_data = ModelCardData(
        model_name=model_id,
        license=license,
        library_name="transformers",
        tags=list(tags),
        datasets=datasets,
        metrics=["recall"],
        base_model=base_model,
        eval_results=eval_results,
    )
    size = ""
    location = "" if config is None else f"{config.region_location_size}-d "
    if config is not None:
        size = (
            f" This checkpoint has {config.num_hidden_layers} layers of width {config.hidden_size}, "
            f"{config.num_attention_heads} heads, up to {config.max_regions} regions of {config.region_feature_size}-d "
            f"features and {config.max_text_length} text tokens"
            + ("." if zero_shot else f"; retrieval losses {config.retrieval_loss_weights}.")
        )
    heads = (
        "Two small projection heads over text-only and regions-only passes give unimodal embeddings, used to "
        "shortlist candidates before the cross-encoder re-ranks them."
    )
    if zero_shot:
        heads = (
            "This is a pretraining checkpoint, evaluated zero-shot: its image-text matching head scores the pairs. "
            "It was not fine-tuned for retrieval, and its projection heads for shortlisting are untrained."
        )
    elif not shortlist_heads_trained:
        heads = (
            "Its projection heads for shortlisting were not trained (it was fine-tuned without the contrastive "
            "loss): the cross-encoder scores every candidate."
        )
    defaults = {
        "model_id": _markdown_text(model_id),
        "model_summary": "ImageBERT cross-encoder for image-text retrieval: one BERT over WordPiece tokens and "
        "object regions, scoring how well a caption matches an image.",
        "model_description": "ImageBERT (Qi et al. 2020) feeds `[CLS] text [SEP]` followed by the image's regions "
        f"(a visual feature and a {location}location each) through one transformer; a head on `[CLS]` gives the relevance "
        f"score of the pair. {heads}" + size,
        "model_type": "Single-stream vision-language transformer (cross-encoder)",
        "language": "en",
        "license": license,
        "base_model": base_model,
        "repo": "imagebert_hf",
        "paper": "https://arxiv.org/abs/2001.07966",
        "direct_use": "Ranking captions for an image (text retrieval) or images for a caption (image retrieval), "
        'or scoring given pairs, with `pipeline("image-text-retrieval", model=..., trust_remote_code=True)`.',
        "downstream_use": "Re-ranking the candidates of a fast first-stage retriever.",
        "out_of_scope_use": "Decisions about people; captioning or any generation (the model only scores pairs).",
        "bias_risks_limitations": "Scores reflect the training pairs: web captions carry their sources' biases, "
        "and region features come from a detector trained on a fixed label set.",
        "bias_recommendations": "Evaluate on data from the target domain before relying on the rankings.",
        "get_started_code": "```python\nfrom transformers import pipeline\n\nretriever = pipeline("
        f'"image-text-retrieval", model={json.dumps(model_id)}, trust_remote_code=True)\n'
        'retriever(images="photo.jpg", texts=["a dog on a beach", "a bowl of soup"], top_k=1)\n```',
        "training_regime": "AdamW; the precision and the other settings are the training script's arguments, stored "
        "with the run.",
        "testing_metrics": "Recall@K (K = 1, 5, 10) for text retrieval (image queries; a hit when any of the "
        "image's captions is in the top K) and image retrieval (caption queries), and RSUM, their sum. Ties count "
        "against the query.",
        "results": _results_table(results) if results else "No evaluation run was attached to this card.",
        "citation_bibtex": f"```bibtex\n{PAPER_BIBTEX}\n```",
    }
    defaults.update(fields)
    if template_path is None:
        return ModelCard.from_template(card_data, **defaults)
    return ModelCard.from_template(card_data, template_path=str(template_path), **defaults)


def save_model_card(card, output_dir: str | os.PathLike) -> Path:
    """Writes `card` as `output_dir/README.md` atomically (a reader never sees half a card) and returns the path."""
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, str(card))
    return path


def _check_card(card) -> None:
    if card is not None and not hasattr(card, "content") and not isinstance(card, str):
        raise TypeError(f"card must be a huggingface_hub.ModelCard (see build_model_card), got {type(card).__name__}.")


def save_for_hub(model, processor, output_dir: str | os.PathLike, card=None) -> list[str]:
    """Writes the folder `push_to_hub` uploads and returns its files (relative paths, sorted).

    The model, processor and region extractor are saved with their code (`register_for_auto_class`) and the
    retrieval pipeline's `custom_pipelines` entry, so `pipeline(model=repo, trust_remote_code=True)` needs no
    installed package, raw images included.

    The inputs are checked first, then everything is written to a hidden sibling of `output_dir`, which replaces it
    in one rename (other files already in `output_dir` are kept, see `publish_folder_keeping_others`): a save that
    fails or is killed leaves the earlier folder as it was. Without `card`, a `README.md` already there is kept, with
    a warning (it may be the card of an earlier model). The region extractor's weights travel in the folder
    (`roi_extractor.safetensors`), so its config names that file rather than the local path they were read from.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"save_for_hub: output_dir {str(output_dir)!r} is an existing file, expected a folder.")
    if not hasattr(model, "save_pretrained") or getattr(model, "config", None) is None:
        raise TypeError(f"save_for_hub: model must be an ImageBERT model, got {type(model).__name__}.")
    if not hasattr(processor, "save_pretrained") or not hasattr(processor, "image_processor"):
        raise TypeError(f"save_for_hub: processor must be an ImageBERTProcessor, got {type(processor).__name__}.")
    _check_card(card)
    register_pipeline()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        pipe = ImageTextRetrievalPipeline(model=model, processor=processor, task="image-text-retrieval", device=-1)
        pipe.save_pretrained(tmp)
        _name_weights_in_folder(tmp)
        if card is not None:
            save_model_card(card, tmp)
        elif (output_dir / "README.md").is_file():
            logger.warning(
                "save_for_hub: %s is kept as it is, and would be uploaded as this model's card: it may describe an "
                "earlier model. Pass card= (build_model_card) to replace it, or delete it.",
                output_dir / "README.md",
            )
        written = set(os.listdir(tmp))
        publish_folder_keeping_others(tmp, output_dir, owned=lambda name: name in written)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(str(path.relative_to(output_dir)) for path in output_dir.rglob("*") if path.is_file())


def _name_weights_in_folder(folder: Path) -> None:
    """Where the extractor's weights were saved into `folder`, its saved configs name that file instead of a local
    weights path (an absolute path would publish the machine's folders; the folder's own weights file is what a load
    reads in any case)."""
    if not (folder / WEIGHTS_NAME).is_file():
        return
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        saved = read_json_file(path, "a saved processor config")
        settings = saved.get("image_processor") if isinstance(saved.get("image_processor"), dict) else saved
        changed = False
        for key in ("backbone_weights", "detector_weights"):
            value = settings.get(key)
            if isinstance(value, str) and (os.path.isabs(value) or os.path.exists(value)):
                settings[key], changed = WEIGHTS_NAME, True
        if changed:
            atomic_write_json(path, saved, indent=2, sort_keys=True)


def _check_repo_id(repo_id, name: str = "repo_id") -> None:
    """Refuses a repository id the Hub would refuse, as huggingface_hub checks it locally (no request is made)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"{name} must be a non-empty Hub id such as 'user/name', got {repo_id!r}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        reason = " ".join(str(error).split())
        raise ValueError(f"{name} must be a Hub id such as 'user/name', got {repo_id!r}: {reason}") from None


# The variables that put huggingface_hub in offline mode, and the values it reads as set.
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


def _offline_variable() -> str | None:
    """The variable that makes an upload fail offline, or None."""
    from huggingface_hub import constants

    for name in _OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().upper() in _TRUE_VALUES:
            return name
    # huggingface_hub reads the variables once, at import: a process that unset them since is still offline.
    return "HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else None


def check_push_to_hub(hub_model_id: str | None, processor=None, needs_processor: bool = False) -> None:
    """Refuses a `--push_to_hub` that could only fail once training is over, so a run asked to publish checks
    before it trains: the repository id, offline mode, a token, and (`needs_processor`, for `push_to_hub`, whose
    folder serves raw images) a processor with its region extractor. Makes no request to the Hub.

    Raises:
        ValueError: naming the flag or the setting that stops the upload.
    """
    from huggingface_hub import get_token

    if hub_model_id is None:
        raise ValueError("--push_to_hub needs --hub_model_id (the Hub repository, such as 'user/name'), got none.")
    _check_repo_id(hub_model_id, "--hub_model_id")
    offline = _offline_variable()
    if offline is not None:
        raise ValueError(
            f"--push_to_hub cannot upload to {hub_model_id!r}: {offline} is set (offline mode); unset it or drop "
            "--push_to_hub."
        )
    if get_token() is None:
        raise ValueError(
            f"--push_to_hub needs a Hugging Face token to upload to {hub_model_id!r}, and none was found; set HF_TOKEN "
            "or run `hf auth login`, or drop --push_to_hub."
        )
    if needs_processor and getattr(processor, "image_processor", None) is None:
        raise ValueError(
            "--push_to_hub publishes the model with its processor (the pipeline reads raw images through it), and "
            "this run has none: give --model_name_or_path a checkpoint saved with its ImageBERTProcessor "
            "(--synthetic_images and checkpoints with a tokenizer only have none)."
        )


def upload_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    commit_message: str,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    api=None,
):
    """Uploads `folder` to the model repository `repo_id` (created when missing) in one commit: the one place the
    package talks to the Hub (retrieval `push_to_hub` and each pretraining stage go through it).

    Args:
        folder: A local folder, uploaded as it is.
        repo_id: `user/name` on the Hub.
        commit_message, private, token, revision: as in `huggingface_hub.HfApi`.
        api: an `HfApi`-like object (`create_repo`, `upload_folder`); a new `HfApi(token=token)` by default.

    Returns:
        What `api.upload_folder` returns (a `CommitInfo` from the real Hub).
    """
    _check_repo_id(repo_id)
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"upload_to_hub: folder {str(folder)!r} is not a folder.")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        commit_message=commit_message,
    )


def push_to_hub(
    model,
    processor,
    repo_id: str,
    card=None,
    results: Sequence[Mapping[str, Any]] | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload ImageBERT image-text retrieval model",
    api=None,
    base_model: str | None = None,
):
    """Pushes model, processor, pipeline code and model card to `repo_id` in one commit (`upload_to_hub`).

    Args:
        model: an `ImageBERTForImageTextRetrieval`.
        processor: its `ImageBERTProcessor`.
        repo_id: `user/name` on the Hub (created when missing).
        card: a `ModelCard`; built with `build_model_card(results, model_id=repo_id, config=model.config)` if None.
        results: evaluation results for the card's `model-index` (ignored when `card` is given).
        private, token, revision, commit_message, api: as in `upload_to_hub`, which this returns from.
        base_model: the Hub id the model started from, for the built card (see `build_model_card`).
    """
    _check_repo_id(repo_id)
    if card is None:
        card = build_model_card(
            results,
            model_id=repo_id,
            config=getattr(model, "config", None),
            base_model=base_model,
            shortlist_heads_trained=not untrained_heads(model),
        )
    with tempfile.TemporaryDirectory() as folder:
        save_for_hub(model, processor, Path(folder) / "upload", card)
        return upload_to_hub(
            Path(folder) / "upload",
            repo_id,
            commit_message,
            private=private,
            token=token,
            revision=revision,
            api=api,
        )


__all__ = [
    "BASE_MODEL",
    "DEFAULT_TAGS",
    "ZERO_SHOT",
    "build_model_card",
    "has_control_characters",
    "is_one_line_name",
    "check_push_to_hub",
    "eval_results_from_run",
    "full_ranking_results",
    "load_results",
    "push_to_hub",
    "save_for_hub",
    "save_model_card",
    "upload_to_hub",
]
