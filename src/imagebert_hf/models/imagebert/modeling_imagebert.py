"""ImageBERT: a single-stream BERT over WordPiece tokens and object regions (Qi et al. 2020, arXiv 2001.07966).

Parameter names follow BERT's (`embeddings.word_embeddings`, `encoder.layer.N.attention.self.query`, `cls.predictions`,
...), so a BERT checkpoint loads into the text embeddings, the encoder and the MLM head without remapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput, logging

from .configuration_imagebert import ImageBERTConfig


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ImageBERTModelOutput(ModelOutput):
    r"""
    Output of [`ImageBERTModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, text_length + num_regions, hidden_size)`):
            Hidden states of the last layer: the text positions first, then the regions.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            The first position ([CLS], or the first region when there is no text) after the pooler's dense + tanh.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
            The embeddings and the output of every layer, each `(batch_size, sequence_length, hidden_size)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True`):
            Attention probabilities of every layer, each `(batch_size, num_heads, sequence_length, sequence_length)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ImageBERTForPreTrainingOutput(ModelOutput):
    r"""
    Output of [`ImageBERTForPreTraining`]. Each loss is present only when its targets were given.

    Args:
        loss (`torch.FloatTensor` of shape `()`): weighted sum of the task losses that were computed.
        mlm_loss (`torch.FloatTensor` of shape `()`): masked language modelling loss.
        moc_loss (`torch.FloatTensor` of shape `()`): masked object classification loss (cross-entropy or KL).
        mrfr_loss (`torch.FloatTensor` of shape `()`): masked region feature regression loss (mean squared error).
        itm_loss (`torch.FloatTensor` of shape `()`): image-text matching loss.
        mlm_logits (`torch.FloatTensor` of shape `(batch_size, text_length, vocab_size)`): word scores. With
            `config.sparse_prediction` and `labels` given: `(num_targets, vocab_size)`, the scores of the tokens
            that have an MLM target, in row-major order.
        moc_logits (`torch.FloatTensor` of shape `(batch_size, num_regions, num_object_classes)`): object class scores.
            With `config.sparse_prediction` and `masked_regions` given: `(num_masked, num_object_classes)`, for the
            masked regions of matched pairs only.
        mrfr_predictions (`torch.FloatTensor` of shape `(batch_size, num_regions, region_feature_size)`):
            reconstructed region features; `(num_masked, region_feature_size)` like `moc_logits`.
        itm_logits (`torch.FloatTensor` of shape `(batch_size, 2)`): scores of "not matched" and "matched".
        hidden_states, attentions: as in [`ImageBERTModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    mlm_loss: torch.FloatTensor | None = None
    moc_loss: torch.FloatTensor | None = None
    mrfr_loss: torch.FloatTensor | None = None
    itm_loss: torch.FloatTensor | None = None
    mlm_logits: torch.FloatTensor | None = None
    moc_logits: torch.FloatTensor | None = None
    mrfr_predictions: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ImageBERTForImageTextRetrievalOutput(ModelOutput):
    r"""
    Output of [`ImageBERTForImageTextRetrieval`]. Each loss is present only when it was computed.

    Args:
        loss (`torch.FloatTensor` of shape `()`): the retrieval losses weighted by `config.retrieval_loss_weights`.
        binary_loss (`torch.FloatTensor` of shape `()`): binary cross-entropy of each pair's score.
        multiclass_loss (`torch.FloatTensor` of shape `()`): softmax cross-entropy over each group of candidates.
        triplet_loss (`torch.FloatTensor` of shape `()`): hinge loss between each positive and its negatives.
        logits (`torch.FloatTensor` of shape `(batch_size,)`): relevance score of each (text, regions) pair; its
            sigmoid is the probability that they match.
        hidden_states, attentions: as in [`ImageBERTModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    binary_loss: torch.FloatTensor | None = None
    multiclass_loss: torch.FloatTensor | None = None
    triplet_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# --------------------------------------------------------------------------------------------------------------------
# Input checks: every malformed input fails here, naming the argument, rather than deep inside torch.
# --------------------------------------------------------------------------------------------------------------------


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _expect_shape(name: str, tensor: torch.Tensor | None, expected: tuple, meaning: str):
    """Raises a ValueError unless `tensor` has the `expected` shape (None in `expected` matches any size)."""
    if tensor is None:
        return
    got = _shape(tensor)
    if len(got) != len(expected) or any(e is not None and g != e for g, e in zip(got, expected)):
        shown = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{name} has shape {got}; expected {shown} ({meaning}).")


def check_model_inputs(
    config: ImageBERTConfig,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    region_features: torch.Tensor | None,
    region_locations: torch.Tensor | None,
    region_attention_mask: torch.Tensor | None,
) -> tuple[int, int, int]:
    """Validates the model inputs against each other and the config; returns (batch_size, text_length, num_regions)."""
    if input_ids is None and region_features is None:
        raise ValueError("Give input_ids, region_features or both; got neither.")
    if (region_features is None) != (region_locations is None):
        given, missing = ("region_features", "region_locations")[:: 1 if region_locations is None else -1]
        raise ValueError(f"{given} was given without {missing}; regions need both.")

    batch_size, text_length, num_regions = None, 0, 0
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids has shape {_shape(input_ids)}; expected (batch_size, text_length).")
        batch_size, text_length = input_ids.shape
        _expect_shape("attention_mask", attention_mask, (batch_size, text_length), "one entry per text token")
        _expect_shape("token_type_ids", token_type_ids, (batch_size, text_length), "one entry per text token")

    if region_features is not None:
        if region_features.dim() != 3 or region_features.shape[-1] != config.region_feature_size:
            raise ValueError(
                f"region_features has shape {_shape(region_features)}; expected (batch_size, num_regions, "
                f"{config.region_feature_size}) for region_feature_size={config.region_feature_size}."
            )
        if batch_size is not None and region_features.shape[0] != batch_size:
            raise ValueError(
                f"region_features has batch size {region_features.shape[0]} but input_ids has {batch_size}; "
                "text and regions must come in the same number of samples."
            )
        batch_size, num_regions = region_features.shape[:2]
        if num_regions > config.max_regions:
            raise ValueError(
                f"region_features has {num_regions} regions per sample; expected at most max_regions="
                f"{config.max_regions} from the config."
            )
        _expect_shape(
            "region_locations",
            region_locations,
            (batch_size, num_regions, config.region_location_size),
            "(x1/W, y1/H, x2/W, y2/H, area/(W*H)) per region",
        )
        _expect_shape("region_attention_mask", region_attention_mask, (batch_size, num_regions), "one per region")
        max_text = config.region_position_id
        if text_length > max_text:
            raise ValueError(
                f"input_ids has {text_length} tokens; with regions, text can have at most {max_text} tokens "
                f"(position {config.region_position_id} is the regions')."
            )
    elif text_length > config.max_position_embeddings:
        raise ValueError(
            f"input_ids has {text_length} tokens; expected at most max_position_embeddings="
            f"{config.max_position_embeddings}."
        )
    _check_value_ranges(config, input_ids, region_locations, region_attention_mask)
    return batch_size, text_length, num_regions


def _check_value_ranges(config, input_ids, region_locations, region_attention_mask):
    """Token ids within the vocabulary and real regions' locations in [0, 1], read back in one device sync."""
    statistics = []
    if input_ids is not None and input_ids.numel():
        statistics += [input_ids.min(), input_ids.max()]
    if region_locations is not None and region_locations.numel():
        real = torch.ones_like(region_locations[..., 0], dtype=torch.bool)
        if region_attention_mask is not None:
            real = region_attention_mask.bool()
        # Padding is replaced by a harmless 0.5 so that only real regions decide the range.
        locations = region_locations.float().masked_fill(~real[..., None], 0.5)
        statistics += [locations.min(), locations.max(), torch.isfinite(locations).all().float()]
    if not statistics:
        return
    values = torch.stack([value.float() for value in statistics]).tolist()
    if input_ids is not None and input_ids.numel():
        lowest_id, highest_id, *values = values
        if lowest_id < 0 or highest_id >= config.vocab_size:
            raise ValueError(
                f"input_ids holds ids in [{int(lowest_id)}, {int(highest_id)}]; expected ids in "
                f"[0, {config.vocab_size}) for vocab_size={config.vocab_size}."
            )
    if values:
        lowest, highest, finite = values
        if lowest < -1e-4 or highest > 1 + 1e-4 or not finite:
            raise ValueError(
                f"region_locations holds values in [{lowest:.4g}, {highest:.4g}]; expected coordinates "
                "normalised by the image size, all in [0, 1]."
            )


