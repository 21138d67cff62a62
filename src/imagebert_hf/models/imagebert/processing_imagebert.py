"""ImageBERTProcessor: a BERT tokenizer and the RoI extractor, giving everything `ImageBERTModel` takes."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torch_tensor, logging

from .configuration_imagebert import FIELD_RULES, ImageBERTConfig, check_field
from .image_processing_imagebert import ImageBERTRoIExtractor, check_region_sizes
from .region_batching import check_region_values, pad_region_records


logger = logging.get_logger(__name__)

PADDING = ("max_length", "longest")
PROCESSOR_CONFIG_NAME = "processor_config.json"
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
REGION_INPUTS = ("region_features", "region_locations", "region_attention_mask")


class ImageBERTProcessor(ProcessorMixin):
    r"""
    Bundles a BERT tokenizer and an [`ImageBERTRoIExtractor`]: `processor(images=..., text=...)` returns a
    `BatchFeature` with the inputs of `ImageBERTModel` (names and shapes in `docs/architecture.md`):

    - `input_ids`, `attention_mask`, `token_type_ids` of shape (B, T): `[CLS] text [SEP]`, padded with `[PAD]`;
    - `region_features` (B, R, F), `region_locations` (B, R, 5; 7 for UNITER's layout), `region_attention_mask`
      (B, R), zero-padded;
    - with `return_region_labels=True`, `region_class_labels` (B, R; -100 on padding and where the extractor has no
      label) and `region_class_probs` (B, R, C; when the regions carry distributions), the MOC targets.

    T is `max_text_length` and R `max_regions` (the model config's lengths) with `padding="max_length"`, or the
    longest in the batch (capped by them) with `padding="longest"`. `regions=` takes region records (from the
    extractor or `load_region_cache`) instead of images, so cached features never meet the extractor again. A
    batch gives what its samples give one at a time.

    Args:
        image_processor ([`ImageBERTRoIExtractor`]):
            The region extractor.
        tokenizer ([`BertTokenizer`]):
            A WordPiece tokenizer with `[CLS]`, `[SEP]`, `[PAD]`.
        max_text_length (`int`, *optional*, defaults to 44):
            Text tokens per sample, `[CLS]` and `[SEP]` included (the config's `max_text_length`).
        max_regions (`int`, *optional*, defaults to 100):
            Regions per sample (the config's `max_regions`).
    """

    def __init__(
        self,
        image_processor: ImageBERTRoIExtractor,
        tokenizer,
        max_text_length: int = 44,
        max_regions: int = 100,
        **kwargs,
    ):
        # Checked as the model config's fields of the same names: a saved processor_config.json is user input.
        for name, value in (("max_text_length", max_text_length), ("max_regions", max_regions)):
            check_field(name, value, *FIELD_RULES[name])
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, **kwargs)
        self.max_text_length = max_text_length
        self.max_regions = max_regions
        check_tokenizer_vocabulary(tokenizer)

    @classmethod
    def from_model_config(
        cls, config: ImageBERTConfig, tokenizer, image_processor: ImageBERTRoIExtractor | None = None
    ) -> ImageBERTProcessor:
        """A processor with the config's lengths; checks that the extractor's regions fit the config."""
        image_processor = image_processor or ImageBERTRoIExtractor(
            max_regions=config.max_regions, region_location_size=config.region_location_size
        )
        processor = cls(image_processor, tokenizer, config.max_text_length, config.max_regions)
        processor.check_model_config(config)
        return processor

    def check_model_config(self, config: ImageBERTConfig, build_backend: bool = True) -> None:
        """Raises ValueError, naming both numbers, when what the processor gives does not fit `config`'s model: the
        lengths, the tokenizer's size, the region location layout and, with `build_backend` (which builds the
        extractor's model to learn them), the region feature size and class count. Loading a processor or a
        pipeline checks what needs no backend; the pipeline checks the rest before it first extracts regions."""
        extractor = self.image_processor
        if build_backend:
            check_region_sizes(
                extractor.region_feature_size, extractor.num_object_classes, config, extractor.region_location_size
            )
        else:
            check_region_sizes(None, None, config, extractor.region_location_size)
        self.check_lengths(config)
        check_tokenizer_vocabulary(self.tokenizer, config)

    def check_lengths(self, config: ImageBERTConfig) -> None:
        """Raises ValueError, naming both numbers, when the processor pads text or regions beyond what `config`'s
        model takes (its `max_text_length`, within the position table, and its `max_regions`). Cheap: the extractor's
        backend is not built, so the pipeline checks this whenever it is given a processor."""
        for name in ("max_text_length", "max_regions"):
            value, limit = getattr(self, name), getattr(config, name)
            if value > limit:
                raise ValueError(
                    f"the processor's {name} {value} exceeds the model config's {name} {limit}; save the processor "
                    f"with the model's lengths (ImageBERTProcessor.from_model_config) or lower {name}."
                )

    def regions_to_extract(self, max_regions: int | None = None) -> int:
        """The regions a photo gets from the extractor: `max_regions` (this processor's by default), but no more
        than the extractor's own limit. A region cache written with that extractor (what the model trained on)
        holds at most that many, so a larger model limit must not give a photo more regions when it is served."""
        return min(self.max_regions if max_regions is None else max_regions, self.image_processor.max_regions)

    @property
    def model_input_names(self) -> list[str]:
        return list(TEXT_INPUTS + REGION_INPUTS)

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        regions: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
        boxes: Any = None,
        box_format: str = "xyxy",
        padding: str = "max_length",
        truncation: bool = True,
        max_length: int | None = None,
        max_regions: int | None = None,
        return_region_labels: bool = False,
        return_tensors: str | None = "pt",
        **extractor_kwargs,
    ) -> BatchFeature:
        """Tokenizes `text` and extracts (or takes) the regions of `images`, padded into model inputs.

        Args:
            images: One image or a list (anything `ImageBERTRoIExtractor.extract` takes).
            text: One string or a list, one per image.
            regions: Region records instead of `images` (one dict or a list).
            boxes: Boxes per image for the extractor (see `ImageBERTRoIExtractor.extract`).
            box_format: `"xyxy"` or `"xywh"` for `boxes`.
            padding: `"max_length"` (to `max_text_length` / `max_regions`) or `"longest"` (in the batch).
            truncation: Truncate text to the length limit.
            max_length: Text length for this call instead of `max_text_length`.
            max_regions: Region count for this call instead of `max_regions`.
            return_region_labels: Add `region_class_labels` and, when available, `region_class_probs`.
            return_tensors: `"pt"` (default), `"np"` or None (numpy arrays as well).
            **extractor_kwargs: Per-call extractor settings (e.g. `grid_sizes`).

        Returns:
            A `BatchFeature` of model inputs.
        """
        texts, records = self._check_call(images, text, regions, padding, max_length, max_regions)
        max_length = self.max_text_length if max_length is None else max_length
        max_regions = self.max_regions if max_regions is None else max_regions
        data: dict[str, Any] = {}
        if texts is not None:
            data.update(self._encode_text(texts, padding, truncation, max_length))
        if images is not None:
            extractor_kwargs.setdefault("max_regions", self.regions_to_extract(max_regions))
            records = self.image_processor.extract(images, boxes=boxes, box_format=box_format, **extractor_kwargs)
        elif boxes is not None or extractor_kwargs:
            raise ValueError(f"boxes and extractor settings {sorted(extractor_kwargs)} need images.")
        if records is not None:
            if texts is not None and len(records) != len(texts):
                raise ValueError(f"got {len(texts)} texts and {len(records)} images/regions; give one text per image.")
            self._check_records(records, return_region_labels)
            data.update(self._pad_regions(records, padding, max_regions, return_region_labels))
            names = [f"regions[{i}] ({record.get('image_id')})" for i, record in enumerate(records)]
            check_region_values(data, names)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _check_call(self, images, text, regions, padding, max_length, max_regions):
        """The processor's one input check: text types and emptiness, lengths, what is given with what. Returns the
        texts and the region records as lists (None where not given). Region records are checked by
        `_check_records` once they exist."""
        if padding not in PADDING:
            raise ValueError(f"padding must be one of {PADDING} (regions cannot be ragged), got {padding!r}.")
        if images is not None and regions is not None:
            raise ValueError("pass images or regions, not both.")
        if images is None and regions is None and text is None:
            raise ValueError("pass at least text, images or regions.")
        for name, value, lowest in (("max_length", max_length, 2), ("max_regions", max_regions, 1)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
            if value < lowest:
                raise ValueError(f"{name} must be at least {lowest}, got {value}.")
        texts = None
        if text is not None:
            if isinstance(text, str):
                texts = [text]
            elif isinstance(text, (Sequence, np.ndarray)):
                texts = list(text)
            else:
                raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}.")
            if not texts:
                raise ValueError("text is an empty list: give one string per sample.")
            for i, item in enumerate(texts):
                if not isinstance(item, str):
                    raise TypeError(f"text[{i}] must be a string, got {type(item).__name__} {item!r:.60}.")
                if not item.strip():
                    raise ValueError(f"text[{i}] is empty ({item!r}); give every sample some text.")
        records = None
        if regions is not None:
            if isinstance(regions, dict):
                records = [regions]
            elif isinstance(regions, Sequence) and not isinstance(regions, (str, bytes)):
                records = list(regions)
            else:
                raise TypeError(
                    f"regions must be a region record (dict) or a list of them, got {type(regions).__name__}."
                )
            if not records:
                raise ValueError("regions is an empty list: give one region record per sample.")
            for i, record in enumerate(records):
                if not isinstance(record, dict):
                    raise TypeError(f"regions[{i}] must be a region record (dict), got {type(record).__name__}.")
        return texts, records

    def _check_records(self, records: list[dict[str, Any]], return_labels: bool) -> None:
        """Values that padding cannot see: NaN/inf features or locations, class labels beyond the extractor's
        classes (never clamped: a wrong label would be trained on)."""
        num_classes = self.image_processor.num_object_classes if return_labels else 0
        for i, record in enumerate(records):
            if record.get("error"):
                continue  # padding names the failed record
            for name in ("region_features", "region_locations"):
                if name in record and not np.isfinite(_as_numbers(record[name], f"regions[{i}]", record, name)).all():
                    raise ValueError(
                        f"regions[{i}] ({record.get('image_id')}): {name} contain NaN or infinite values."
                    )
            features = record.get("region_features")
            if features is not None and (np.ndim(features) == 0 or len(features) == 0):
                raise ValueError(
                    f"regions[{i}] ({record.get('image_id')}): the record has no regions (region_features of shape "
                    f"{tuple(np.shape(features))}); every image needs at least one region (drop it, or extract its "
                    "regions again)."
                )
            labels = record.get("region_class_labels")
            if return_labels and labels is not None and num_classes:
                labels = np.asarray(labels)
                bad = (labels != -100) & ((labels < 0) | (labels >= num_classes))
                if bad.any():
                    raise ValueError(
                        f"regions[{i}] ({record.get('image_id')}): region_class_labels {labels[bad][:5].tolist()} "
                        f"are outside [0, {num_classes}) (the extractor's classes; -100 for none)."
                    )

    def _encode_text(self, texts: list[str], padding: str, truncation: bool, max_length: int) -> dict[str, np.ndarray]:
        return tokenize_texts(self.tokenizer, texts, padding=padding, truncation=truncation, max_length=max_length)

    def _pad_regions(
        self, records: list[dict[str, Any]], padding: str, max_regions: int, return_labels: bool
    ) -> dict[str, np.ndarray]:
        return pad_region_records(
            records,
            padding,
            max_regions,
            return_labels=return_labels,
            return_probs=return_labels,
            feature_size=self.image_processor.region_feature_size,
            num_classes=self.image_processor.num_object_classes,
            location_size=self.image_processor.region_location_size,
            return_tensors="np",
        )

    # ---------------------------------------------------------------- saving and loading

    def to_dict(self) -> dict[str, Any]:
        # ProcessorMixin would deep-copy every attribute, the extractor's backend model included.
        output = {
            "image_processor": self.image_processor.to_dict(),
            "max_text_length": self.max_text_length,
            "max_regions": self.max_regions,
            "processor_class": self.__class__.__name__,
        }
        if getattr(self, "auto_map", None):
            output["auto_map"] = self.auto_map
        return output

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> list[str]:
        """Saves the tokenizer files, `processor_config.json` and the extractor's weights
        (`roi_extractor.safetensors`, when its backend has weights)."""
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        weights = self.image_processor.save_weights(save_directory)
        return files + ([weights] if weights else [])

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> ImageBERTProcessor:
        """Loads a saved processor; in a local folder that also holds the model's `config.json`, it is checked against
        that config (`check_model_config` without building the backend), so an edited `processor_config.json` or
        tokenizer cannot give what the model cannot take."""
        register_processing()
        read_saved_processor_config(pretrained_model_name_or_path)
        check_tokenizer_files(pretrained_model_name_or_path)
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        loaded = processor[0] if isinstance(processor, tuple) else processor
        config_file = os.path.join(os.fspath(pretrained_model_name_or_path), "config.json")
        if os.path.isfile(config_file):
            try:
                with open(config_file, encoding="utf-8") as handle:
                    model_type = json.load(handle).get("model_type")
            except (OSError, ValueError, AttributeError):
                model_type = None  # not a model config this processor can be checked against; the model load says why
            if model_type == ImageBERTConfig.model_type:
                config = ImageBERTConfig.from_pretrained(pretrained_model_name_or_path)
                loaded.check_model_config(config, build_backend=False)
        return processor


def read_saved_processor_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The `processor_config.json` of a local folder, checked for the layout `save_pretrained` writes (a JSON object
    whose `image_processor` is an object and whose `processor_class` is a string); None when the folder has no
    such file (a Hub repository is read by transformers itself). Raises ValueError naming the file and the field:
    transformers would otherwise fail on it with an AttributeError naming neither."""
    file = os.path.join(os.fspath(folder), PROCESSOR_CONFIG_NAME)
    try:
        with open(file, encoding="utf-8") as handle:
            text = handle.read()
    except OSError:
        return None
    try:
        saved = json.loads(text)
    except ValueError as error:
        raise ValueError(f"{file} is not valid JSON ({error}); save the processor again.") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(saved).__name__}; save the processor again.")
    for field, kind, expected in (("image_processor", dict, "an object"), ("processor_class", str, "a string")):
        if field in saved and not isinstance(saved[field], kind):
            raise ValueError(
                f"{file}: {field} must be {expected}, got {saved[field]!r:.80}; save the processor again."
            )
    return saved


TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def check_tokenizer_files(folder: str | os.PathLike) -> None:
    """Raises ValueError naming the file when a JSON file of the tokenizer saved in the local `folder` does not parse
    (the tokenizers library reports it with no file name); files that are absent, and Hub repositories, are left to
    transformers."""
    for name in TOKENIZER_JSON_FILES:
        file = os.path.join(os.fspath(folder), name)
        try:
            with open(file, encoding="utf-8") as handle:
                json.load(handle)
        except OSError:
            continue
        except ValueError as error:
            raise ValueError(f"{file} is not valid JSON ({error}); save the tokenizer again.") from None


def tokenize_as_text(tokenizer, texts: Sequence[str], *, name: str = "text", **kwargs):
    """`tokenizer(texts, **kwargs)` with every text read as text: a special token's spelling inside a caption or
    query (`"[SEP]"`, `"[PAD]"`) is split into ordinary tokens (`split_special_tokens=True`) instead of becoming that
    control token, so `"a red [SEP] circle"` holds no separator. Texts without such a spelling get the same ids as
    without the option. Raises ValueError naming `name[i]` and the token for a Python tokenizer (transformers'
    `BertTokenizerLegacy`), which cannot split them: the model would read the text's control token as its own."""
    texts = list(texts)
    asked_mask = kwargs.pop("return_special_tokens_mask", False)
    # Only fast tokenizers honour the option; a Python one would also stop matching its added tokens with it, and
    # cannot split special tokens anyway (`check_text_tokens` refuses their spellings there).
    split = {"split_special_tokens": True} if getattr(tokenizer, "is_fast", False) else {}
    encoded = tokenizer(texts, return_special_tokens_mask=True, **split, **kwargs)
    check_text_tokens(tokenizer, texts, encoded["input_ids"], encoded["special_tokens_mask"], name)
    if not asked_mask:
        del encoded["special_tokens_mask"]
    return encoded


def check_text_tokens(tokenizer, texts: Sequence[str], input_ids, special_tokens_mask, name: str = "text") -> None:
    """Raises ValueError naming `name[i]` and the token when a text's own tokens (those `special_tokens_mask` does
    not mark as added by the tokenizer) hold a control token: `[CLS]`, `[SEP]`, `[PAD]`, `[MASK]`. The unknown token
    is allowed: it is what any word outside the vocabulary becomes."""
    control = sorted(set(getattr(tokenizer, "all_special_ids", ())) - {getattr(tokenizer, "unk_token_id", None)})
    if not control or not len(texts):
        return
    rows = [np.asarray(row).reshape(-1) for row in input_ids]
    masks = [np.asarray(row).reshape(-1) for row in special_tokens_mask]
    ids, added = np.concatenate(rows), np.concatenate(masks)
    bad = np.flatnonzero((added == 0) & np.isin(ids, control))
    if len(bad):
        i = int(np.searchsorted(np.cumsum([len(row) for row in rows]), bad[0], side="right"))
        token = tokenizer.convert_ids_to_tokens(int(ids[bad[0]]))
        raise ValueError(
            f"{name}[{i}] ({texts[i]!r:.60}) holds {token!r}, which this tokenizer ({type(tokenizer).__name__}) reads "
            "as its control token (only a fast tokenizer can read it as text); remove it from the text or use the fast "
            "tokenizer (AutoTokenizer)."
        )


def tokenize_texts(
    tokenizer, texts: list[str], *, padding: str, truncation: bool, max_length: int, name: str = "text"
) -> dict[str, np.ndarray]:
    """`[CLS] text [SEP]` token ids, attention mask and token types of `texts` as int64 arrays, padded on the right
    whatever the tokenizer's saved `padding_side` (the model reads the sequence summary at position 0, so a
    left-padded row would be summarised by a padding token). Raises ValueError naming `name[i]` for a text that
    gives no token but the special ones (only invisible or control characters: it would be scored as no text). A
    special token's spelling in a text is read as text (see `tokenize_as_text`)."""
    encoded = tokenize_as_text(
        tokenizer,
        texts,
        name=name,
        padding=padding,
        truncation=truncation,
        max_length=max_length,
        padding_side="right",
        return_attention_mask=True,
        return_token_type_ids=True,
        return_special_tokens_mask=True,
    )
    lengths = {len(ids) for ids in encoded["input_ids"]}
    if len(lengths) > 1:
        raise ValueError(f"text longer than max_length={max_length}; pass truncation=True.")
    words = (1 - np.asarray(encoded["special_tokens_mask"])) * np.asarray(encoded["attention_mask"])
    for i in np.flatnonzero(words.sum(axis=1) == 0):
        raise ValueError(
            f"{name}[{i}] ({texts[i]!r:.60}) has no words: it holds only spaces, invisible or control characters."
        )
    return {key: np.asarray(encoded[key], dtype=np.int64) for key in TEXT_INPUTS}


def check_tokenizer_vocabulary(tokenizer, config: ImageBERTConfig | None = None) -> None:
    """Raises ValueError when `tokenizer` cannot make the model's text input: it knows nothing but its special
    tokens (what transformers loads from a saved folder whose vocabulary, tokenizer.json or vocab.txt, is missing:
    every word would become the unknown token and every text score the same), it lacks `[CLS]`, `[SEP]` or
    `[PAD]` (a folder saved without tokenizer_config.json or special_tokens_map.json), or, given the model's
    `config`, it has more tokens than the model's vocabulary (ids the embedding table has no row for)."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if config is not None and len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"the tokenizer ({name}) has {len(tokenizer)} tokens but the model config's vocab_size is "
            f"{config.vocab_size}: save the tokenizer the model was trained with."
        )
    specials = set(getattr(tokenizer, "all_special_tokens", ()))
    if specials and len(tokenizer) <= len(specials):
        raise ValueError(
            f"the tokenizer ({name}) knows only its {len(tokenizer)} special tokens {sorted(specials)}: every word "
            f"would become {tokenizer.unk_token!r}. Its vocabulary file (tokenizer.json or vocab.txt) is missing or "
            "empty; save the tokenizer again."
        )
    missing = [role for role in ("cls_token", "sep_token", "pad_token") if getattr(tokenizer, role, None) is None]
    if missing:
        raise ValueError(
            f"the tokenizer ({name}) has no {', '.join(missing)}; the model's text input is [CLS] text [SEP] padded "
            "with [PAD]. Its tokenizer_config.json (or special_tokens_map.json) is missing or lacks them; save the "
            "tokenizer again."
        )


def as_float32_array(values: Any) -> np.ndarray:
    """A region record's `region_features` or `region_locations` as a float32 array: lists, arrays, and torch
    tensors of any dtype on any device (numpy has no bfloat16: a floating tensor converts through float32, exactly).
    Raises TypeError or ValueError for values that are not numbers, RuntimeError for a tensor without data."""
    if is_torch_tensor(values):
        values = values.detach().cpu()
        if values.is_floating_point():
            values = values.float()
    return np.asarray(values, dtype=np.float32)


def _as_numbers(values: Any, where: str, record: dict[str, Any], name: str) -> np.ndarray:
    """`values` as a float32 array; values that are not numbers (strings, objects) raise naming the record."""
    try:
        return as_float32_array(values)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{where} ({record.get('image_id')}): {name} must hold numbers ({error}).") from error


def check_processor_config(processor: ImageBERTProcessor, config: ImageBERTConfig) -> None:
    """Raises ValueError, naming both numbers, when `processor` produces inputs `config`'s model cannot take."""
    processor.check_model_config(config)


def register_processing() -> None:
    """Registers the extractor with `AutoImageProcessor` and the processor with `AutoProcessor` (idempotent)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

    AutoConfig.register(ImageBERTConfig.model_type, ImageBERTConfig, exist_ok=True)
    AutoImageProcessor.register(
        ImageBERTConfig,
        image_processor_classes={"torchvision": ImageBERTRoIExtractor, "pil": ImageBERTRoIExtractor},
        exist_ok=True,
    )
    AutoProcessor.register(ImageBERTConfig, ImageBERTProcessor, exist_ok=True)


__all__ = [
    "ImageBERTProcessor",
    "as_float32_array",
    "check_processor_config",
    "check_text_tokens",
    "check_tokenizer_files",
    "check_tokenizer_vocabulary",
    "read_saved_processor_config",
    "register_processing",
    "tokenize_as_text",
    "tokenize_texts",
]
