"""Converts a UNITER checkpoint (Chen et al. 2020, `ChenRocks/UNITER`) into ImageBERT classes.

UNITER is a single-stream BERT over WordPiece tokens and bottom-up-attention regions, like ImageBERT. Its published
`uniter-base.pt` / `uniter-large.pt` (pretrained with MLM, MRFR, MRC-kl and ITM) and the checkpoints fine-tuned from
them with UNITER's retrieval code (`UniterForImageTextRetrieval`, with a `rank_output` score) become an
`ImageBERTForPreTraining` or an `ImageBERTForImageTextRetrieval` computing the same function, through the UNITER
layout of `ImageBERTConfig`:

- `region_location_size=7`: UNITER's box position `(x1/W, y1/H, x2/W, y2/H, w/W, h/H, w*h/(W*H))`;
- `region_projection_layer_norm=True`: `img_layer_norm` after the feature projection, `pos_layer_norm` after the
  position projection;
- `separate_region_layer_norm=True`: the image embeddings' own `LayerNorm`;
- `region_position_embedding=False`: regions get the segment embedding 1 and no position.

Heads: UNITER's MLM head (`cls.predictions`) is ours; `itm_output` is our ITM classifier (`cls.seq_relationship`);
`region_classifier` (1601 classes, background first) is our MOC head without the background row; `feat_regress`
(which reuses the transposed `img_linear` weight) is our MRFR head with that weight copied. A fine-tuned
`rank_output` becomes the retrieval classifier with a zero "not matched" row, so the retrieval score (matched logit
minus not-matched logit) is UNITER's rank score exactly.

Not carried over: `uniter.img_embeddings.mask_embedding` (the vector UNITER adds to masked regions during
pretraining; ImageBERT zeroes masked features instead), and, in a fine-tuned checkpoint, `itm_output` (superseded
by `rank_output`). The retrieval model's unimodal projections (`cls.text_projection`, `cls.region_projection`,
used to shortlist) have no UNITER counterpart and keep their initialisation.

    imagebert-convert-uniter --checkpoint uniter-base.pt --output uniter-base-imagebert \\
        [--task pretraining|retrieval] [--uniter_config uniter-base.json] \\
        [--tokenizer bert-base-cased --detector_weights unc-nlp/frcnn-vg-finetuned]
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers.utils import logging

from .folder_publishing import publish_folder
from .script_errors import exit_on_error


# torch and the model load inside the functions that use them, so `imagebert-convert-uniter --help` stays fast.
if TYPE_CHECKING:
    import torch

    from .modeling_imagebert import ImageBERTForImageTextRetrieval, ImageBERTForPreTraining


logger = logging.get_logger(__name__)

TASKS = ("pretraining", "retrieval")
# UNITER prefix -> ImageBERT prefix; the rest of the key is unchanged.
PREFIXES = {
    "uniter.embeddings.": "bert.embeddings.",
    "uniter.encoder.": "bert.encoder.",
    "uniter.pooler.": "bert.pooler.",
    "uniter.img_embeddings.img_linear.": "bert.embeddings.region_feature_projection.",
    "uniter.img_embeddings.img_layer_norm.": "bert.embeddings.region_feature_layer_norm.",
    "uniter.img_embeddings.pos_linear.": "bert.embeddings.region_location_projection.",
    "uniter.img_embeddings.pos_layer_norm.": "bert.embeddings.region_location_layer_norm.",
    "uniter.img_embeddings.LayerNorm.": "bert.embeddings.region_layer_norm.",
}
PRETRAINING_PREFIXES = {
    "cls.predictions.transform.": "cls.predictions.transform.",
    "itm_output.": "cls.seq_relationship.",
    "region_classifier.net.0.": "cls.object_predictions.transform.dense.",
    "region_classifier.net.2.": "cls.object_predictions.transform.LayerNorm.",
    "feat_regress.net.0.": "cls.feature_regression.transform.dense.",
    "feat_regress.net.2.": "cls.feature_regression.transform.LayerNorm.",
}
# Keys that UNITER's modules hold but ImageBERT computes otherwise (see the module docstring).
DROPPED = ("uniter.img_embeddings.mask_embedding.weight",)
# UNITER's tied copies: the MLM decoder is the word embedding, feat_regress.weight is img_linear.weight.
TIED = ("cls.predictions.decoder.weight", "feat_regress.weight")
# Keys converted one by one in `convert_uniter_state_dict` (a retrieval model keeps one pair scorer and drops the
# pretraining heads).
CONVERTED_BELOW = {
    "pretraining": ("cls.predictions.bias", "region_classifier.net.3.", "feat_regress.bias"),
    "retrieval": ("rank_output.", "itm_output.", "cls.predictions.", "region_classifier.", "feat_regress."),
}
# UNITER's `max_txt_len` and the bottom-up-attention region count.
UNITER_MAX_TEXT_LENGTH = 60
UNITER_MAX_REGIONS = 100
# How `check_destination` names the arguments in the command's messages.
FLAG_NAMES = ("--output", "--tokenizer", "--detector_weights")


def _rename_layer_norm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old BERT checkpoints name LayerNorm parameters gamma/beta (UNITER's loader renames them too)."""
    renamed = {}
    for key, value in state_dict.items():
        key = re.sub(r"\.gamma$", ".weight", key)
        renamed[re.sub(r"\.beta$", ".bias", key)] = value
    return renamed


