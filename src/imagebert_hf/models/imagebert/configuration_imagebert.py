"""ImageBERT model configuration."""

import sys
from collections.abc import Mapping

from transformers import PreTrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

MOC_LOSS_TYPES = ("cross_entropy", "kl")
REGION_LOCATION_SIZES = (5, 7)
RETRIEVAL_LOSS_TYPES = ("binary", "multiclass", "triplet")
PRETRAINING_LOSS_WEIGHTS = ("mlm_loss_weight", "moc_loss_weight", "mrfr_loss_weight", "itm_loss_weight")
# Settings of the data pipeline that older configs carried but no model ever read; the collator, the pair dataset
# and the recipes hold their own. Configs that still have them load, without them.
REMOVED_FIELDS = (
    "mlm_probability",
    "region_mask_probability",
    "region_zero_probability",
    "itm_negative_probability",
    "retrieval_num_negatives",
)
# Keys a config may carry that ImageBERT does not read, accepted without a warning: `PreTrainedConfig`'s own, what
# transformers writes into saved configs, and BERT's fields (a BERT config.json loads unchanged).
KNOWN_EXTRA_KEYS = frozenset(
    {
        "_name_or_path", "architectures", "auto_map", "chunk_size_feed_forward", "custom_pipelines", "dtype",
        "torch_dtype", "id2label", "label2id", "num_labels", "is_encoder_decoder", "model_type", "output_attentions",
        "output_hidden_states", "problem_type", "return_dict", "transformers_version", "_attn_implementation",
        "attn_implementation", "_commit_hash", "name_or_path", "tokenizer_class", "prefix", "finetuning_task",
        "task_specific_params", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
        "add_cross_attention", "classifier_dropout", "is_decoder", "use_cache", "position_embedding_type",
        "gradient_checkpointing", "pruned_heads", "tie_encoder_decoder", "cross_attention_hidden_size",
        "_experts_implementation",
    }
)  # fmt: skip
# Fields that moved out of the config: `sparse_prediction` is an argument of `ImageBERTForPreTraining.forward`.
# Configs (and code) that still set it load, with a deprecation warning, without it.
DEPRECATED_FIELDS = ("sparse_prediction",)


def _without_tasks_the_package_serves(custom_pipelines: dict) -> dict:
    """A saved folder's `custom_pipelines` entries, less the tasks the installed `imagebert_hf` registered itself.

    transformers' `pipeline(task, model=folder)` runs the folder's own pipeline code for a task its config lists, and
    asks for `trust_remote_code=True` first, even where the installed package registered that task. The package's
    config class (the one `AutoConfig` picks without `trust_remote_code`) drops those tasks, so the installed
    package serves them as it serves folders saved without code. The folder's code copy keeps them: with
    `trust_remote_code=True`, or where the package is not installed, the folder's pipeline runs as published.
    """
    if not __name__.startswith("imagebert_hf.") or not isinstance(custom_pipelines, Mapping):
        return custom_pipelines
    registry = getattr(sys.modules.get("transformers.pipelines"), "PIPELINE_REGISTRY", None)
    if registry is None:  # transformers' pipelines are not imported yet, so nothing registered a task
        return custom_pipelines
    served = {
        task
        for task, entry in registry.supported_tasks.items()
        if getattr(entry.get("impl"), "__module__", "").startswith("imagebert_hf.")
    }
    return {task: entry for task, entry in custom_pipelines.items() if task not in served}


