"""Retrieval evaluation of a checkpoint on a standard split: TR/IR R@1/5/10 and RSUM, zero-shot (a pretraining
checkpoint, ITM head) or fine-tuned, by full ranking and optionally shortlist + re-rank; what
`examples/evaluate_retrieval.py` runs.

Texts are tokenized once and regions read once from the region cache (`corpus_cache` keeps both for the next run).
A run writes `results.json` (the input of `evaluation.hub.build_model_card`), recall@K curves, score histograms and,
with `model_card`, a filled model card.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..data.retrieval_corpus import (
    PROTOCOL_CAPTIONS_PER_IMAGE,
    RetrievalCorpus,
    check_region_cache_fits,
    evaluation_captions_per_image,
    load_karpathy_split,
    load_manifest_records,
    region_cache_key,
    region_cache_lookup,
    tokenizer_fingerprint,
)
from ..data.synthetic import HELD_OUT_SEED, make_synthetic_examples, synthetic_region_record
from ..formats.files import (
    atomic_write_json,
    atomic_writer,
    check_folder_or_hub_id,
    check_output_dir,
    expand_home,
    file_checksum,
)
from ..formats.manifest import outside_root_flag
from ..models.imagebert.folder_publishing import give_ordinary_mode
from ..models.imagebert.modeling_imagebert import ImageBERTForImageTextRetrieval
from ..models.imagebert.pipeline_image_text_retrieval import untrained_heads
from ..models.imagebert.region_batching import check_region_values
from ..models.imagebert.retrieval_index import index_factory_string, score_all_pairs, score_pairs
from ..regions.cache_reader import load_region_cache
from .across_processes import score_pairs_across_processes
from .hub import ZERO_SHOT, build_model_card, is_one_line_name, save_model_card
from .plots import plot_recall_curves, plot_score_histograms
from .recall import format_metrics_table, retrieval_metrics, shared_caption_count
from .shortlist import ShortlistResult, shortlist_rerank


logger = logging.get_logger(__name__)

DATASETS = ("coco", "flickr30k", "manifest", "synthetic")
# The one split of `--dataset synthetic`: a generated set the training script never shows.
SYNTHETIC_SPLIT = "test"
# The split the standard protocols (Flickr30k 1k, MS-COCO 1k and 5k) are defined on.
PROTOCOL_SPLIT = "test"
MODEL_CARD = "README.md"


# The flags of `EvaluationArguments` that name a file or a folder (`model_name_or_path`: or a Hub id).
_PATH_FLAGS = (
    "output_dir",
    "model_name_or_path",
    "karpathy_file",
    "image_root",
    "manifest",
    "region_cache",
    "corpus_cache",
)


@dataclass
class EvaluationArguments:
    """Flags of `examples/evaluate_retrieval.py`."""

    output_dir: str = field(metadata={"help": "Where results.json, plots and the model card go."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Retrieval or pretraining checkpoint (a pretraining one is zero-shot)."}
    )
    dataset: str = field(default="manifest", metadata={"help": f"One of {DATASETS}."})
    karpathy_file: str | None = field(default=None, metadata={"help": "dataset_coco.json or dataset_flickr30k.json."})
    image_root: str | None = field(default=None, metadata={"help": "Folder the Karpathy image paths start from."})
    manifest: str | None = field(default=None, metadata={"help": "A jsonl manifest (dataset=manifest)."})
    allow_outside_root: bool = outside_root_flag("the manifest or Karpathy file")
    split: str = field(
        default="test",
        metadata={
            "help": f"Split to evaluate ({SYNTHETIC_SPLIT!r}, the only one, for dataset=synthetic; for a manifest, "
            "'all' keeps every line, as for one whose lines name no split)."
        },
    )
    region_cache: str | None = field(default=None, metadata={"help": "Region cache folder of the split's images."})
    corpus_cache: str | None = field(
        default=None,
        metadata={
            "help": "A file (safetensors) keeping the tokenized texts and stacked regions between runs; reused only "
            "for the same dataset, split, records, tokenizer and region cache."
        },
    )
    memory_mapped: bool = field(
        default=False,
        metadata={
            "help": "Leave the regions in the region cache, read batch by batch from its memory-mapped files, "
            "instead of stacking them in RAM (galleries larger than memory; the same scores)."
        },
    )
    max_images: int | None = field(default=None, metadata={"help": "Evaluate only the first images (quick runs)."})
    captions_per_image: int | None = field(
        default=None, metadata={"help": "Keep at most this many captions of each image, as run_retrieval.py does."}
    )
    synthetic_images: int = field(default=100, metadata={"help": "Generated images for dataset=synthetic."})
    batch_size: int = field(default=256, metadata={"help": "Pairs per cross-encoder forward pass."})
    shortlist_k: int | None = field(
        default=None, metadata={"help": "Also rank with a unimodal shortlist of k candidates per query + re-ranking."}
    )
    index_type: str = field(default="flat", metadata={"help": "Shortlist index: flat (exact), ivf or hnsw."})
    model_card: bool = field(default=False, metadata={"help": "Write README.md, a model card with these results."})
    model_id: str = field(default="imagebert-base", metadata={"help": "Name of the model in the card."})
    base_model: str | None = field(
        default=None,
        metadata={"help": "Hub id the model started from, for the card's base_model (left out when unset)."},
    )
    license: str | None = field(
        default=None, metadata={"help": "License id for the card (e.g. apache-2.0; left out when unset)."}
    )
    cpu: bool = field(
        default=False,
        metadata={
            "help": "Score on the CPU even when an accelerator is present; several processes on CPUs need it too "
            "(`accelerate launch --multi_gpu --num_processes N evaluate_retrieval.py ... --cpu` on a machine "
            "without GPUs)."
        },
    )

    def __post_init__(self):
        for name, value in expand_home({name: getattr(self, name) for name in _PATH_FLAGS}).items():
            setattr(self, name, value)
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {DATASETS}, got {self.dataset!r}.")
        for name in ("max_images", "shortlist_k", "captions_per_image"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name} must be a positive integer or unset, got {value!r}.")
        for name in ("batch_size", "synthetic_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"--output_dir must be a non-empty path, got {self.output_dir!r}.")
        # The card is written last: refused here rather than once every pair is scored.
        for name in ("model_id", "base_model", "license"):
            value = getattr(self, name)
            if self.model_card and (value is not None or name == "model_id") and not is_one_line_name(value):
                raise ValueError(f"--{name} must be a non-empty name on one line for --model_card, got {value!r}.")


def protocols(
    dataset: str, num_images: int, split: str = PROTOCOL_SPLIT, captions_per_image: int | None = None
) -> list[tuple[str, str | None, int]]:
    """(name, dataset_config, num_folds) of each standard protocol the split supports. A protocol's name is given
    only to the Karpathy test split at exactly its size (COCO's 5k test images, Flickr30k's 1k) with its captions
    (`captions_per_image` unset, or at least the protocol's 5): a part of it (`--max_images`, fewer captions) or
    another split, of whatever size, is reported under the plain dataset name, with no config, as it is no published
    protocol."""
    whole = captions_per_image is None or captions_per_image >= PROTOCOL_CAPTIONS_PER_IMAGE
    standard = split == PROTOCOL_SPLIT and whole
    if dataset == "coco" and standard and num_images == 5000:
        return [("MS-COCO 1k", "1k", 5), ("MS-COCO 5k", "5k", 1)]
    if dataset == "coco":
        return [("MS-COCO", None, 1)]
    if dataset == "flickr30k" and standard and num_images == 1000:
        return [("Flickr30k 1k", "1k", 1)]
    if dataset == "flickr30k":
        return [("Flickr30k", None, 1)]
    return [(dataset, None, 1)]


CORPUS_CACHE_FORMAT = "imagebert-corpus-cache/1"


# Fingerprint keys added after the cache format: a cache written before records none of them.
_FINGERPRINT_DEFAULTS = {"captions_per_image": None}


class CorpusCacheError(ValueError):
    """A `--corpus_cache` file that cannot be used: not a corpus cache, damaged, or built for another split."""


def _split_records(args: EvaluationArguments, config) -> list[dict]:
    """The split's image records (for `dataset=synthetic`, the generated examples), in evaluation order."""
    if args.dataset == "synthetic":
        # A seed the training script refuses for its images, so the evaluation set is held out.
        return make_synthetic_examples(args.synthetic_images, seed=HELD_OUT_SEED, image_size=32)[: args.max_images]
    if args.dataset in ("coco", "flickr30k"):
        if args.karpathy_file is None:
            raise ValueError(f"--dataset {args.dataset} needs --karpathy_file.")
        return load_karpathy_split(
            args.karpathy_file,
            args.split,
            args.image_root,
            args.max_images,
            allow_outside_root=args.allow_outside_root,
            dataset=args.dataset,
        )
    if args.manifest is None:
        raise ValueError("--dataset manifest needs --manifest.")
    return load_manifest_records(
        args.manifest, args.split, args.max_images, allow_outside_root=args.allow_outside_root
    )


def corpus_fingerprint(args: EvaluationArguments, records, tokenizer, config, region_cache=None) -> dict:
    """What a corpus cache is built from: the dataset, split and its records (ids and captions), the image each
    record's regions are read from (its key in `region_cache`), the tokenizer (its class and size, and
    `tokenizer_fingerprint`), the text and region limits and the region cache (its own fingerprint). Two runs share
    a cache only when all of these agree. An image without regions in `region_cache` raises ValueError naming it."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([str(record["image_id"]), list(record["captions"])]).encode() + b"\n")
    fingerprint = {
        "dataset": args.dataset,
        "split": args.split,
        "num_images": len(records),
        "records_sha256": digest.hexdigest(),
        "tokenizer": f"{type(tokenizer).__name__}/{len(tokenizer)}",
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        # Captions are read as text (`tokenize_as_text`): a cache made when `[SEP]` in a caption was a separator is
        # not reused.
        "text_tokenization": "special_token_spellings_as_text",
        "captions_per_image": args.captions_per_image,
        "max_text_length": int(config.max_text_length),
        "max_regions": int(config.max_regions),
        "region_feature_size": int(config.region_feature_size),
        "region_cache": None if region_cache is None else region_cache.info.get("fingerprint"),
    }
    if region_cache is not None:
        # A manifest line pointed at another image keeps its id and captions: only its key in the region cache tells
        # which regions the cache holds for it.
        images = hashlib.sha256()
        for record in records:
            try:
                key = region_cache_key(region_cache, record)
            except KeyError as error:
                raise ValueError(f"--region_cache {args.region_cache}: {error.args[0]}") from None
            images.update(json.dumps(key).encode() + b"\n")
        fingerprint["images_sha256"] = images.hexdigest()
    return fingerprint


def save_corpus_cache(path: str | os.PathLike, corpus: RetrievalCorpus, fingerprint: dict) -> None:
    """Writes a stacked corpus as one safetensors file (tensors, plus ids, captions and `fingerprint` as JSON
    metadata), atomically: an interrupted write leaves the previous file. The tensors are written from their own
    memory, not first gathered into one file-sized buffer (COCO 5k's regions are gigabytes)."""
    from safetensors.torch import save_file

    tensors = {"text_to_image": corpus.text_to_image.contiguous()}
    tensors.update({f"text_inputs.{k}": v.contiguous() for k, v in corpus.text_inputs.items()})
    tensors.update({f"region_inputs.{k}": torch.as_tensor(v).contiguous() for k, v in corpus.region_inputs.items()})
    metadata = {
        "format": CORPUS_CACHE_FORMAT,
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
        "image_ids": json.dumps(corpus.image_ids),
        "texts": json.dumps(corpus.texts),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as handle:
        # Written by name into the writer's temporary file, which the writer then syncs and renames.
        save_file(tensors, handle.name, metadata=metadata)
        # safetensors replaced the writer's file by its own: that one is given the usual mode, and synced.
        give_ordinary_mode(handle.name)
        with open(handle.name, "rb") as written:
            os.fsync(written.fileno())


# What `save_corpus_cache` stores: each tensor's dtype ("int64", or any floating one) and dimensions, named by the
# size they share (N images, T texts, L tokens, R regions, F features, B box values). A corpus built without a
# tokenizer or regions has no text or region tensors; with them, scoring needs these (the masks and token types
# default to ones and zeros).
_REQUIRED_CORPUS_TENSORS = {
    "text_inputs.": ["text_inputs.input_ids"],
    "region_inputs.": ["region_inputs.region_features", "region_inputs.region_locations"],
}
_CORPUS_TENSORS = {
    "text_to_image": ("int64", ("T",)),
    "text_inputs.input_ids": ("int64", ("T", "L")),
    "text_inputs.attention_mask": ("int64", ("T", "L")),
    "text_inputs.token_type_ids": ("int64", ("T", "L")),
    "region_inputs.region_features": ("floating", ("N", "R", "F")),
    "region_inputs.region_locations": ("floating", ("N", "R", "B")),
    "region_inputs.region_attention_mask": ("int64", ("N", "R")),
}


def _check_corpus_tensors(path: Path, tensors: dict, image_ids: list, texts: list, fingerprint: dict) -> None:
    """The names, dtypes, shapes and values of a corpus cache's tensors against what `save_corpus_cache` writes
    for `image_ids` and `texts`: a tensor edited by hand or by another program would otherwise give silently wrong
    recall targets or fail deep inside the model. One pass over the region features (a sum per region)."""

    def damaged(problem: str) -> CorpusCacheError:
        return CorpusCacheError(f"--corpus_cache {path} is damaged: {problem}; delete it and rerun to rebuild it.")

    if not isinstance(image_ids, list) or not isinstance(texts, list):
        raise damaged("its image_ids and texts metadata must be lists of strings")
    if not all(isinstance(item, str) for item in [*image_ids, *texts]):
        raise damaged("its image_ids and texts metadata must be lists of strings")
    unknown = sorted(set(tensors) - set(_CORPUS_TENSORS))
    if unknown:
        raise damaged(f"it holds tensors {unknown}, which a corpus cache does not (it holds {list(_CORPUS_TENSORS)})")
    for group, required in _REQUIRED_CORPUS_TENSORS.items():
        missing = [name for name in required if name not in tensors]
        if missing and any(name.startswith(group) for name in tensors):
            raise damaged(f"tensor {missing[0]} is missing (a corpus cache with {group}* tensors holds {required})")
    sizes = {"N": len(image_ids), "T": len(texts)}
    for name, (dtype, dims) in _CORPUS_TENSORS.items():
        tensor = tensors.get(name)
        if tensor is None:
            continue
        expected = f"{dtype} of shape ({', '.join(dims)}) with N={sizes['N']} images and T={sizes['T']} captions"
        if not (tensor.is_floating_point() if dtype == "floating" else tensor.dtype == torch.int64):
            raise damaged(f"tensor {name} has dtype {str(tensor.dtype).replace('torch.', '')}; expected {expected}")
        shape = tuple(tensor.shape)
        if len(shape) != len(dims) or any(sizes.setdefault(dim, size) != size for dim, size in zip(dims, shape)):
            raise damaged(f"tensor {name} has shape {shape}; expected {expected}")
    limits = {"L": ("max_text_length", "tokens"), "R": ("max_regions", "regions")}
    for dim, (setting, what) in limits.items():
        limit = fingerprint.get(setting)
        if dim in sizes and isinstance(limit, int) and sizes[dim] > limit:
            raise damaged(f"it holds {sizes[dim]} {what} per item, more than {setting}={limit}")
    feature_size = fingerprint.get("region_feature_size")
    if "F" in sizes and isinstance(feature_size, int) and sizes["F"] != feature_size:
        raise damaged(f"it holds regions of {sizes['F']} features; region_feature_size={feature_size}")
    if sizes.get("B", 5) not in (5, 7):
        raise damaged(f"its region_locations hold {sizes['B']} values per region; expected 5 (or UNITER's 7)")

    text_to_image = tensors["text_to_image"]
    if len(texts) and (int(text_to_image.min()) < 0 or int(text_to_image.max()) >= len(image_ids)):
        raise damaged(
            f"tensor text_to_image holds image indices {int(text_to_image.min())}..{int(text_to_image.max())}; "
            f"expected 0..{len(image_ids) - 1} (its {len(image_ids)} images)"
        )
    captions = torch.bincount(text_to_image, minlength=len(image_ids))
    if len(image_ids) and int(captions.min()) == 0:
        raise damaged(f"image {image_ids[int(captions.argmin())]!r} has no caption in tensor text_to_image")
    # The tokenizer's size, as `corpus_fingerprint` records it ("BertTokenizerFast/30522").
    vocab = str(fingerprint.get("tokenizer", "")).rpartition("/")[2]
    value_ranges = {
        "text_inputs.input_ids": (0, int(vocab) - 1 if vocab.isdigit() else None),
        "text_inputs.attention_mask": (0, 1),
        # Each caption is one segment, so the tokenizer gives every token type 0; another value would index the
        # model's token-type table out of range (a device-side assert on a GPU).
        "text_inputs.token_type_ids": (0, 0),
        "region_inputs.region_attention_mask": (0, 1),
    }
    for name, (low, high) in value_ranges.items():
        tensor = tensors.get(name)
        if tensor is None or not tensor.numel():
            continue
        least, most = int(tensor.min()), int(tensor.max())
        if least < low or (high is not None and most > high):
            allowed = f"{low}..{high}" if high is not None else f"at least {low}"
            raise damaged(f"tensor {name} holds values {least}..{most}; expected {allowed}")
    if "region_inputs.region_features" in tensors:
        regions = {name.split(".", 1)[1]: tensor for name, tensor in tensors.items() if name.startswith("region_")}
        try:
            check_region_values(regions, image_ids)
        except ValueError as error:
            # "sample '<id>': region_features hold ...": named here by the tensor, then the image.
            sample, _, problem = str(error).rstrip(".").partition(": ")
            raise damaged(f"tensor region_inputs.{problem} (image {sample.removeprefix('sample ')})") from error


def load_corpus_cache(path: str | os.PathLike, fingerprint: dict) -> RetrievalCorpus:
    """Reads a corpus cache written by `save_corpus_cache`, after checking it was built from `fingerprint`.

    The file is a safetensors file (tensors and JSON): nothing in it can run code. A file in any other format (a
    pickled `.pt` cache of an older version included) is refused, never unpickled.

    The tensors are checked against what `save_corpus_cache` writes for the stored ids and captions: their names,
    dtypes and shapes, image indices within the split, token ids within the tokenizer, masks of 0 and 1, and finite
    region features and locations in [0, 1] (`check_region_values`).

    Raises:
        CorpusCacheError: the file is not a corpus cache, is damaged (the message names the tensor), or was built
            for another split, dataset, tokenizer or region cache (the message names the settings that differ).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    size = path.stat().st_size
    # The header alone is read to check the file; the tensors are then read from the mapped file, never the whole
    # file into memory beside them.
    with open(path, "rb") as handle:
        start = handle.read(9)
        header_size = int.from_bytes(start[:8], "little") if len(start) >= 8 else -1
        header = handle.read(header_size - 1) if 2 <= header_size <= size - 8 and start[8:9] == b"{" else None
    if header is None:
        raise CorpusCacheError(
            f"--corpus_cache {path} is not a corpus cache written by this version (a safetensors file); got "
            f"{size} bytes starting with {start[:8]!r}. Older .pt caches were pickles, which are never loaded "
            "(they can run code): delete the file and rerun, which rebuilds it."
        )
    try:
        metadata = json.loads(b"{" + header).get("__metadata__") or {}
        tensors = load_file(path)
        stored = json.loads(metadata["fingerprint"])
        image_ids, texts = json.loads(metadata["image_ids"]), json.loads(metadata["texts"])
    except (SafetensorError, ValueError, KeyError, TypeError) as error:
        raise CorpusCacheError(
            f"--corpus_cache {path} is damaged ({type(error).__name__}: {error}); delete it and rerun to rebuild it."
        ) from error
    if metadata.get("format") != CORPUS_CACHE_FORMAT:
        raise CorpusCacheError(
            f"--corpus_cache {path} has format {metadata.get('format')!r}, expected {CORPUS_CACHE_FORMAT!r}; delete "
            "it and rerun to rebuild it."
        )
    # Settings a cache records since a later version, at the value every earlier cache was built with.
    stored = {**{key: value for key, value in _FINGERPRINT_DEFAULTS.items() if key in fingerprint}, **stored}
    if stored != fingerprint:
        differs = {key: (stored.get(key), value) for key, value in fingerprint.items() if stored.get(key) != value}
        differs.update({key: (value, None) for key, value in stored.items() if key not in fingerprint})
        described = "; ".join(f"{key}: cache {old!r}, this run {new!r}" for key, (old, new) in differs.items())
        raise CorpusCacheError(
            f"--corpus_cache {path} was built from other data or settings ({described}); give another "
            "--corpus_cache path for this run, or delete the file to rebuild it."
        )
    text_to_image = tensors.get("text_to_image")
    if text_to_image is None or len(image_ids) != fingerprint["num_images"] or text_to_image.numel() != len(texts):
        raise CorpusCacheError(f"--corpus_cache {path} is damaged (its ids, captions and tensors disagree).")
    _check_corpus_tensors(path, tensors, image_ids, texts, fingerprint)
    return RetrievalCorpus(
        image_ids=image_ids,
        texts=texts,
        text_to_image=text_to_image,
        text_inputs={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("text_inputs.")},
        region_inputs={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("region_inputs.")},
    )


def load_retrieval_model(name_or_path: str, **config_overrides) -> ImageBERTForImageTextRetrieval:
    """`ImageBERTForImageTextRetrieval.from_pretrained`, with errors that name `--model_name_or_path`: a folder that
    does not exist, a damaged weights file. The weights the checkpoint lacked are kept on the model, so that
    `untrained_heads` names the projection heads of a pretraining checkpoint wherever it was loaded from."""
    from safetensors import SafetensorError

    check_folder_or_hub_id(name_or_path, "--model_name_or_path", "a checkpoint folder")
    try:
        model, info = ImageBERTForImageTextRetrieval.from_pretrained(
            name_or_path, output_loading_info=True, **config_overrides
        )
    except SafetensorError as error:
        raise OSError(
            f"--model_name_or_path {name_or_path}: a weights file is damaged ({error}); save the checkpoint again."
        ) from error
    model._missing_keys_at_load = list(info.get("missing_keys", []))
    return model


def evaluated_as(model) -> str:
    """`"zero-shot"` for a pretraining checkpoint (its image-text matching head ranks the pairs), `"fine-tuned"` for
    a retrieval one, by the class the checkpoint was saved from; what results.json and the model card say."""
    architectures = getattr(model.config, "architectures", None) or []
    return "fine-tuned" if "ImageBERTForImageTextRetrieval" in architectures else ZERO_SHOT


def check_shortlist_heads(model, shortlist_k: int | None, name_or_path: str) -> None:
    """Refuses `--shortlist_k` for a model whose unimodal projection heads were not in its checkpoint (a pretraining
    checkpoint, evaluated zero-shot; a UNITER conversion; a fine-tuning run without the contrastive loss): they are
    freshly initialised, so its shortlist would rank at random, and differently on every run."""
    heads = untrained_heads(model) if shortlist_k else []
    if heads:
        raise ValueError(
            f"--shortlist_k {shortlist_k}: {name_or_path} has no trained projection heads ({', '.join(heads)} are "
            "freshly initialised: a pretraining checkpoint, a UNITER conversion or a fine-tuning run with "
            "--contrastive_weight 0 leaves them untrained), so its shortlist would be random; evaluate it without "
            "--shortlist_k (full ranking with the ITM head), or fine-tune it with the contrastive loss first."
        )


def check_evaluation_paths(args: EvaluationArguments) -> None:
    """Refuses, before anything is loaded or written, a split file that is missing or does not exist, a missing
    `--region_cache`, a `--corpus_cache` that is a folder (the cache is one file, written only once the corpus is
    built) and an `--output_dir` that is a file."""
    karpathy = ("karpathy_file", "a Karpathy split file such as dataset_coco.json")
    split_flag, expected = {"coco": karpathy, "flickr30k": karpathy, "manifest": ("manifest", "a jsonl manifest")}.get(
        args.dataset, (None, None)
    )
    split_file = getattr(args, split_flag) if split_flag else None
    if split_flag and split_file is None:
        raise ValueError(f"--dataset {args.dataset} needs --{split_flag} ({expected}).")
    if split_file is not None and not Path(split_file).is_file():
        raise FileNotFoundError(f"--{split_flag} {split_file} does not exist (expected {expected}).")
    if args.dataset != "synthetic" and args.region_cache is None:
        raise ValueError(
            f"--dataset {args.dataset} needs --region_cache (extract the regions once with imagebert-extract-regions)."
        )
    if args.corpus_cache is not None and Path(args.corpus_cache).is_dir():
        raise IsADirectoryError(
            f"--corpus_cache {args.corpus_cache} is a folder; expected a file path (the cache is one safetensors file)."
        )
    check_output_dir(args.output_dir)


def load_evaluation_corpus(args: EvaluationArguments, tokenizer, config) -> RetrievalCorpus:
    """The split's tokenized texts and padded regions (from `args.corpus_cache` when it exists and was built from
    the same split and settings, and kept there otherwise)."""
    check_evaluation_paths(args)
    if args.memory_mapped and (args.corpus_cache or args.dataset == "synthetic"):
        raise ValueError(
            "--memory_mapped reads the regions from --region_cache: it goes with neither --corpus_cache (which "
            "stores stacked regions) nor --dataset synthetic (which has no region cache)."
        )
    records = _split_records(args, config)
    cache = None if args.dataset == "synthetic" else load_region_cache(args.region_cache)
    if cache is not None:
        check_region_cache_fits(cache, config, f"--region_cache {args.region_cache}", args.model_name_or_path)
    fingerprint = corpus_fingerprint(args, records, tokenizer, config, cache)
    if args.corpus_cache and Path(args.corpus_cache).is_file():
        return load_corpus_cache(args.corpus_cache, fingerprint)
    # The rule of the evaluation at the end of fine-tuning too, so that both rank the same gallery.
    captions = evaluation_captions_per_image(args.dataset in ("coco", "flickr30k"), args.captions_per_image)
    if args.dataset == "synthetic":
        regions = [synthetic_region_record(example, config.region_feature_size) for example in records]
        corpus = RetrievalCorpus.from_records(
            records, tokenizer, regions, config.max_text_length, config.max_regions, captions
        )
    else:
        if args.memory_mapped:
            corpus = RetrievalCorpus.from_region_cache(
                records, cache, tokenizer, config.max_text_length, config.max_regions, captions
            )
        else:
            corpus = RetrievalCorpus.from_records(
                records, tokenizer, region_cache_lookup(cache), config.max_text_length, config.max_regions, captions
            )
    if args.corpus_cache:
        save_corpus_cache(args.corpus_cache, corpus, fingerprint)
    return corpus


@dataclass
class CorpusRanking:
    """Full ranking of a corpus and, optionally, shortlist + re-rank of the same corpus.

    Attributes:
        scores: `(num_images, num_texts)` cross-encoder scores of every pair.
        text_to_image: the image index of every text.
        seconds: time spent scoring every pair.
        shortlist: the shortlist run, when one was asked for; `shortlist_k` and `shortlist_seconds` go with it.
    """

    scores: torch.Tensor
    text_to_image: torch.Tensor
    seconds: float
    shortlist: ShortlistResult | None = None
    shortlist_k: int | None = None
    shortlist_seconds: float | None = None

    def shortlist_metrics(self) -> dict[str, float]:
        """Recall of the shortlist run, each direction ranked with its own matrix."""
        return retrieval_metrics(self.shortlist.i2t_scores, self.text_to_image, ir_scores=self.shortlist.t2i_scores)

    def plot(self, output_dir: str | Path, title: str | None = None) -> None:
        """`recall_at_k.png` (full ranking and the shortlist run) and `score_histogram.png` in `output_dir`."""
        runs = {"full ranking": (self.scores, self.text_to_image)}
        if self.shortlist is not None:
            runs[f"shortlist k={self.shortlist_k}"] = (
                self.shortlist.i2t_scores,
                self.text_to_image,
                self.shortlist.t2i_scores,
            )
        plot_recall_curves(runs, Path(output_dir) / "recall_at_k.png", title=title)
        plot_score_histograms(self.scores, self.text_to_image, Path(output_dir) / "score_histogram.png")


def rank_corpus(
    model,
    corpus: RetrievalCorpus,
    batch_size: int = 256,
    shortlist_k: int | None = None,
    index_type: str = "flat",
    across_processes: bool = False,
) -> CorpusRanking:
    """Scores every pair of `corpus` with the cross-encoder and, with `shortlist_k`, also ranks it by a unimodal
    shortlist of that many candidates per query and re-ranking (`shortlist_rerank` with `index_type`).
    `across_processes`: share the pairs out over the processes of the launch (`score_pairs_across_processes`; call
    it on every process, each gets the whole ranking); the progress bars show on the main process."""
    scorer, shown, index_settings = score_pairs, True, {}
    if across_processes:
        from accelerate import PartialState

        scorer, shown = score_pairs_across_processes, PartialState().is_main_process
        # Each process builds the shortlist itself: on the CPU, where every process builds the same one (faiss
        # would otherwise put each process's index on every GPU).
        index_settings = {"use_gpu": False}
    start = time.perf_counter()
    # Every pair through the cross-encoder: seconds here, hours at COCO's 5k test images.
    bar = tqdm(total=corpus.num_images * corpus.num_texts, desc="scoring pairs", unit="pair", disable=not shown)
    with bar:
        scores = score_all_pairs(model, corpus.text_inputs, corpus.region_inputs, batch_size, bar.update, scorer)
    ranking = CorpusRanking(scores, corpus.text_to_image, time.perf_counter() - start)
    if shortlist_k:
        start = time.perf_counter()
        ranking.shortlist = shortlist_rerank(
            model, corpus.text_inputs, corpus.region_inputs, shortlist_k, batch_size, index_type,
            show_progress=shown, scorer=scorer, **index_settings,
        )  # fmt: skip
        ranking.shortlist_k, ranking.shortlist_seconds = shortlist_k, time.perf_counter() - start
    return ranking


def _remove_earlier_card(output_dir: Path) -> None:
    """Deletes the model card an earlier evaluation wrote into `output_dir`, which would otherwise stand beside
    results it does not describe. A card is this script's when the `results.json` it replaces records it
    (`model_card`) with the card's sha256: a README.md of anyone else, or a card edited since, is left as it is."""
    card = output_dir / MODEL_CARD
    try:
        earlier = json.loads((output_dir / "results.json").read_text(encoding="utf-8"))
        recorded = earlier.get("model_card") if isinstance(earlier, dict) else None
        if not (isinstance(recorded, dict) and recorded.get("file") == MODEL_CARD and card.is_file()):
            return
        if file_checksum(card)["sha256"] != recorded.get("sha256"):
            return
    except (OSError, ValueError):  # no earlier results, or not this script's: no card of ours to remove
        return
    card.unlink()
    logger.warning(
        "removed %s, the model card of the earlier evaluation (--model_card writes one for these results).", card
    )


def run_retrieval_evaluation(args: EvaluationArguments) -> dict:
    """Evaluates `args.model_name_or_path` on the split `args` names; prints the corpus size and a table of the
    results, writes `results.json`, the plots and (with `args.model_card`) `README.md` under `args.output_dir`.
    Under `accelerate launch` with several processes, each scores a share of the pairs on its own device and the main
    process prints and writes.

    Returns:
        `{"results": [...], "table": {...}}`: one result per protocol of full ranking (and one for the shortlist
        run), as `results.json` holds them, and the rows of the printed table.
    """
    from accelerate import PartialState
    from transformers import AutoTokenizer

    if args.model_name_or_path is None:
        raise ValueError("give --model_name_or_path (a retrieval or pretraining checkpoint).")
    if args.dataset == "synthetic" and args.split != SYNTHETIC_SPLIT:
        # results.json records the split: refused rather than recorded for a set it does not name.
        raise ValueError(
            f"--split {args.split!r}: --dataset synthetic has one split, the generated held-out set recorded as "
            f"{SYNTHETIC_SPLIT!r}; leave --split out (its size is --synthetic_images)."
        )
    check_evaluation_paths(args)
    output_dir = Path(args.output_dir)
    model = load_retrieval_model(args.model_name_or_path).eval()
    if args.shortlist_k:
        # Refused here rather than once every pair has been scored.
        check_shortlist_heads(model, args.shortlist_k, args.model_name_or_path)
        index_factory_string(args.index_type, args.shortlist_k, model.config.contrastive_embedding_size)
    processes = PartialState(cpu=args.cpu)  # one process on its accelerator (or the CPU) unless launched with more
    model.to(processes.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    corpus = load_evaluation_corpus(args, tokenizer, model.config)
    across = processes.num_processes > 1
    shared = f", shared out over {processes.num_processes} processes" if across else ""
    pairs = corpus.num_images * corpus.num_texts
    processes.print(f"{corpus.num_images} images, {corpus.num_texts} texts: {pairs:,} pairs{shared}")

    # Compared as the model reads them: captions that differ only where the tokenizer normalises (case, spacing)
    # are one query.
    queries = corpus.text_keys()
    shared_captions = shared_caption_count(queries, corpus.text_to_image)
    if shared_captions and processes.is_main_process:
        logger.warning(
            "%d of the %d texts are, as the tokens the model reads, a caption of more than one image: ties count "
            "against the query, so even a perfect scorer cannot reach 100 here; results.json records the count "
            "(num_captions_shared_by_images).",
            shared_captions,
            corpus.num_texts,
        )

    ranking = rank_corpus(model, corpus, args.batch_size, args.shortlist_k, args.index_type, across_processes=across)
    results, table = [], {}
    evaluation = evaluated_as(model)
    for name, config_name, folds in protocols(args.dataset, corpus.num_images, args.split, args.captions_per_image):
        metrics = retrieval_metrics(ranking.scores, corpus.text_to_image, num_folds=folds)
        results.append(
            {
                "dataset_name": name,
                "dataset_type": args.dataset,
                # A set that is no published protocol is named by its size, so that no card compares it with one.
                "dataset_config": config_name or f"{corpus.num_images} images x {corpus.num_texts} texts",
                "evaluation": evaluation,
                "dataset_split": args.split,
                "num_images": corpus.num_images,
                "num_texts": corpus.num_texts,
                "num_captions_shared_by_images": shared_caption_count(queries, corpus.text_to_image, folds),
                "metrics": metrics,
                "ranking": "full",
                "seconds": round(ranking.seconds, 2),
            }
        )
        table[f"{name} (full)"] = metrics
    if ranking.shortlist is not None:
        metrics = ranking.shortlist_metrics()
        table[f"{args.dataset} (shortlist k={args.shortlist_k})"] = metrics
        results.append(
            {
                "dataset_name": args.dataset,
                "dataset_type": args.dataset,
                "dataset_split": args.split,
                "evaluation": evaluation,
                "num_images": corpus.num_images,
                "num_texts": corpus.num_texts,
                "num_captions_shared_by_images": shared_captions,
                "metrics": metrics,
                "ranking": f"shortlist k={args.shortlist_k}",
                # An approximate index (ivf, hnsw) can miss candidates a flat one finds: the result says which.
                "index_type": args.index_type,
                "seconds": round(ranking.shortlist_seconds, 2),
                "pairs_scored": ranking.shortlist.num_pairs_scored,
            }
        )
    if processes.is_main_process:
        print(format_metrics_table(table))
        # Built before anything is written, so a card that cannot be built leaves no results without their card.
        card = None
        if args.model_card:
            card = build_model_card(
                results,
                model_id=args.model_id,
                config=model.config,
                base_model=args.base_model,
                license=args.license,
                shortlist_heads_trained=not untrained_heads(model),
            )
        output_dir.mkdir(parents=True, exist_ok=True)
        ranking.plot(output_dir, title=f"{args.dataset} {args.split}")
        written = {"model": args.model_name_or_path, "results": results}
        if card is not None:
            written["model_card"] = {"file": MODEL_CARD, "sha256": hashlib.sha256(str(card).encode()).hexdigest()}
        else:
            _remove_earlier_card(output_dir)
        atomic_write_json(output_dir / "results.json", written, indent=1)
        if card is not None:
            save_model_card(card, output_dir)
    # The other processes leave with the main one: one leaving mid-write can abort the shared backend on exit.
    processes.wait_for_everyone()
    return {"results": results, "table": table}


__all__ = [
    "DATASETS",
    "CorpusCacheError",
    "CorpusRanking",
    "EvaluationArguments",
    "check_evaluation_paths",
    "check_shortlist_heads",
    "corpus_fingerprint",
    "evaluated_as",
    "load_corpus_cache",
    "load_evaluation_corpus",
    "load_retrieval_model",
    "protocols",
    "rank_corpus",
    "run_retrieval_evaluation",
    "save_corpus_cache",
]