NESTING_KEYS = ("model", "state_dict", "module", "model_state_dict", "net")
BERT_MARKERS = ("bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight")


def read_uniter_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a UNITER checkpoint file without unpickling code (`.pt` with `weights_only=True`, or `.safetensors`).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable checkpoint (a text file, a truncated download, a pickle holding
            code); the message names the file.
    """
    from .roi_backends import load_state_dict_file

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"checkpoint {path} is a folder; expected a file, UNITER's .pt (e.g. uniter-base.pt) or a .safetensors."
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected UNITER's .pt, e.g. uniter-base.pt).")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): an interrupted download? Fetch it again.")
    try:
        state_dict = load_state_dict_file(path)
    except Exception as error:  # torch / pickle / safetensors / zip errors of a file that is not a state dict
        said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"checkpoint {path} ({path.stat().st_size} bytes) cannot be read as a PyTorch or safetensors state dict "
            f"({type(error).__name__}: {said[:300]}). Is it a truncated download, a text file, or a pickle holding "
            "code (never loaded)?"
        ) from error
    return prepare_uniter_state_dict(state_dict, str(path))


def prepare_uniter_state_dict(state_dict, source: str = "the state dict") -> dict[str, torch.Tensor]:
    """A UNITER state dict ready to convert: weights nested under a key (`model`, `state_dict`, ...) unwrapped,
    DataParallel's `module.` prefix stripped, LayerNorm `gamma`/`beta` renamed; a plain BERT checkpoint, or anything
    else without UNITER's keys, refused with what it holds."""
    import torch

    for _ in range(3):
        if isinstance(state_dict, dict) and not any(isinstance(v, torch.Tensor) for v in state_dict.values()):
            nested = [key for key in NESTING_KEYS if isinstance(state_dict.get(key), dict)]
            if not nested:
                break
            state_dict = state_dict[nested[0]]
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"{source} holds {type(state_dict).__name__}, not a non-empty dict of weight tensors.")
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{source} holds non-tensor entries {sorted(map(str, not_tensors))[:5]}: not a state dict (weights nested "
            f"under another key? known ones: {NESTING_KEYS})."
        )
    if all(str(key).startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    state_dict = _rename_layer_norm(state_dict)
    if "uniter.embeddings.word_embeddings.weight" not in state_dict:
        if any(marker in state_dict for marker in BERT_MARKERS):
            raise ValueError(
                f"{source} is a plain BERT checkpoint (bert.* / embeddings.* keys), not UNITER: it has no region "
                "embeddings. Load its BERT folder (config.json and weights) or Hub id with "
                "ImageBERTForPreTraining.from_text_pretrained instead, which maps BERT's next-sentence head into the "
                "ITM head (docs/pretrained_components.md)."
            )
        raise ValueError(
            f"{source} is not a UNITER checkpoint: no uniter.embeddings.word_embeddings.weight; its keys start "
            f"{sorted(state_dict)[:5]}."
        )
    needed = [
        "uniter.encoder.layer.0.intermediate.dense.weight",
        "uniter.embeddings.position_embeddings.weight",
        "uniter.embeddings.token_type_embeddings.weight",
        "uniter.img_embeddings.img_linear.weight",
        "uniter.img_embeddings.pos_linear.weight",
    ]
    missing = [key for key in needed if key not in state_dict]
    if missing:
        raise ValueError(f"{source} is an incomplete UNITER checkpoint: it lacks {missing}.")
    return state_dict


def detect_task(state_dict: dict[str, torch.Tensor]) -> str:
    """ "retrieval" for a checkpoint fine-tuned with UNITER's retrieval code (`rank_output`), else "pretraining"."""
    return "retrieval" if "rank_output.weight" in state_dict else "pretraining"


def uniter_config_kwargs(
    state_dict: dict[str, torch.Tensor], uniter_config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`ImageBERTConfig` arguments for a UNITER state dict: sizes read from the tensors, the rest from UNITER's JSON
    config (`config/uniter-base.json`) when given (the attention heads default to hidden_size / 64)."""
    uniter_config = dict(uniter_config or {})
    words = state_dict["uniter.embeddings.word_embeddings.weight"]
    layers = {int(m.group(1)) for key in state_dict if (m := re.match(r"uniter\.encoder\.layer\.(\d+)\.", key))}
    if not layers:
        raise ValueError("the checkpoint has no uniter.encoder.layer.* weights: is it a UNITER state dict?")
    hidden_size = int(words.shape[1])
    kwargs = {
        "vocab_size": int(words.shape[0]),
        "hidden_size": hidden_size,
        "num_hidden_layers": max(layers) + 1,
        "num_attention_heads": int(uniter_config.get("num_attention_heads", hidden_size // 64)),
        "intermediate_size": int(state_dict["uniter.encoder.layer.0.intermediate.dense.weight"].shape[0]),
        "max_position_embeddings": int(state_dict["uniter.embeddings.position_embeddings.weight"].shape[0]),
        "type_vocab_size": int(state_dict["uniter.embeddings.token_type_embeddings.weight"].shape[0]),
        "region_feature_size": int(state_dict["uniter.img_embeddings.img_linear.weight"].shape[1]),
        "region_location_size": int(state_dict["uniter.img_embeddings.pos_linear.weight"].shape[1]),
        "region_projection_layer_norm": True,
        "region_position_embedding": False,
        "separate_region_layer_norm": True,
        "region_token_type_id": 1,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "max_text_length": UNITER_MAX_TEXT_LENGTH,
        "max_regions": UNITER_MAX_REGIONS,
    }
    if "region_classifier.net.3.weight" in state_dict:
        # UNITER's 1601 soft labels put the background first; ImageBERT's classes have none.
        kwargs["num_object_classes"] = int(state_dict["region_classifier.net.3.weight"].shape[0]) - 1
    for name in ("hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range"):
        if name in uniter_config:
            kwargs[name] = uniter_config[name]
    return kwargs


def convert_uniter_state_dict(state_dict: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """Renames (and, for the heads, reshapes) a UNITER state dict into ImageBERT's keys for `task`.

    Raises:
        ValueError: On a key that is neither mapped nor known to be dropped, or when `task` needs heads the
            checkpoint lacks.
    """
    import torch

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    state_dict = _rename_layer_norm(state_dict)
    heads = ("cls.predictions.bias", "itm_output.weight", "region_classifier.net.3.weight", "feat_regress.bias")
    missing = [key for key in heads if key not in state_dict]
    if task == "pretraining" and missing:
        raise ValueError(f"the checkpoint lacks the pretraining heads {missing}; convert it with task='retrieval'.")
    prefixes = dict(PREFIXES)
    if task == "pretraining":
        prefixes.update(PRETRAINING_PREFIXES)
    converted: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is not None:
            converted[prefixes[prefix] + key[len(prefix) :]] = value
        elif key not in DROPPED + TIED and not key.startswith(CONVERTED_BELOW[task]):
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"UNITER keys with no ImageBERT counterpart: {sorted(unmapped)}.")

    if task == "pretraining":
        converted["cls.predictions.bias"] = state_dict["cls.predictions.bias"]
        converted["cls.predictions.decoder.bias"] = state_dict["cls.predictions.bias"]
        converted["cls.predictions.decoder.weight"] = state_dict["uniter.embeddings.word_embeddings.weight"]
        converted["cls.object_predictions.decoder.weight"] = state_dict["region_classifier.net.3.weight"][1:]
        converted["cls.object_predictions.decoder.bias"] = state_dict["region_classifier.net.3.bias"][1:]
        # F.linear(hidden, img_linear.weight.t(), bias): a (feature, hidden) decoder weight.
        img_linear = state_dict.get("feat_regress.weight", state_dict["uniter.img_embeddings.img_linear.weight"])
        converted["cls.feature_regression.decoder.weight"] = img_linear.t().contiguous()
        converted["cls.feature_regression.decoder.bias"] = state_dict["feat_regress.bias"]
    elif "rank_output.weight" in state_dict:
        weight, bias = state_dict["rank_output.weight"], state_dict["rank_output.bias"]
        # score = logit(matched) - logit(not matched) = rank_output(pooled).
        converted["cls.seq_relationship.weight"] = torch.cat([torch.zeros_like(weight), weight])
        converted["cls.seq_relationship.bias"] = torch.cat([torch.zeros_like(bias), bias])
    elif "itm_output.weight" in state_dict:
        converted["cls.seq_relationship.weight"] = state_dict["itm_output.weight"]
        converted["cls.seq_relationship.bias"] = state_dict["itm_output.bias"]
    else:
        raise ValueError("the checkpoint has neither rank_output nor itm_output: nothing scores a pair.")
    return converted


def load_uniter_model(
    state_dict: dict[str, torch.Tensor],
    task: str | None = None,
    uniter_config: dict[str, Any] | None = None,
    **config_overrides,
) -> ImageBERTForPreTraining | ImageBERTForImageTextRetrieval:
    """An ImageBERT model holding a UNITER state dict, loaded with a strict key check.

    Args:
        state_dict: UNITER's weights, as `read_uniter_checkpoint` returns them (a `weights_only=True` load).
        task: "pretraining" (`ImageBERTForPreTraining`) or "retrieval" (`ImageBERTForImageTextRetrieval`);
            detected from the keys when None.
        uniter_config: UNITER's JSON config as a dict (for the attention heads and dropouts).
        **config_overrides: `ImageBERTConfig` fields to set (e.g. `max_text_length`).
    """
    from .configuration_imagebert import ImageBERTConfig
    from .modeling_imagebert import ImageBERTForImageTextRetrieval, ImageBERTForPreTraining

    state_dict = prepare_uniter_state_dict(state_dict)
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} or None (detected), got {task!r}.")
    task = task or detect_task(state_dict)
    config = ImageBERTConfig(**{**uniter_config_kwargs(state_dict, uniter_config), **config_overrides})
    model_class = ImageBERTForPreTraining if task == "pretraining" else ImageBERTForImageTextRetrieval
    model = model_class(config)
    converted = convert_uniter_state_dict(state_dict, task)
    expected = model.state_dict()
    # Only the retrieval projections have no UNITER counterpart.
    allowed_missing = {key for key in expected if key.startswith(("cls.text_projection.", "cls.region_projection."))}
    missing = sorted(set(expected) - set(converted) - allowed_missing)
    unexpected = sorted(set(converted) - set(expected))
    misshapen = [
        f"{key} {tuple(converted[key].shape)} != {tuple(expected[key].shape)}"
        for key in sorted(set(converted) & set(expected))
        if converted[key].shape != expected[key].shape
    ]
    if missing or unexpected or misshapen:
        raise ValueError(
            f"the converted UNITER weights do not fit {model_class.__name__}: missing {missing}, unexpected "
            f"{unexpected}, wrong shapes {misshapen}."
        )
    model.load_state_dict(converted, strict=False)
    if task == "retrieval":
        logger.info(
            "cls.text_projection and cls.region_projection have no UNITER counterpart: left at initialisation, and "
            "out of a saved conversion (fine-tune them before shortlisting)."
        )
    return model.eval()


def convert_uniter_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    task: str | None = None,
    uniter_config: str | os.PathLike | None = None,
    tokenizer: str | None = None,
    detector_weights: str | None = None,
    **config_overrides,
):
    """Converts `checkpoint` and saves the model (and, with `tokenizer`, an `ImageBERTProcessor` whose region
    extractor is the BUTD detector with 7-d locations) to `output_dir`. Returns the model."""
    check_destination(output_dir, tokenizer, detector_weights, inputs=(checkpoint, uniter_config))
    output_dir = Path(output_dir).expanduser()
    uniter = None
    if uniter_config:
        try:
            uniter = json.loads(Path(uniter_config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"uniter_config {uniter_config} cannot be read as JSON ({error}).") from error
        if not isinstance(uniter, dict):
            raise ValueError(f"uniter_config {uniter_config} must hold a JSON object, got {type(uniter).__name__}.")
    model = load_uniter_model(read_uniter_checkpoint(checkpoint), task, uniter, **config_overrides)
    # Written under a temporary name and renamed once complete: a failed save raises and leaves no half folder.
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    try:
        _save_converted(model, tmp, tokenizer, detector_weights)
        publish_folder(tmp, output_dir)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model


def _save_converted(model, output_dir: Path, tokenizer: str | None, detector_weights: str | None) -> None:
    from .pipeline_image_text_retrieval import PROJECTION_HEADS  # here: `--help` loads no torch

    # UNITER has no unimodal projection heads: saved at their random initialisation they would read as trained, and
    # a shortlist through them would rank at random. Left out, every load reports them untrained.
    untrained = tuple(head + "." for head in PROJECTION_HEADS)
    model.save_pretrained(
        output_dir,
        state_dict={name: value for name, value in model.state_dict().items() if not name.startswith(untrained)},
    )
    written = {path.name for path in output_dir.glob("*")} if output_dir.is_dir() else set()
    if "config.json" not in written or not any(name.endswith((".safetensors", ".bin")) for name in written):
        raise OSError(f"saving the model to {output_dir} failed: it holds {sorted(written)}.")
    if tokenizer is not None:
        from transformers import AutoTokenizer

        from .image_processing_imagebert import ImageBERTRoIExtractor
        from .processing_imagebert import ImageBERTProcessor

        extractor = ImageBERTRoIExtractor(
            backend="butd",
            detector_weights=detector_weights,
            max_regions=model.config.max_regions,
            region_location_size=model.config.region_location_size,
        )
        processor = ImageBERTProcessor.from_model_config(
            model.config, AutoTokenizer.from_pretrained(tokenizer), extractor
        )
        processor.save_pretrained(output_dir)


def _check_replaceable(path: Path, output_name: str, inputs: tuple[str | os.PathLike | None, ...]) -> None:
    """The conversion replaces its output folder whole: only an empty one, or an earlier conversion (a `config.json`
    of an ImageBERT model) that holds none of the `inputs`, may be replaced."""
    if not path.is_dir():
        return
    entries = sorted(entry.name for entry in path.iterdir())
    if not entries:
        return
    inside = [
        str(source)
        for source in inputs
        if source is not None
        and Path(source).expanduser().exists()
        and Path(source).expanduser().resolve().is_relative_to(path.resolve())
    ]
    if inside:
        raise ValueError(
            f"{output_name} {path} holds {inside[0]}, an input of the conversion, and would be replaced by the "
            "converted model; write it to another folder."
        )
    try:
        earlier = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type") == "imagebert"
    except (OSError, ValueError, AttributeError):
        earlier = False
    if not earlier:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(
            f"{output_name} {path} is a folder holding other files ({shown}), which the conversion would delete "
            "(it replaces its output folder whole); give a new or empty folder, or one an earlier conversion wrote."
        )


def check_destination(
    output: str | os.PathLike,
    tokenizer: str | None,
    detector_weights: str | None,
    names: tuple[str, str, str] = ("output_dir", "tokenizer", "detector_weights"),
    inputs: tuple[str | os.PathLike | None, ...] = (),
) -> None:
    """Refuses, before the conversion, the arguments whose fault would otherwise show only once the model is built
    (or never: detector weights without a tokenizer have no processor to go into), each message naming its argument
    as `names` gives them (the command's flags, or the function's parameters); and an output folder the conversion
    would replace that is not an earlier conversion, or that holds one of the `inputs` (the checkpoint, its config).
    The wording is that of `formats.files.check_output_dir` and `check_folder_or_hub_id`, which this folder, the
    bottom of the package, cannot import."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    def hub_id(name: str) -> bool:
        try:
            validate_repo_id(name)
        except HFValidationError:
            return False
        return True

    output_name, tokenizer_name, weights_name = names
    if not os.fspath(output).strip():  # the empty path is the current folder to the OS
        raise ValueError(f"{output_name} must be a non-empty path, got {os.fspath(output)!r}.")
    path = Path(output).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{output_name} {path} is a file; expected a folder (created when missing).")
    _check_replaceable(path, output_name, (*inputs, tokenizer, detector_weights))
    if detector_weights is not None and tokenizer is None:
        raise ValueError(
            f"{weights_name} goes into the processor, which is saved only with {tokenizer_name}: give "
            f"{tokenizer_name} too, or leave {weights_name} out."
        )
    expected = "a tokenizer folder such as a saved BERT's, or a Hub id such as owner/name"
    if tokenizer is not None and Path(tokenizer).expanduser().is_file():
        raise NotADirectoryError(f"{tokenizer_name} {tokenizer} is a file; expected {expected}.")
    if tokenizer is not None and not Path(tokenizer).expanduser().exists() and not hub_id(tokenizer):
        raise FileNotFoundError(f"{tokenizer_name} {tokenizer}: no such folder (expected {expected}).")
    if (
        detector_weights is not None
        and not Path(detector_weights).expanduser().exists()
        and not hub_id(detector_weights)
    ):
        raise FileNotFoundError(
            f"{weights_name} {detector_weights}: no such file or folder (expected the BUTD detector's checkpoint, or "
            "a Hub id such as unc-nlp/frcnn-vg-finetuned)."
        )


def main(argv: list[str] | None = None) -> int:
    """Runs `imagebert-convert-uniter`; returns 0. A missing or unreadable checkpoint, config or tokenizer ends it
    with one line naming it and exit status 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", required=True, help="UNITER .pt state dict (uniter-base.pt, a fine-tuned ckpt)"
    )
    parser.add_argument("--output", required=True, help="folder to save the ImageBERT model to")
    parser.add_argument("--task", choices=TASKS, default=None, help="default: retrieval when rank_output is present")
    parser.add_argument("--uniter_config", default=None, help="UNITER's model JSON config (e.g. uniter-base.json)")
    parser.add_argument(
        "--tokenizer", default=None, help="also save a processor with this tokenizer (bert-base-cased)"
    )
    parser.add_argument(
        "--detector_weights", default=None, help="BUTD checkpoint (folder, file or Hub name) for the processor"
    )
    parser.add_argument("--max_text_length", type=int, default=UNITER_MAX_TEXT_LENGTH)
    args = parser.parse_args(argv)
    with exit_on_error("imagebert-convert-uniter"):
        check_destination(
            args.output, args.tokenizer, args.detector_weights, FLAG_NAMES, (args.checkpoint, args.uniter_config)
        )
        model = convert_uniter_checkpoint(
            args.checkpoint,
            args.output,
            args.task,
            args.uniter_config,
            args.tokenizer,
            args.detector_weights,
            max_text_length=args.max_text_length,
        )
    print(f"saved {type(model).__name__} ({model.num_parameters() / 1e6:.1f} M parameters) to {args.output}")
    return 0


__all__ = [
    "check_destination",
    "convert_uniter_checkpoint",
    "convert_uniter_state_dict",
    "load_uniter_model",
    "prepare_uniter_state_dict",
    "read_uniter_checkpoint",
    "uniter_config_kwargs",
]


if __name__ == "__main__":
    raise SystemExit(main())