class ImageBERTConfig(PreTrainedConfig):
    r"""
    Configuration of an ImageBERT model: a single-stream BERT over WordPiece tokens and object regions
    (Qi et al. 2020, arXiv 2001.07966). The text fields are BERT's, so a BERT `config.json` loads unchanged; the
    region, pretraining and retrieval fields are ImageBERT's. Defaults give the paper's base model.

    The input sequence is `[CLS] text [SEP]` followed by the regions. Text positions count up from 0; every
    region uses the one position `region_position_id`, since regions have no order.

    Args:
        vocab_size (`int`, *optional*, defaults to 30522):
            Size of the WordPiece vocabulary.
        hidden_size (`int`, *optional*, defaults to 768):
            Width of the encoder.
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Number of transformer layers.
        num_attention_heads (`int`, *optional*, defaults to 12):
            Attention heads per layer.
        intermediate_size (`int`, *optional*, defaults to 3072):
            Width of the feed-forward layer.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Feed-forward activation.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout on embeddings and residual branches.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout on attention probabilities.
        max_position_embeddings (`int`, *optional*, defaults to 512):
            Rows of the position table. Text can be at most `max_position_embeddings - 1` tokens long, since
            row `region_position_id` is reserved for regions.
        type_vocab_size (`int`, *optional*, defaults to 2):
            Rows of the segment table. Text uses segment 0, regions `region_token_type_id`.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialiser.
        layer_norm_eps (`float`, *optional*, defaults to 1e-12):
            LayerNorm epsilon.
        pad_token_id (`int`, *optional*, defaults to 0):
            Id of the padding token.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Whether the MLM decoder shares its weight with the word embeddings, as in BERT.
        region_feature_size (`int`, *optional*, defaults to 2048):
            Size of one region's visual feature (2048 for a ResNet-101 Faster R-CNN).
        region_location_size (`int`, *optional*, defaults to 5):
            Size of the location vector: 5 for the paper's `(x1/W, y1/H, x2/W, y2/H, area/(W*H))`, 7 for UNITER's
            `(x1/W, y1/H, x2/W, y2/H, w/W, h/H, w*h/(W*H))`. The region extractor's `region_location_size` must match.
        region_projection_layer_norm (`bool`, *optional*, defaults to `False`):
            Normalise the projected region feature and the projected location each with its own LayerNorm before
            they are summed (UNITER's `img_layer_norm` and `pos_layer_norm`). The paper sums them directly.
        region_position_embedding (`bool`, *optional*, defaults to `True`):
            Add the position row `region_position_id` to every region, as the paper does. UNITER adds none.
        separate_region_layer_norm (`bool`, *optional*, defaults to `False`):
            Normalise region embeddings with their own LayerNorm (UNITER's image-embedding LayerNorm) instead of the
            one shared with text.
        num_object_classes (`int`, *optional*, defaults to 1600):
            Object classes of the detector (1600 for Visual Genome); the size of the MOC head.
        max_regions (`int`, *optional*, defaults to 100):
            Most regions per image.
        max_text_length (`int`, *optional*, defaults to 44):
            Text tokens per sample, [CLS] and [SEP] included, as the processor pads and truncates them.
        region_position_id (`int`, *optional*):
            The position row shared by all regions. Defaults to `max_position_embeddings - 1`, a row that text of
            ordinary length never uses.
        region_token_type_id (`int`, *optional*, defaults to 1):
            Segment id of the regions.
        mlm_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the masked language modelling loss. The four pretraining weights must not all be zero.
        moc_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the masked object classification loss.
        mrfr_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the masked region feature regression loss.
        itm_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the image-text matching loss.
        moc_loss_type (`str`, *optional*, defaults to `"cross_entropy"`):
            `"cross_entropy"` against the detector's hard label, or `"kl"` against its class distribution.
        retrieval_loss_weights (`dict[str, float]`, *optional*):
            Weights of the retrieval losses by name (`"binary"`, `"multiclass"`, `"triplet"`). Defaults to
            `{"binary": 1.0}`, the paper's best. At least one weight must be positive.
        triplet_margin (`float`, *optional*, defaults to 0.2):
            Margin of the triplet loss.
        contrastive_embedding_size (`int`, *optional*, defaults to 256):
            Size of the unimodal embeddings used to shortlist retrieval candidates.
        contrastive_temperature (`float`, *optional*, defaults to 0.05):
            Temperature of the contrastive loss over those embeddings.
    """

    model_type = "imagebert"

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        pad_token_id: int = 0,
        tie_word_embeddings: bool = True,
        region_feature_size: int = 2048,
        region_location_size: int = 5,
        region_projection_layer_norm: bool = False,
        region_position_embedding: bool = True,
        separate_region_layer_norm: bool = False,
        num_object_classes: int = 1600,
        max_regions: int = 100,
        max_text_length: int = 44,
        region_position_id: int | None = None,
        region_token_type_id: int = 1,
        mlm_loss_weight: float = 1.0,
        moc_loss_weight: float = 1.0,
        mrfr_loss_weight: float = 1.0,
        itm_loss_weight: float = 1.0,
        moc_loss_type: str = "cross_entropy",
        retrieval_loss_weights: dict[str, float] | None = None,
        triplet_margin: float = 0.2,
        contrastive_embedding_size: int = 256,
        contrastive_temperature: float = 0.05,
        **kwargs,
    ):
        removed = sorted(name for name in REMOVED_FIELDS if kwargs.pop(name, None) is not None)
        if removed:
            logger.info(
                f"ImageBERTConfig ignores {', '.join(removed)}: data-pipeline settings the model never reads (the "
                "collator and the recipe hold them)."
            )
        deprecated = sorted(name for name in DEPRECATED_FIELDS if kwargs.pop(name, None) is not None)
        if deprecated:
            logger.warning_once(
                f"ImageBERTConfig ignores {', '.join(deprecated)}: it is no longer a config field. Pass "
                "`sparse_prediction=True` to `ImageBERTForPreTraining.forward` instead (outputs keep their "
                "documented shapes otherwise)."
            )
        unknown = sorted(key for key in kwargs if key not in KNOWN_EXTRA_KEYS and not key.startswith("_"))
        if unknown:
            import difflib
            import inspect

            fields = [name for name in inspect.signature(type(self).__init__).parameters if name not in ("self",)]
            hints = [
                f"{key!r} (did you mean {close[0]!r}?)"
                if (close := difflib.get_close_matches(key, fields, 1))
                else repr(key)
                for key in unknown
            ]
            logger.warning(
                f"ImageBERTConfig got unknown field(s) {', '.join(hints)}: kept on the config as transformers does, "
                "but no part of ImageBERT reads them."
            )
        for name in ("dtype", "torch_dtype"):
            if kwargs.get(name) is not None:
                check_weights_dtype(name, kwargs[name])
        if kwargs.get("custom_pipelines"):
            kwargs["custom_pipelines"] = _without_tasks_the_package_serves(kwargs["custom_pipelines"])
        if __name__.startswith("imagebert_hf."):
            # The installed package's class: a folder's `auto_map` names code files a later save would not write (a
            # publishing save writes its own); the folder's code copy keeps it.
            kwargs.pop("auto_map", None)
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.tie_word_embeddings = tie_word_embeddings
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.region_feature_size = region_feature_size
        self.region_location_size = region_location_size
        self.region_projection_layer_norm = region_projection_layer_norm
        self.region_position_embedding = region_position_embedding
        self.separate_region_layer_norm = separate_region_layer_norm
        self.num_object_classes = num_object_classes
        self.max_regions = max_regions
        self.max_text_length = max_text_length
        self.region_position_id = region_position_id
        self.region_token_type_id = region_token_type_id
        self.mlm_loss_weight = mlm_loss_weight
        self.moc_loss_weight = moc_loss_weight
        self.mrfr_loss_weight = mrfr_loss_weight
        self.itm_loss_weight = itm_loss_weight
        self.moc_loss_type = moc_loss_type
        self.retrieval_loss_weights = retrieval_loss_weights
        self.triplet_margin = triplet_margin
        self.contrastive_embedding_size = contrastive_embedding_size
        self.contrastive_temperature = contrastive_temperature
        self._validate()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # transformers builds the config from the file, then sets the keyword overrides of `from_pretrained` (e.g.
        # `from_pretrained(path, layer_norm_eps=...)`) as attributes, past `__init__`: they get the same checks.
        if not isinstance(config_dict, Mapping):
            raise ValueError(
                f"a model config (config.json) must be a JSON object of fields, got {type(config_dict).__name__}."
            )
        loaded = super().from_dict(config_dict, **kwargs)
        (loaded[0] if kwargs.get("return_unused_kwargs") else loaded)._validate()
        return loaded

    def _validate(self):
        """Checks every field's type and range, and the fields that must agree, naming the field."""
        if self.region_position_id is None:  # the default: the last row of the position table
            check_field(
                "max_position_embeddings", self.max_position_embeddings, *FIELD_RULES["max_position_embeddings"]
            )
            self.region_position_id = self.max_position_embeddings - 1
        for name, (kind, low, high) in FIELD_RULES.items():
            check_field(name, getattr(self, name), kind, low, high)
        if self.pad_token_id is not None:
            check_field("pad_token_id", self.pad_token_id, "int", 0, self.vocab_size - 1)
        from transformers.activations import ACT2FN

        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act must be one of {sorted(ACT2FN)}, got {self.hidden_act!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.region_location_size not in REGION_LOCATION_SIZES:
            raise ValueError(
                f"region_location_size must be one of {REGION_LOCATION_SIZES} (the paper's 5-d or UNITER's 7-d box "
                f"position), got {self.region_location_size}."
            )
        if self.moc_loss_type not in MOC_LOSS_TYPES:
            raise ValueError(f"moc_loss_type must be one of {MOC_LOSS_TYPES}, got {self.moc_loss_type!r}.")
        weights = self.retrieval_loss_weights
        if weights is not None and not isinstance(weights, Mapping):
            raise TypeError(
                f"retrieval_loss_weights must map loss names among {RETRIEVAL_LOSS_TYPES} to weights, e.g. "
                f'{{"binary": 1.0}}, got {weights!r} ({type(weights).__name__}).'
            )
        self.retrieval_loss_weights = dict(weights) if weights else {"binary": 1.0}  # None or empty: the default
        unknown = set(self.retrieval_loss_weights) - set(RETRIEVAL_LOSS_TYPES)
        if unknown:
            raise ValueError(
                f"retrieval_loss_weights has unknown losses {sorted(unknown)}; expected keys among "
                f"{RETRIEVAL_LOSS_TYPES}."
            )
        for loss, weight in self.retrieval_loss_weights.items():
            check_field(f"retrieval_loss_weights[{loss!r}]", weight, "float", 0.0, None)
        # All-zero weights train on nothing: retrieval's forward would return no loss, pretraining's a constant 0.
        if not any(self.retrieval_loss_weights.values()):
            raise ValueError(
                f"retrieval_loss_weights are all zero ({self.retrieval_loss_weights}): retrieval would train on no "
                f"loss; give at least one of {RETRIEVAL_LOSS_TYPES} a positive weight."
            )
        if not any(getattr(self, name) for name in PRETRAINING_LOSS_WEIGHTS):
            raise ValueError(
                f"{', '.join(PRETRAINING_LOSS_WEIGHTS)} are all zero: pretraining would train on no task; give at "
                "least one task a positive weight."
            )
        if not 0 <= self.region_position_id < self.max_position_embeddings:
            raise ValueError(
                f"region_position_id must index the position table of max_position_embeddings="
                f"{self.max_position_embeddings} rows, got {self.region_position_id}."
            )
        if not 0 <= self.region_token_type_id < self.type_vocab_size:
            raise ValueError(
                f"region_token_type_id must be below type_vocab_size ({self.type_vocab_size}), "
                f"got {self.region_token_type_id}."
            )
        if self.max_text_length > self.region_position_id:
            raise ValueError(
                f"max_text_length ({self.max_text_length}) must not reach region_position_id "
                f"({self.region_position_id}), the position row reserved for regions."
            )


WEIGHTS_DTYPES = ("float32", "float16", "bfloat16", "float64")


def check_weights_dtype(name: str, dtype) -> None:
    """Raises ValueError unless `dtype` (a config's `dtype`: a string or a torch dtype) is a floating dtype the
    weights can be loaded in; transformers would turn any other string into an AttributeError of torch's."""
    if str(dtype).removeprefix("torch.") not in WEIGHTS_DTYPES:
        raise ValueError(f"{name} must be one of {WEIGHTS_DTYPES} or null (the weights' dtype), got {dtype!r}.")


# field: (kind, lowest, highest), bounds inclusive (None: unbounded), grouped by rule. "prob<1" is a float in [0, 1).
FIELD_RULES: dict[str, tuple[str, float | None, float | None]] = {
    **dict.fromkeys(
        (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "type_vocab_size",
            "region_feature_size",
            "region_location_size",
            "num_object_classes",
            "max_regions",
            "contrastive_embedding_size",
        ),
        ("int", 1, None),
    ),
    **dict.fromkeys(("max_position_embeddings", "max_text_length"), ("int", 2, None)),
    **dict.fromkeys(("region_position_id", "region_token_type_id"), ("int", 0, None)),
    **dict.fromkeys(("hidden_dropout_prob", "attention_probs_dropout_prob"), ("prob<1", 0.0, None)),
    **dict.fromkeys(
        (
            "initializer_range",
            "mlm_loss_weight",
            "moc_loss_weight",
            "mrfr_loss_weight",
            "itm_loss_weight",
            "triplet_margin",
        ),
        ("float", 0.0, None),
    ),
    **dict.fromkeys(("layer_norm_eps", "contrastive_temperature"), ("positive", None, None)),
    **dict.fromkeys(
        (
            "tie_word_embeddings",
            "region_projection_layer_norm",
            "region_position_embedding",
            "separate_region_layer_norm",
        ),
        ("bool", None, None),
    ),
}


def check_field(name: str, value, kind: str, low, high) -> None:
    """Raises `TypeError` / `ValueError`, naming `name`, unless `value` is of `kind` within `[low, high]`.

    `kind` is `"bool"`, `"int"`, `"float"`, `"positive"` (a number > 0) or `"prob<1"` (a float in [0, 1)); `low`
    and `high` are inclusive bounds, None for unbounded. `FIELD_RULES` gives `(kind, low, high)` for every numeric
    and boolean field of `ImageBERTConfig`; recipes, the curation config and the extractor check their own values
    with the same rules and messages.
    """
    if kind == "bool":
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be true or false, got {value!r} ({type(value).__name__}).")
        return
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if kind == "positive" and not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}.")
    if kind == "prob<1" and not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
    if (low is not None and value < low) or (high is not None and value > high):
        expected = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {expected}, got {value!r}.")


# A run's seed: the range accelerate's `set_seed` takes (numpy's legacy seeding), for the scripts' --seed and recipes.
SEED_RULE = ("int", 0, 2**32 - 1)


def check_flag_values(args, rules: dict[str, tuple]) -> None:
    """`check_field` on each attribute of `args` that `rules` names (`name: (kind, lowest, highest)`) and that is set
    (not None), named as its flag (`--name`). A value of the wrong type (set in code rather than parsed from the
    command line) raises ValueError too, so that a script ends on it with one line."""
    for name, rule in rules.items():
        value = getattr(args, name)
        if value is None:
            continue
        try:
            check_field(f"--{name}", value, *rule)
        except TypeError as error:
            raise ValueError(str(error)) from None


__all__ = [
    "FIELD_RULES",
    "KNOWN_EXTRA_KEYS",
    "SEED_RULE",
    "WEIGHTS_DTYPES",
    "ImageBERTConfig",
    "check_field",
    "check_flag_values",
    "check_weights_dtype",
]