# --------------------------------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------------------------------

_DROPOUT_LEVELS = 2**15


def dropout(hidden_states: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout`, with the keep mask drawn as 15-bit integers on CPU.

    torch's CPU dropout draws each element through `bernoulli_`, which takes about 13% of a base-size training
    step: 19 ms forward and backward over the attention probabilities of one layer (batch 8, length 144), against
    12 ms here. An element is kept when a uniform integer in
    [0, 2**15) is at least round(p * 2**15), so it is dropped with probability p to within 2**-16, and the kept ones
    are scaled by the exact inverse of their keep probability, so expectations are unchanged. Other devices keep
    torch's kernels, which are fast there.
    """
    if not training or not 0.0 < p < 1.0 or hidden_states.device.type != "cpu":
        return F.dropout(hidden_states, p, training)
    threshold = round(p * _DROPOUT_LEVELS)
    keep = torch.empty(hidden_states.shape, dtype=torch.int16).random_(0, _DROPOUT_LEVELS) >= threshold
    return hidden_states * keep.to(hidden_states.dtype).mul_(_DROPOUT_LEVELS / (_DROPOUT_LEVELS - threshold))


class ImageBERTDropout(nn.Dropout):
    """`nn.Dropout` through `dropout` above (same module tree and settings as BERT's)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return dropout(hidden_states, self.p, self.training)


# --------------------------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------------------------


class ImageBERTEmbeddings(nn.Module):
    """Text embeddings as BERT's; region embeddings from a projected feature and location, one shared position.

    The UNITER layout is a configuration of the same module: `region_projection_layer_norm` normalises the two
    projections before they are summed, `region_position_embedding=False` leaves out the shared position row, and
    `separate_region_layer_norm` gives regions their own final LayerNorm.
    """

    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.region_feature_projection = nn.Linear(config.region_feature_size, config.hidden_size)
        self.region_location_projection = nn.Linear(config.region_location_size, config.hidden_size)
        if config.region_projection_layer_norm:
            self.region_feature_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.region_location_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.separate_region_layer_norm:
            self.region_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = ImageBERTDropout(config.hidden_dropout_prob)

    def embed_text(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings(token_type_ids)
        )

    def embed_regions(self, region_features: torch.Tensor, region_locations: torch.Tensor) -> torch.Tensor:
        dtype = self.region_feature_projection.weight.dtype
        shared = self.token_type_embeddings.weight[self.config.region_token_type_id]
        if self.config.region_position_embedding:
            shared = shared + self.position_embeddings.weight[self.config.region_position_id]
        features = self.region_feature_projection(region_features.to(dtype))
        locations = self.region_location_projection(region_locations.to(dtype))
        if self.config.region_projection_layer_norm:
            features = self.region_feature_layer_norm(features)
            locations = self.region_location_layer_norm(locations)
        return features + locations + shared

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        region_features: torch.Tensor | None = None,
        region_locations: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # LayerNorm acts per position, so normalising each part equals normalising their concatenation.
        parts = []
        if input_ids is not None:
            parts.append(self.LayerNorm(self.embed_text(input_ids, token_type_ids)))
        if region_features is not None:
            norm = self.region_layer_norm if self.config.separate_region_layer_norm else self.LayerNorm
            parts.append(norm(self.embed_regions(region_features, region_locations)))
        embeddings = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.dropout(embeddings)


# --------------------------------------------------------------------------------------------------------------------
# Encoder (BERT's module tree and names; attention through scaled_dot_product_attention or an eager path)
# --------------------------------------------------------------------------------------------------------------------


class ImageBERTSelfAttention(nn.Module):
    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_prob = config.attention_probs_dropout_prob

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch_size, length, _ = states.shape
        return states.view(batch_size, length, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(
        self, hidden_states: torch.Tensor, key_mask: torch.Tensor | None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query = self._split_heads(self.query(hidden_states))
        key = self._split_heads(self.key(hidden_states))
        value = self._split_heads(self.value(hidden_states))
        dropout_prob = self.dropout_prob if self.training else 0.0
        # SDPA's CPU kernels cannot drop attention probabilities; its fallback for that is slower than these three
        # ops with our dropout (34 vs 29 ms per base layer, forward and backward, batch 8, length 144).
        eager = self.config._attn_implementation == "eager" or (dropout_prob > 0 and query.device.type == "cpu")
        # `key_mask` is (batch, 1, 1, length) and True where a key may be attended to.
        if output_attentions or eager:
            scores = query @ key.transpose(-1, -2) * self.attention_head_size**-0.5
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
            probabilities = dropout(scores.softmax(dim=-1), p=dropout_prob, training=self.training)
            context = probabilities @ value
        else:
            probabilities = None
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask, dropout_p=dropout_prob)
        batch_size, _, length, _ = context.shape
        context = context.transpose(1, 2).reshape(batch_size, length, -1)
        return context, probabilities


class ImageBERTResidualOutput(nn.Module):
    """Projection back to the hidden size, dropout, residual and LayerNorm: BERT's `attention.output` and `output`."""

    def __init__(self, config: ImageBERTConfig, input_size: int):
        super().__init__()
        self.dense = nn.Linear(input_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = ImageBERTDropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class ImageBERTAttention(nn.Module):
    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        self.self = ImageBERTSelfAttention(config)
        self.output = ImageBERTResidualOutput(config, config.hidden_size)

    def forward(self, hidden_states, key_mask, output_attentions=False):
        context, probabilities = self.self(hidden_states, key_mask, output_attentions)
        return self.output(context, hidden_states), probabilities


class ImageBERTIntermediate(nn.Module):
    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class ImageBERTLayer(nn.Module):
    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        self.attention = ImageBERTAttention(config)
        self.intermediate = ImageBERTIntermediate(config)
        self.output = ImageBERTResidualOutput(config, config.intermediate_size)

    def forward(self, hidden_states, key_mask, output_attentions=False):
        attended, probabilities = self.attention(hidden_states, key_mask, output_attentions)
        return self.output(self.intermediate(attended), attended), probabilities


class ImageBERTEncoder(nn.Module):
    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        self.layer = nn.ModuleList([ImageBERTLayer(config) for _ in range(config.num_hidden_layers)])
        # Set by PreTrainedModel.gradient_checkpointing_enable(), together with `_gradient_checkpointing_func`.
        self.gradient_checkpointing = False

    def forward(self, hidden_states, key_mask, output_attentions=False, output_hidden_states=False):
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layer:
            if self.gradient_checkpointing and self.training:
                hidden_states, probabilities = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, key_mask, output_attentions
                )
            else:
                hidden_states, probabilities = layer(hidden_states, key_mask, output_attentions)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (probabilities,)
        return hidden_states, all_hidden_states, all_attentions


class ImageBERTPooler(nn.Module):
    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


# --------------------------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------------------------


class ImageBERTPredictionHeadTransform(nn.Module):
    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class ImageBERTLMPredictionHead(nn.Module):
    """BERT's MLM head; `decoder.weight` is tied to the word embeddings."""

    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        self.transform = ImageBERTPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


class ImageBERTRegionPredictionHead(nn.Module):
    """A transform followed by a linear map from hidden states to `output_size` (object classes or features)."""

    def __init__(self, config: ImageBERTConfig, output_size: int):
        super().__init__()
        self.transform = ImageBERTPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, output_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


class ImageBERTPreTrainingHeads(nn.Module):
    """MLM (`predictions`, as BERT), ITM (`seq_relationship`, where BERT has NSP), MOC and MRFR."""

    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        self.predictions = ImageBERTLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)
        self.object_predictions = ImageBERTRegionPredictionHead(config, config.num_object_classes)
        self.feature_regression = ImageBERTRegionPredictionHead(config, config.region_feature_size)


class ImageBERTRetrievalHeads(nn.Module):
    """The ITM classifier (same name as in pretraining, so it carries over) and the unimodal projections."""

    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)
        self.text_projection = nn.Linear(config.hidden_size, config.contrastive_embedding_size)
        self.region_projection = nn.Linear(config.hidden_size, config.contrastive_embedding_size)


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


class ImageBERTPreTrainedModel(PreTrainedModel):
    config_class = ImageBERTConfig
    config: ImageBERTConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # Older BERT checkpoints store their position-id buffer; ours computes positions on the fly.
    _keys_to_ignore_on_load_unexpected = [r"position_ids"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ImageBERTLMPredictionHead):
            init.zeros_(module.bias)

    @classmethod
    def from_text_pretrained(
        cls, pretrained_model_name_or_path: str, output_loading_info: bool = False, **config_overrides
    ):
        """Builds an ImageBERT model from a BERT checkpoint: text embeddings, encoder (and MLM head, pooler) load,
        everything region-specific starts fresh.

        Args:
            pretrained_model_name_or_path: a BERT checkpoint (hub id or local folder with `config.json`).
            output_loading_info: also return a dict with `new_keys` (freshly initialised) and `unused_keys`.
            **config_overrides: ImageBERT fields to set, e.g. `region_feature_size=1280, num_object_classes=1000`.
        """
        from transformers import AutoConfig

        text_config = AutoConfig.from_pretrained(pretrained_model_name_or_path).to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            text_config.pop(key, None)
        config = ImageBERTConfig(**{**text_config, **config_overrides})
        model, info = cls.from_pretrained(pretrained_model_name_or_path, config=config, output_loading_info=True)
        new_keys = sorted(info.get("missing_keys", []))
        unused_keys = sorted(info.get("unexpected_keys", []))
        logger.info(
            "Initialised %s from %s; %d new weights: %s",
            cls.__name__,
            pretrained_model_name_or_path,
            len(new_keys),
            ", ".join(new_keys),
        )
        if output_loading_info:
            return model, {"new_keys": new_keys, "unused_keys": unused_keys}
        return model


class ImageBERTModel(ImageBERTPreTrainedModel):
    r"""
    The bare ImageBERT encoder: `[CLS] text [SEP]` followed by the regions in one transformer.

    Example:

    ```python
    >>> import torch
    >>> from imagebert_hf import ImageBERTConfig, ImageBERTModel
    >>> config = ImageBERTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    ...                          region_feature_size=32)
    >>> model = ImageBERTModel(config)
    >>> out = model(input_ids=torch.tensor([[101, 2000, 102]]), region_features=torch.randn(1, 4, 32),
    ...             region_locations=torch.rand(1, 4, 5))
    >>> out.last_hidden_state.shape  # 3 text positions, then 4 regions
    torch.Size([1, 7, 64])
    ```
    """

    def __init__(self, config: ImageBERTConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = ImageBERTEmbeddings(config)
        self.encoder = ImageBERTEncoder(config)
        self.pooler = ImageBERTPooler(config) if add_pooling_layer else None
        # Initialize weights and apply final processing
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        region_features: torch.FloatTensor | None = None,
        region_locations: torch.FloatTensor | None = None,
        region_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageBERTModelOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*):
                `[CLS] text [SEP]` token ids, padded on the right.
            attention_mask (`torch.Tensor` of shape `(batch_size, text_length)`, *optional*):
                1 for real tokens, 0 for padding.
            token_type_ids (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*):
                Segment ids of the text (0 by default).
            region_features (`torch.FloatTensor` of shape `(batch_size, num_regions, region_feature_size)`, *optional*):
                One visual feature per region.
            region_locations (`torch.FloatTensor` of shape `(batch_size, num_regions, 5)`, *optional*):
                `(x1/W, y1/H, x2/W, y2/H, area/(W*H))` of each region, in [0, 1].
            region_attention_mask (`torch.Tensor` of shape `(batch_size, num_regions)`, *optional*):
                1 for real regions, 0 for padding.
        """
        if kwargs:
            raise TypeError(f"ImageBERTModel.forward got unexpected arguments: {sorted(kwargs)}.")
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        batch_size, text_length, num_regions = check_model_inputs(
            self.config,
            input_ids,
            attention_mask,
            token_type_ids,
            region_features,
            region_locations,
            region_attention_mask,
        )
        key_mask = self._key_mask(batch_size, text_length, num_regions, attention_mask, region_attention_mask)
        if region_features is not None and region_attention_mask is not None:
            # Padded regions must not influence anything, whatever numbers they hold (NaN included).
            keep = region_attention_mask.bool()[..., None]
            region_features = region_features.masked_fill(~keep, 0.0)
            region_locations = region_locations.masked_fill(~keep, 0.0)

        embeddings = self.embeddings(input_ids, token_type_ids, region_features, region_locations)
        sequence_output, all_hidden_states, all_attentions = self.encoder(
            embeddings, key_mask, output_attentions, output_hidden_states
        )
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        if not return_dict:
            return tuple(
                v for v in (sequence_output, pooled_output, all_hidden_states, all_attentions) if v is not None
            )
        return ImageBERTModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )

    def _key_mask(self, batch_size, text_length, num_regions, attention_mask, region_attention_mask):
        """(batch, 1, 1, length) boolean mask of attendable keys, or None when every key is real."""
        device = self.embeddings.word_embeddings.weight.device
        parts = []
        if text_length:
            parts.append(
                attention_mask.bool()
                if attention_mask is not None
                else torch.ones(batch_size, text_length, dtype=torch.bool, device=device)
            )
        if num_regions:
            parts.append(
                region_attention_mask.bool()
                if region_attention_mask is not None
                else torch.ones(batch_size, num_regions, dtype=torch.bool, device=device)
            )
        mask = torch.cat(parts, dim=1)
        all_real, every_sample_has_one = torch.stack([mask.all(), mask.any(dim=1).all()]).tolist()
        # Without a mask, SDPA can use its fastest kernels.
        if all_real:
            return None
        if not every_sample_has_one:
            raise ValueError(
                "A sample has neither a real text token nor a real region: attention_mask and "
                "region_attention_mask are all zeros for it."
            )
        return mask[:, None, None, :]


def _mean_or_zero(values: torch.Tensor) -> torch.Tensor:
    """Mean of `values`; for none, a zero that keeps the graph (see `_masked_mean`)."""
    return values.mean() if values.numel() else values.sum() * 0.0


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is True; a zero that keeps the graph when nothing is selected, so every head
    takes part in every step (distributed training expects it)."""
    if bool(mask.any()):
        return values[mask].mean()
    return values.sum() * 0.0


class ImageBERTForPreTraining(ImageBERTPreTrainedModel):
    r"""
    ImageBERT with its four pretraining heads: masked language modelling (MLM), masked object classification (MOC),
    masked region feature regression (MRFR) and image-text matching (ITM).

    Each loss is computed only where its targets are given. When `itm_labels` is given, MLM, MOC and MRFR count only
    the matched pairs (conditional masking): a caption is not reconstructed from an image it does not describe.
    """

    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: ImageBERTConfig):
        super().__init__(config)
        self.bert = ImageBERTModel(config)
        self.cls = ImageBERTPreTrainingHeads(config)
        # Initialize weights and apply final processing
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        region_features: torch.FloatTensor | None = None,
        region_locations: torch.FloatTensor | None = None,
        region_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        masked_regions: torch.BoolTensor | None = None,
        region_class_labels: torch.LongTensor | None = None,
        region_class_probs: torch.FloatTensor | None = None,
        region_feature_targets: torch.FloatTensor | None = None,
        itm_labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageBERTForPreTrainingOutput | tuple:
        r"""
        Model inputs as in [`ImageBERTModel.forward`], plus the targets:

        Args:
            labels (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*):
                MLM targets: the original id of each masked token, -100 elsewhere.
            masked_regions (`torch.BoolTensor` of shape `(batch_size, num_regions)`, *optional*):
                True for the regions that were masked; MOC and MRFR are computed there.
            region_class_labels (`torch.LongTensor` of shape `(batch_size, num_regions)`, *optional*):
                The detector's label of each region (-100 for none), for MOC with `moc_loss_type="cross_entropy"`.
            region_class_probs (`torch.FloatTensor` of shape `(batch_size, num_regions, num_object_classes)`, *optional*):
                The detector's class distribution of each region, for MOC with `moc_loss_type="kl"`.
            region_feature_targets (`torch.FloatTensor` of shape `(batch_size, num_regions, region_feature_size)`, *optional*):
                The regions' features before masking, for MRFR.
            itm_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                1 when the text describes the regions' image, 0 for a negative pair.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            region_features=region_features,
            region_locations=region_locations,
            region_attention_mask=region_attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        self._check_targets(
            input_ids, region_features, labels, masked_regions, region_class_labels, region_class_probs,
            region_feature_targets, itm_labels,
        )  # fmt: skip
        sequence_output = outputs.last_hidden_state
        text_length = 0 if input_ids is None else input_ids.shape[1]
        text_output, region_output = sequence_output[:, :text_length], sequence_output[:, text_length:]
        batch_size = sequence_output.shape[0]

        matched = torch.ones(batch_size, dtype=torch.bool, device=sequence_output.device)
        if itm_labels is not None:
            matched = itm_labels.to(matched.device) == 1
        region_targets = None
        if masked_regions is not None and region_features is not None:
            region_targets = masked_regions.bool() & matched[:, None]
            if region_attention_mask is not None:
                region_targets &= region_attention_mask.bool()

        sparse = self.config.sparse_prediction
        itm_logits = self.cls.seq_relationship(outputs.pooler_output)
        losses = {}

        mlm_logits = None
        if input_ids is not None:
            selected = None if labels is None else (labels != IGNORE_INDEX) & matched[:, None]
            if sparse and selected is not None:
                mlm_logits = self.cls.predictions(text_output[selected])
                losses["mlm"] = _mean_or_zero(F.cross_entropy(mlm_logits.float(), labels[selected], reduction="none"))
            else:
                mlm_logits = self.cls.predictions(text_output)
                if selected is not None:
                    token_losses = F.cross_entropy(
                        mlm_logits.float().flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none"
                    ).view_as(labels)
                    losses["mlm"] = _masked_mean(token_losses, selected)

        moc_logits = mrfr_predictions = None
        if region_features is not None:
            if sparse and region_targets is not None:
                # Flattened over the masked regions of matched pairs; every target below is indexed alike.
                region_output = region_output[region_targets]
                region_class_labels = None if region_class_labels is None else region_class_labels[region_targets]
                region_class_probs = None if region_class_probs is None else region_class_probs[region_targets]
                if region_feature_targets is not None:
                    region_feature_targets = region_feature_targets[region_targets]
                region_targets = torch.ones(region_output.shape[0], dtype=torch.bool, device=region_output.device)
            moc_logits = self.cls.object_predictions(region_output)
            mrfr_predictions = self.cls.feature_regression(region_output)
        if (
            region_targets is not None
            and self.config.moc_loss_type == "cross_entropy"
            and region_class_labels is not None
        ):
            selected = region_targets & (region_class_labels != IGNORE_INDEX)
            region_losses = F.cross_entropy(
                moc_logits.float().flatten(0, -2), region_class_labels.clamp(min=0).flatten(), reduction="none"
            ).view_as(region_class_labels)
            losses["moc"] = _masked_mean(region_losses, selected)
        if region_targets is not None and self.config.moc_loss_type == "kl" and region_class_probs is not None:
            log_predicted = moc_logits.float().log_softmax(dim=-1)
            target = region_class_probs.float()
            region_losses = (target * (target.clamp(min=1e-12).log() - log_predicted)).sum(dim=-1)
            losses["moc"] = _masked_mean(region_losses, region_targets)
        if region_targets is not None and region_feature_targets is not None:
            region_losses = (mrfr_predictions.float() - region_feature_targets.float()).pow(2).mean(dim=-1)
            losses["mrfr"] = _masked_mean(region_losses, region_targets)
        if itm_labels is not None:
            losses["itm"] = F.cross_entropy(itm_logits.float(), itm_labels.long())

        loss = None
        if losses:
            loss = sum(getattr(self.config, f"{task}_loss_weight") * value for task, value in losses.items())
        output = ImageBERTForPreTrainingOutput(
            loss=loss,
            mlm_loss=losses.get("mlm"),
            moc_loss=losses.get("moc"),
            mrfr_loss=losses.get("mrfr"),
            itm_loss=losses.get("itm"),
            mlm_logits=mlm_logits,
            moc_logits=moc_logits,
            mrfr_predictions=mrfr_predictions,
            itm_logits=itm_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    def _check_targets(
        self, input_ids, region_features, labels, masked_regions, region_class_labels, region_class_probs,
        region_feature_targets, itm_labels,
    ):  # fmt: skip
        batch_size = (input_ids if input_ids is not None else region_features).shape[0]
        if input_ids is not None:
            _expect_shape("labels", labels, _shape(input_ids), "one MLM target per text token, -100 where unmasked")
        elif labels is not None:
            raise ValueError("labels (MLM targets) were given without input_ids.")
        region_targets = {
            "masked_regions": masked_regions,
            "region_class_labels": region_class_labels,
            "region_class_probs": region_class_probs,
            "region_feature_targets": region_feature_targets,
        }
        if region_features is None:
            given = [name for name, value in region_targets.items() if value is not None]
            if given:
                raise ValueError(f"{', '.join(given)} given without region_features.")
        else:
            num_regions = region_features.shape[1]
            _expect_shape("masked_regions", masked_regions, (batch_size, num_regions), "one flag per region")
            _expect_shape(
                "region_class_labels", region_class_labels, (batch_size, num_regions), "one label per region"
            )
            _expect_shape(
                "region_class_probs",
                region_class_probs,
                (batch_size, num_regions, self.config.num_object_classes),
                f"a distribution over num_object_classes={self.config.num_object_classes} per region",
            )
            _expect_shape(
                "region_feature_targets",
                region_feature_targets,
                (batch_size, num_regions, self.config.region_feature_size),
                "the unmasked feature of each region",
            )
            if region_class_labels is not None:
                real = region_class_labels[region_class_labels != IGNORE_INDEX]
                if real.numel() and (real.min() < 0 or real.max() >= self.config.num_object_classes):
                    raise ValueError(
                        f"region_class_labels holds labels in [{int(real.min())}, {int(real.max())}]; expected "
                        f"labels in [0, {self.config.num_object_classes}) or -100."
                    )
        _expect_shape("itm_labels", itm_labels, (batch_size,), "1 for a matched pair, 0 for a negative")


class ImageBERTForImageTextRetrieval(ImageBERTPreTrainedModel):
    r"""
    ImageBERT as a cross-encoder for image-text retrieval: one relevance score per (text, regions) pair.

    Losses (weights in `config.retrieval_loss_weights`):
    - `binary`: sigmoid cross-entropy of each pair's score against `labels` (the paper's best);
    - `multiclass`: softmax cross-entropy over each group of one positive and P negatives;
    - `triplet`: mean hinge `max(0, margin - s(positive) + s(negative))` within each group.

    For `multiclass` and `triplet`, the batch is made of consecutive groups of `group_size` pairs, the positive first;
    with `group_size` and no `labels`, the binary loss takes its labels from that layout.

    The unimodal embeddings (`get_text_embeddings`, `get_region_embeddings`) come from text-only and regions-only
    passes through the same encoder and are used to shortlist candidates before the cross-encoder re-scores them.
    """

    def __init__(self, config: ImageBERTConfig):
        super().__init__(config)
        self.bert = ImageBERTModel(config)
        self.cls = ImageBERTRetrievalHeads(config)
        # Initialize weights and apply final processing
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        region_features: torch.FloatTensor | None = None,
        region_locations: torch.FloatTensor | None = None,
        region_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        group_size: int | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageBERTForImageTextRetrievalOutput | tuple:
        r"""
        Model inputs as in [`ImageBERTModel.forward`] (text and regions both required), plus:

        Args:
            labels (`torch.Tensor` of shape `(batch_size,)`, *optional*):
                1 for matching pairs, 0 for non-matching ones (binary loss).
            group_size (`int`, *optional*):
                Size of the consecutive candidate groups (one positive first, then its negatives) for the multi-class
                and triplet losses.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if input_ids is None or region_features is None:
            raise ValueError("Retrieval scores (text, regions) pairs: give both input_ids and region_features.")
        outputs = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            region_features=region_features,
            region_locations=region_locations,
            region_attention_mask=region_attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        pair_logits = self.cls.seq_relationship(outputs.pooler_output).float()
        # The score is the log-odds of "matched", so binary cross-entropy on it equals ITM's 2-way softmax loss.
        scores = pair_logits[:, 1] - pair_logits[:, 0]
        losses = self._losses(scores, labels, group_size)
        loss = None
        if losses:
            loss = sum(self.config.retrieval_loss_weights.get(name, 0.0) * value for name, value in losses.items())
        output = ImageBERTForImageTextRetrievalOutput(
            loss=loss,
            binary_loss=losses.get("binary"),
            multiclass_loss=losses.get("multiclass"),
            triplet_loss=losses.get("triplet"),
            logits=scores,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    def _losses(self, scores: torch.Tensor, labels: torch.Tensor | None, group_size: int | None) -> dict:
        batch_size = scores.shape[0]
        wanted = {name for name, weight in self.config.retrieval_loss_weights.items() if weight}
        groups = None
        if group_size is not None:
            if group_size < 2 or batch_size % group_size:
                raise ValueError(
                    f"group_size is {group_size}; expected at least 2 and a divisor of the batch size ({batch_size}), "
                    "the batch being groups of one positive followed by its negatives."
                )
            groups = scores.view(-1, group_size)
        if labels is None and groups is not None:
            labels = torch.zeros_like(groups)
            labels[:, 0] = 1
            labels = labels.flatten()
        _expect_shape("labels", labels, (batch_size,), "1 for a matching pair, 0 otherwise")

        losses = {}
        if "binary" in wanted and labels is not None:
            losses["binary"] = F.binary_cross_entropy_with_logits(scores, labels.to(scores.dtype))
        needs_groups = wanted & {"multiclass", "triplet"}
        if needs_groups and groups is None and (labels is not None):
            raise ValueError(
                f"The {' and '.join(sorted(needs_groups))} loss needs group_size: the batch laid out as groups of one "
                "positive followed by its negatives."
            )
        if "multiclass" in wanted and groups is not None:
            target = torch.zeros(groups.shape[0], dtype=torch.long, device=scores.device)
            losses["multiclass"] = F.cross_entropy(groups, target)
        if "triplet" in wanted and groups is not None:
            margins = self.config.triplet_margin - groups[:, :1] + groups[:, 1:]
            losses["triplet"] = margins.clamp(min=0).mean()
        return losses

    def get_text_embeddings(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
    ) -> torch.FloatTensor:
        """L2-normalised `(batch_size, contrastive_embedding_size)` embeddings of texts alone ([CLS] of a text-only
        pass)."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return F.normalize(self.cls.text_projection(hidden.last_hidden_state[:, 0]).float(), dim=-1)

    def get_region_embeddings(
        self,
        region_features: torch.FloatTensor,
        region_locations: torch.FloatTensor,
        region_attention_mask: torch.Tensor | None = None,
    ) -> torch.FloatTensor:
        """L2-normalised `(batch_size, contrastive_embedding_size)` embeddings of images alone (mean of a
        regions-only pass over the real regions)."""
        hidden = self.bert(
            region_features=region_features,
            region_locations=region_locations,
            region_attention_mask=region_attention_mask,
        ).last_hidden_state
        if region_attention_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            weights = region_attention_mask.to(hidden.dtype)[..., None]
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return F.normalize(self.cls.region_projection(pooled).float(), dim=-1)

    def contrastive_loss(self, text_embeddings: torch.Tensor, region_embeddings: torch.Tensor) -> torch.FloatTensor:
        """Symmetric InfoNCE over a batch of matching (text, image) embeddings: row i of each belongs together."""
        _expect_shape(
            "region_embeddings", region_embeddings, _shape(text_embeddings), "one image embedding per text embedding"
        )
        similarities = text_embeddings @ region_embeddings.T / self.config.contrastive_temperature
        target = torch.arange(similarities.shape[0], device=similarities.device)
        return (F.cross_entropy(similarities, target) + F.cross_entropy(similarities.T, target)) / 2


__all__ = [
    "ImageBERTForImageTextRetrieval",
    "ImageBERTForImageTextRetrievalOutput",
    "ImageBERTForPreTraining",
    "ImageBERTForPreTrainingOutput",
    "ImageBERTModel",
    "ImageBERTModelOutput",
    "ImageBERTPreTrainedModel",
]
