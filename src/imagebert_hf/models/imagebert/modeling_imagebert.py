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
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, logging
from transformers.utils.generic import can_return_tuple


try:
    from transformers.utils.output_capturing import capture_outputs
except ImportError:  # transformers 5 releases before the split: the same output recorder under its earlier name
    from transformers.utils.generic import check_model_inputs as capture_outputs

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
            `sparse_prediction=True` and `labels` given: `(num_targets, vocab_size)`, the scores of the tokens
            that have an MLM target, in row-major order.
        moc_logits (`torch.FloatTensor` of shape `(batch_size, num_regions, num_object_classes)`): object class scores.
            With `sparse_prediction=True` and `masked_regions` given: `(num_masked, num_object_classes)`, for the
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
            sigmoid is the probability that they match. float32 whatever the model's dtype (the score head runs in
            float32, also under autocast).
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
# Input checks at the forward boundary: every malformed input fails here, naming the argument, rather than deep
# inside torch. They read only types, dtypes and shapes, never the values: they cost nothing, need no host-device
# sync and behave the same on every device and under `torch.compile`. The values (id and label ranges, 0/1 masks,
# finite features, locations in [0, 1]) are checked where the data is made, on the CPU: the collator, region
# batching (`region_batching.check_region_values`), the processor and the pipeline. One shape depends on values and
# is checked where it is used: masked-row MRFR targets, (M, F), need M to be the count of `masked_regions`
# (`_aligned_feature_targets`, where the indexing syncs for that count anyway).
# --------------------------------------------------------------------------------------------------------------------

# Each argument: (kind, dimensions, meaning). The kind fixes the accepted dtypes: "ids" int64 or int32, "flags" integer,
# bool or float holding 0/1, "float" floating point. Dimensions name the sizes they must match: "B" the batch, "T"
# the text length, "R" the regions, or a config field.
_ARGUMENTS = {
    "input_ids": ("ids", ("B", "T"), "token ids"),
    "attention_mask": ("flags", ("B", "T"), "one entry per text token"),
    "token_type_ids": ("ids", ("B", "T"), "one entry per text token"),
    "region_features": ("float", ("B", "R", "region_feature_size"), "one feature per region"),
    "region_locations": (
        "float",
        ("B", "R", "region_location_size"),
        "each region's box: (x1/W, y1/H, x2/W, y2/H, area/(W*H)), or UNITER's 7 values with its width and height",
    ),
    "region_attention_mask": ("flags", ("B", "R"), "one per region"),
    "labels": ("ids", ("B", "T"), "one MLM target per text token, -100 where unmasked"),
    "masked_regions": ("flags", ("B", "R"), "one flag per region"),
    "region_class_labels": ("ids", ("B", "R"), "one label per region"),
    "region_class_probs": ("float", ("B", "R", "num_object_classes"), "a distribution over the classes per region"),
    "region_feature_targets": ("float", ("B", "R", "region_feature_size"), "the unmasked feature of each region"),
    "itm_labels": ("ids", ("B",), "1 for a matched pair, 0 for a negative"),
    "pair_labels": ("flags", ("B",), "1 for a matching pair, 0 otherwise"),
}
# Retrieval's pair labels are its `labels` argument; the MLM targets of pretraining hold that name here.
_SHOWN_AS = {"pair_labels": "labels"}
_DTYPES = {"ids": "int64 or int32", "flags": "an integer, bool or float dtype", "float": "a floating dtype"}
# Ids index embedding tables and targets, which take these two integer dtypes; a narrower one would fail inside torch.
_ID_DTYPES = (torch.int64, torch.int32)


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


def _expect_kind(name: str, value, kind: str):
    """TypeError unless `value` is a tensor of the dtypes `kind` accepts."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} is a {type(value).__name__}; expected a torch.Tensor ({_DTYPES[kind]}).")
    floating = value.is_floating_point()
    if value.is_complex() or (kind == "ids" and value.dtype not in _ID_DTYPES) or (kind == "float" and not floating):
        raise TypeError(f"{name} has dtype {value.dtype}; expected {_DTYPES[kind]}.")


def validate_inputs(config: ImageBERTConfig, **arguments) -> tuple[int, int, int]:
    """Checks the types, dtypes and shapes of the model inputs and targets given (None: absent) against each other
    and the config; never their values, so it behaves alike on every device and under `torch.compile`.

    Returns (batch_size, text_length, num_regions). Raises TypeError for a non-tensor or a wrong dtype and ValueError
    for a wrong shape or a missing companion argument; each message names the argument.
    """
    given = {name: value for name, value in arguments.items() if value is not None}
    for name, value in given.items():
        _expect_kind(_SHOWN_AS.get(name, name), value, _ARGUMENTS[name][0])
    input_ids, region_features = given.get("input_ids"), given.get("region_features")
    if input_ids is None and region_features is None:
        raise ValueError("Give input_ids, region_features or both; got neither.")
    if (region_features is None) != ("region_locations" not in given):
        present, missing = ("region_features", "region_locations")[:: 1 if region_features is not None else -1]
        raise ValueError(f"{present} was given without {missing}; regions need both.")
    if "labels" in given and input_ids is None:
        raise ValueError("labels (MLM targets) were given without input_ids.")
    region_only = [name for name in given if _ARGUMENTS[name][1][1:2] == ("R",) and name != "region_features"]
    if region_features is None and region_only:
        raise ValueError(f"{', '.join(region_only)} given without region_features.")

    batch_size, text_length, num_regions = None, 0, 0
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids has shape {_shape(input_ids)}; expected (batch_size, text_length).")
        batch_size, text_length = input_ids.shape
        if text_length == 0:
            raise ValueError("input_ids has shape (batch_size, 0); expected at least one token ([CLS]) per sample.")
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
        if num_regions == 0 and input_ids is None:
            raise ValueError(
                f"region_features has shape {_shape(region_features)} and no input_ids were given; a regions-only "
                "pass needs at least one region per sample."
            )
        if num_regions > config.max_regions:
            raise ValueError(
                f"region_features has {num_regions} regions per sample; expected at most max_regions="
                f"{config.max_regions} from the config."
            )
        if text_length > config.region_position_id:
            raise ValueError(
                f"input_ids has {text_length} tokens; with regions, text can have at most {config.region_position_id} "
                f"tokens (position {config.region_position_id} is the regions')."
            )
    elif text_length > config.max_position_embeddings:
        raise ValueError(
            f"input_ids has {text_length} tokens; expected at most max_position_embeddings="
            f"{config.max_position_embeddings}."
        )
    if batch_size == 0:
        raise ValueError("The batch is empty (batch size 0); expected at least one sample.")
    sizes = {"B": batch_size, "T": text_length, "R": num_regions}
    targets = given.get("region_feature_targets")
    if targets is not None and targets.dim() == 2:
        # The masked rows only: one row per True of `masked_regions`, in its row-major order.
        if "masked_regions" not in given:
            raise ValueError(
                f"region_feature_targets has shape {_shape(targets)}, the masked rows only; give masked_regions too "
                "(one row per True in it, in row-major order), or targets of shape (batch_size, num_regions, "
                f"{config.region_feature_size})."
            )
        given["region_feature_targets"] = None
        _expect_shape(
            "region_feature_targets", targets, (None, config.region_feature_size),
            "the unmasked feature of each masked region, one row per True in masked_regions; or (batch_size, "
            "num_regions, region_feature_size)",
        )  # fmt: skip
    for name, value in given.items():
        _, dims, meaning = _ARGUMENTS[name]
        expected = tuple(sizes[d] if d in sizes else getattr(config, d) for d in dims)
        _expect_shape(_SHOWN_AS.get(name, name), value, expected, meaning)
    return batch_size, text_length, num_regions


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
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

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
# Encoder (BERT's module tree and names; attention through transformers' attention interface)
# --------------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in plain torch ops, as BERT's: the fallback of the interface, and the path that returns the
    probabilities. `attention_mask` is additive (float) or True where a key may be attended to (bool)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probabilities = nn.functional.dropout(scores.softmax(dim=-1), p=dropout, training=module.training)
    context = torch.matmul(probabilities, value).transpose(1, 2).contiguous()
    return context, probabilities


class ImageBERTSelfAttention(nn.Module):
    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.scaling = self.attention_head_size**-0.5
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        # Read by the sdpa and flash kernels of the interface: every position sees every other.
        self.is_causal = False

    def forward(
        self, hidden_states: torch.Tensor, attention_mask=None, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.attention_head_size)
        query = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.value(hidden_states).view(hidden_shape).transpose(1, 2)
        # Only the eager path materialises the probabilities, so `output_attentions` takes it (with an eager mask).
        attention_interface = eager_attention_forward
        if not kwargs.get("output_attentions"):
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        context, probabilities = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout.p if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return context.reshape(*input_shape, -1).contiguous(), probabilities


class ImageBERTResidualOutput(nn.Module):
    """Projection back to the hidden size, dropout, residual and LayerNorm: BERT's `attention.output` and `output`."""

    def __init__(self, config: ImageBERTConfig, input_size: int):
        super().__init__()
        self.dense = nn.Linear(input_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class ImageBERTAttention(nn.Module):
    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        self.self = ImageBERTSelfAttention(config)
        self.output = ImageBERTResidualOutput(config, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask=None, **kwargs: Unpack[TransformersKwargs]
    ) -> torch.Tensor:
        context, _ = self.self(hidden_states, attention_mask, **kwargs)
        return self.output(context, hidden_states)


class ImageBERTIntermediate(nn.Module):
    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class ImageBERTLayer(GradientCheckpointingLayer):
    """One transformer layer. Gradient checkpointing (`model.gradient_checkpointing_enable()`) wraps its forward,
    through transformers' `GradientCheckpointingLayer`."""

    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        self.attention = ImageBERTAttention(config)
        self.intermediate = ImageBERTIntermediate(config)
        self.output = ImageBERTResidualOutput(config, config.intermediate_size)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask=None, **kwargs: Unpack[TransformersKwargs]
    ) -> torch.Tensor:
        attended = self.attention(hidden_states, attention_mask, **kwargs)
        return self.output(self.intermediate(attended), attended)


class ImageBERTEncoder(nn.Module):
    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        self.layer = nn.ModuleList([ImageBERTLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(
        self, hidden_states: torch.Tensor, attention_mask=None, **kwargs: Unpack[TransformersKwargs]
    ) -> torch.Tensor:
        for layer in self.layer:
            # The hidden states go positionally: gradient checkpointing replays the layer from its positional inputs.
            hidden_states = layer(hidden_states, attention_mask, **kwargs)
        return hidden_states


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
    """BERT's MLM head; `decoder.weight` is tied to the word embeddings and `decoder.bias` to `bias`, BERT's names.
    With `tie_word_embeddings=False` nothing is tied and the head has no separate `bias`: it would sit unused (a
    parameter distributed training refuses) and a resized vocabulary would lose the decoder's own."""

    def __init__(self, config: ImageBERTConfig):
        super().__init__()
        self.transform = ImageBERTPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        if config.tie_word_embeddings:
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
    # Attention goes through `ALL_ATTENTION_FUNCTIONS`: no cache, not causal, a padding mask built per backend.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The units `device_map="auto"` and FSDP auto-wrap keep whole: a layer's residuals must stay on one device.
    _no_split_modules = ["ImageBERTEmbeddings", "ImageBERTLayer"]
    # Older BERT checkpoints store their position-id buffer; ours computes positions on the fly. A head saved untied by
    # an earlier version kept an unused `cls.predictions.bias` beside the decoder's own.
    _keys_to_ignore_on_load_unexpected = [r"position_ids", r"^cls\.predictions\.bias$"]
    # What `output_hidden_states` / `output_attentions` collect (transformers' output recorder, through hooks): the
    # embeddings and each layer's output; each layer's attention probabilities (eager path).
    _can_record_outputs = {"hidden_states": ImageBERTLayer, "attentions": ImageBERTSelfAttention}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ImageBERTLMPredictionHead):
            init.zeros_(module.decoder.bias if getattr(module, "bias", None) is None else module.bias)

    def enable_input_require_grads(self):
        """transformers' hook on the word embeddings, which only a pass with text runs, and one on the joint
        embeddings, which a regions-only pass runs too: with frozen embeddings (adapters) and reentrant gradient
        checkpointing, the image side of a dual-encoder loss would otherwise train nothing in the encoder."""
        super().enable_input_require_grads()

        def make_output_require_grad(module, inputs, output):
            output.requires_grad_(True)

        self._require_grads_hooks = list(getattr(self, "_require_grads_hooks", [])) + [
            module.register_forward_hook(make_output_require_grad)
            for module in self.modules()
            if isinstance(module, ImageBERTEmbeddings)
        ]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`. A text-only checkpoint's next-sentence head loads into the ITM head by
        the name they share (`cls.seq_relationship`), but NSP's class 0 is "is next" where ITM's class 1 is
        "matched": its rows are swapped, as `from_text_pretrained` does, with a warning that says so. What decides is
        the checkpoint's weights (it holds no region embeddings), not the config, which a caller may pass."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        head = getattr(getattr(model, "cls", None), "seq_relationship", None)
        if head is not None and _holds_nsp_head(info["missing_keys"], model):
            with torch.no_grad():
                head.weight.copy_(head.weight.flip(0))
                head.bias.copy_(head.bias.flip(0))
            logger.warning(
                "%s is a text-only checkpoint (it holds no region embeddings): its next-sentence head was loaded as "
                "the ITM head with its two rows swapped (NSP class 0, 'is next', is ITM class 1, 'matched'). "
                "from_text_pretrained does the same and says which weights are new.",
                pretrained_model_name_or_path,
            )
        return (model, info) if wants_info else model

    @classmethod
    def from_text_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        output_loading_info: bool = False,
        itm_from_nsp: bool = True,
        **config_overrides,
    ):
        """Builds an ImageBERT model from a BERT checkpoint: text embeddings, encoder (and MLM head, pooler) load,
        everything region-specific starts fresh.

        BERT's next-sentence head (`cls.seq_relationship`, the name our ITM head shares) scores class 0 for "is the
        next sentence", while ITM's class 1 is "matched". With `itm_from_nsp` (the paper's initialisation) its two
        rows are swapped on loading, so "is next" becomes "matched"; without, the ITM head starts fresh.

        Args:
            pretrained_model_name_or_path: a BERT checkpoint (hub id or local folder with `config.json`).
            output_loading_info: also return a dict with `new_keys` (freshly initialised), `unused_keys` and
                `itm_head` (`"mapped from NSP"`, `"new"`, or None for a model without the head).
            itm_from_nsp: map a checkpoint's NSP head into the ITM head (True) or start the ITM head fresh (False).
            **config_overrides: ImageBERT fields to set, e.g. `region_feature_size=1280, num_object_classes=1000`;
                `dtype` (or its older name `torch_dtype`) is the dtype to load in, as in `from_pretrained` (default:
                the checkpoint's).

        Raises:
            ValueError: for an ImageBERT checkpoint (load it with `from_pretrained`), and for a checkpoint whose word
                embeddings or encoder would not load, its weights not carrying BERT's names (RoBERTa, DistilBERT).
        """
        from transformers import AutoConfig

        # The load dtype, not a config field: as a field, `torch_dtype` loses to the `dtype` BERT's config carries.
        dtype = config_overrides.pop("dtype", None)
        torch_dtype = config_overrides.pop("torch_dtype", None)
        if dtype is None:
            dtype = torch_dtype
        text_config = AutoConfig.from_pretrained(pretrained_model_name_or_path).to_dict()
        model_type = text_config.get("model_type")
        if model_type == ImageBERTConfig.model_type:
            # Its `cls.seq_relationship` is a trained ITM head, which the NSP mapping below would invert.
            raise ValueError(
                f"{pretrained_model_name_or_path} is an ImageBERT checkpoint (model_type {model_type!r}), not a "
                "text-only BERT: from_text_pretrained would read its trained ITM head as BERT's next-sentence head "
                f"and swap its rows. Load it with {cls.__name__}.from_pretrained (in a recipe: model.init_from, "
                "not model.text_pretrained)."
            )
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            text_config.pop(key, None)
        config = ImageBERTConfig(**{**text_config, **config_overrides})
        # transformers' own loading: the NSP head is mapped below, as `itm_from_nsp` says.
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, config=config, output_loading_info=True, dtype=dtype
        )
        new_keys = set(info.get("missing_keys", []))
        unused_keys = sorted(info.get("unexpected_keys", []))
        _check_text_weights_loaded(
            pretrained_model_name_or_path, model_type, new_keys, unused_keys, cls.base_model_prefix
        )

        itm_head = None
        heads = getattr(model, "cls", None)
        if heads is not None and hasattr(heads, "seq_relationship"):
            itm_keys = {"cls.seq_relationship.weight", "cls.seq_relationship.bias"}
            if itm_from_nsp and not itm_keys & new_keys:
                with torch.no_grad():
                    head = heads.seq_relationship
                    head.weight.copy_(head.weight.flip(0))
                    head.bias.copy_(head.bias.flip(0))
                itm_head = "mapped from NSP"
            else:
                with torch.no_grad():
                    heads.seq_relationship.weight.normal_(mean=0.0, std=config.initializer_range)
                    heads.seq_relationship.bias.zero_()
                new_keys |= itm_keys
                itm_head = "new"
        new_keys = sorted(new_keys)

        message = (
            f"Initialised {cls.__name__} from the text checkpoint {pretrained_model_name_or_path}. "
            f"{len(new_keys)} weights are new, as expected for parts a text-only BERT does not have (region "
            f"embeddings, region heads, projections): {', '.join(new_keys) or 'none'}."
        )
        if itm_head == "mapped from NSP":
            message += (
                " The ITM head was mapped from BERT's next-sentence head with its two rows swapped: NSP class 0 "
                "('is next') is ITM class 1 ('matched')."
            )
        elif itm_head == "new" and not itm_from_nsp:
            message += " The ITM head starts fresh (itm_from_nsp=False)."
        if unused_keys:
            message += f" Unused checkpoint weights: {', '.join(unused_keys)}."
        logger.warning(message)
        if output_loading_info:
            return model, {"new_keys": new_keys, "unused_keys": unused_keys, "itm_head": itm_head}
        return model


def _holds_nsp_head(missing_keys, model: nn.Module) -> bool:
    """Whether a load of `model` whose `missing_keys` these are read a text-only checkpoint's next-sentence head: the
    head loaded while none of the region embeddings, which every ImageBERT checkpoint holds, did. An ImageBERT
    checkpoint missing only some of them (a feature projection dropped to be trained anew) keeps its ITM head as it
    is."""
    missing = set(missing_keys)
    head_loaded = not {"cls.seq_relationship.weight", "cls.seq_relationship.bias"} & missing
    region = {name for name, _ in model.named_parameters() if f".{name}".count(".embeddings.region_")}
    return head_loaded and bool(region) and region <= missing


# The text side a BERT checkpoint must supply: without these, the model would be a randomly initialised encoder.
_TEXT_WEIGHT_PREFIXES = ("embeddings.word_embeddings.", "encoder.")


def _check_text_weights_loaded(source, model_type, new_keys, unused_keys, base_prefix: str) -> None:
    """Raises a ValueError when a text checkpoint left the word embeddings or the encoder fresh: its weights are not
    named as BERT's (RoBERTa, DistilBERT, ...), so none of its text side loaded."""
    fresh = sorted(key for key in new_keys if key.removeprefix(f"{base_prefix}.").startswith(_TEXT_WEIGHT_PREFIXES))
    if not fresh:
        return
    prefixes = sorted({".".join(key.split(".")[:2]) for key in unused_keys})
    held = ", ".join(prefixes[:5]) + (", ..." if len(prefixes) > 5 else "") if prefixes else "none"
    raise ValueError(
        f"{source} (model_type {model_type!r}) is not a BERT-layout checkpoint: {len(fresh)} text weights would start "
        f"fresh (e.g. {', '.join(fresh[:2])}), and its unused weights are named {held}. from_text_pretrained loads "
        "checkpoints whose weights carry BERT's names (embeddings.word_embeddings, encoder.layer.N, optionally under "
        "bert.), such as bert-base-uncased or MiniLM."
    )


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

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        region_features: torch.FloatTensor | None = None,
        region_locations: torch.FloatTensor | None = None,
        region_attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
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
            kwargs: transformers' standard keyword arguments: `output_attentions`, `output_hidden_states`,
                `return_dict`, and what the attention backend reads.
        """
        batch_size, text_length, num_regions = validate_inputs(
            self.config,
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            region_features=region_features,
            region_locations=region_locations,
            region_attention_mask=region_attention_mask,
        )
        if region_features is not None and region_attention_mask is not None:
            # Padded regions must not influence anything, whatever numbers they hold (NaN included).
            keep = region_attention_mask.bool()[..., None]
            region_features = region_features.masked_fill(~keep, 0.0)
            region_locations = region_locations.masked_fill(~keep, 0.0)

        embeddings = self.embeddings(input_ids, token_type_ids, region_features, region_locations)
        padding_mask = _padding_mask(batch_size, text_length, num_regions, attention_mask, region_attention_mask)
        if padding_mask is not None:
            padding_mask = padding_mask.to(embeddings.device)
        output_attentions = kwargs.get("output_attentions")
        if output_attentions if output_attentions is not None else self.config.output_attentions:
            # The eager path, which alone returns probabilities, takes the padding mask as (batch, 1, 1, length).
            kwargs["output_attentions"] = True
            mask = None if padding_mask is None else padding_mask[:, None, None, :]
        else:
            mask = create_bidirectional_mask(config=self.config, inputs_embeds=embeddings, attention_mask=padding_mask)
        sequence_output = self.encoder(embeddings, mask, **kwargs)
        return ImageBERTModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=self.pooler(sequence_output) if self.pooler is not None else None,
        )


def _padding_mask(batch_size, text_length, num_regions, attention_mask, region_attention_mask):
    """(batch, text_length + num_regions) boolean mask, True at real positions; None when no mask was given (every
    position real), decided from the arguments alone so that nothing reads the data."""
    if attention_mask is None and region_attention_mask is None:
        return None
    device = (attention_mask if attention_mask is not None else region_attention_mask).device
    parts = []
    if text_length:
        parts.append(
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones(batch_size, text_length, dtype=torch.bool, device=device)
        )
    if num_regions:
        parts.append(
            region_attention_mask.to(device).bool()
            if region_attention_mask is not None
            else torch.ones(batch_size, num_regions, dtype=torch.bool, device=device)
        )
    return torch.cat(parts, dim=1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is True, without reading the mask on the host. With nothing selected, a zero
    that keeps the graph, so every head takes part in every step (distributed training expects it).

    The unselected values must come from finite numbers: `where` hides a NaN from the forward, but the backward
    multiplies its zero gradient by the NaN's derivative. The losses zero their unselected targets first."""
    total = torch.where(mask, values, values.new_zeros(())).sum()
    return total / mask.sum().clamp(min=1).to(values.dtype)


# One small function per pretraining task. Each takes the head's output and its targets, either over the whole
# batch with `selected` marking where targets count (dense), or already gathered at those positions (sparse,
# `selected` all True), and returns a mean over the selected targets.


def masked_language_modeling_loss(
    logits: torch.Tensor, labels: torch.Tensor, selected: torch.Tensor, sparse: bool
) -> torch.Tensor:
    """MLM: cross-entropy of the word scores `logits` (..., vocab_size) against `labels` where `selected`."""
    labels = labels.long()  # int32 targets (numpy's default integer on some platforms) are as good as int64
    if sparse:
        return F.cross_entropy(logits.float(), labels, reduction="sum") / selected.sum().clamp(min=1)
    token_losses = F.cross_entropy(
        logits.float().flatten(0, -2), labels.clamp(min=0).flatten(), reduction="none"
    ).view_as(labels)
    return _masked_mean(token_losses, selected)


def masked_object_classification_loss(
    logits: torch.Tensor,
    selected: torch.Tensor,
    loss_type: str,
    class_labels: torch.Tensor | None = None,
    class_probs: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """MOC: cross-entropy against the detector's labels (`loss_type="cross_entropy"`, -100: none) or KL divergence
    from its class distribution (`"kl"`), over the `selected` regions; None when the variant's targets are absent."""
    if loss_type == "cross_entropy" and class_labels is not None:
        class_labels = class_labels.long()
        region_losses = F.cross_entropy(
            logits.float().flatten(0, -2), class_labels.clamp(min=0).flatten(), reduction="none"
        ).view_as(class_labels)
        return _masked_mean(region_losses, selected & (class_labels != IGNORE_INDEX))
    if loss_type == "kl" and class_probs is not None:
        target = class_probs.float().masked_fill(~selected[..., None], 0.0)
        region_losses = (target * (target.clamp(min=1e-12).log() - logits.float().log_softmax(dim=-1))).sum(dim=-1)
        return _masked_mean(region_losses, selected)
    return None


def masked_region_feature_regression_loss(
    predictions: torch.Tensor, targets: torch.Tensor, selected: torch.Tensor
) -> torch.Tensor:
    """MRFR: mean squared error between reconstructed and original features, averaged per region over `selected`."""
    targets = targets.float().masked_fill(~selected[..., None], 0.0)
    region_losses = (predictions.float() - targets).pow(2).mean(dim=-1)
    return _masked_mean(region_losses, selected)


def image_text_matching_loss(logits: torch.Tensor, itm_labels: torch.Tensor) -> torch.Tensor:
    """ITM: cross-entropy of the (not matched, matched) scores against `itm_labels`."""
    return F.cross_entropy(logits.float(), itm_labels.long())


def _pair_scores(head: nn.Linear, pooled: torch.Tensor) -> torch.Tensor:
    """The retrieval score of each pair: the log-odds of "matched", `logits[:, 1] - logits[:, 0]` of the ITM head
    `head` on the pooled vectors, so binary cross-entropy on it equals ITM's 2-way softmax loss.

    The head runs in float32 whatever the model's dtype or autocast: each logit rounded to bfloat16 keeps 8
    significant bits (logits near 8 on a grid of 1/16), so the difference of two would tie close pairs, and ties rank
    against the query in recall. The product is two rows wide, so float32 costs nothing.
    """
    with torch.autocast(device_type=pooled.device.type, enabled=False):
        logits = F.linear(pooled.float(), head.weight.float(), head.bias.float())
    return logits[:, 1] - logits[:, 0]


def _aligned_feature_targets(
    targets: torch.Tensor, masked_regions: torch.Tensor, region_targets: torch.Tensor, sparse: bool
) -> torch.Tensor:
    """The MRFR targets laid out like the predictions: (num_selected, F) gathered at `region_targets` when sparse,
    (B, R, F) otherwise. `targets` is either (B, R, F) or the masked rows only, (M, F), one row per True of
    `masked_regions` in row-major order (what the pretraining collator gives)."""
    if targets.dim() == 3:
        return targets[region_targets] if sparse else targets
    masked = masked_regions.bool()
    # The one shape check that reads values: the masked rows' count. The indexing below syncs for it anyway, and a
    # single row would otherwise broadcast to every masked region without a word.
    torch._check_value(
        targets.shape[0] == masked.nonzero().shape[0],
        lambda: (
            "region_feature_targets of shape (M, region_feature_size) needs one row per masked region (M, the "
            "True entries of masked_regions); or give the shape (batch_size, num_regions, region_feature_size)."
        ),
    )
    if sparse:
        # `region_targets` is a subset of `masked` (matched pairs, real regions): keep those rows, in order.
        return targets[region_targets[masked]]
    full = targets.new_zeros((*masked.shape, targets.shape[-1]))
    full[masked] = targets
    return full


def pretraining_targets(
    itm_labels: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    masked_regions: torch.Tensor | None = None,
    region_attention_mask: torch.Tensor | None = None,
) -> tuple[torch.BoolTensor | None, torch.BoolTensor | None]:
    """Where the masked losses have targets; the one statement of conditional masking.

    MLM is computed at the masked tokens (`labels != -100`) and MOC / MRFR at the masked real regions
    (`masked_regions` where `region_attention_mask` is set), of matched pairs only (`itm_labels == 1`; every pair
    when `itm_labels` is None): a caption is not reconstructed from an image it does not describe. Whatever targets
    a negative carries are ignored, so the data may (and should) mask negatives exactly like positives; masking
    only positives would let the ITM head read the answer off the `[MASK]` tokens.

    `ImageBERTForPreTraining` computes its losses here, and the training loop counts each loss's targets with it.

    Args:
        itm_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): 1 for a matched pair, 0 for a negative.
        labels (`torch.LongTensor` of shape `(batch_size, text_length)`, *optional*): MLM targets, -100 elsewhere.
        masked_regions (`torch.BoolTensor` of shape `(batch_size, num_regions)`, *optional*): masked regions.
        region_attention_mask (`torch.Tensor` of shape `(batch_size, num_regions)`, *optional*): real regions.

    Returns:
        `(text_targets, region_targets)`: boolean masks of the shapes of `labels` and `masked_regions`, each None
        when its input is.
    """
    reference = labels if labels is not None else masked_regions
    matched = None
    if itm_labels is not None and reference is not None:
        matched = (itm_labels.to(reference.device) == 1)[:, None]
    text_targets = region_targets = None
    if labels is not None:
        text_targets = labels != IGNORE_INDEX
        if matched is not None:
            text_targets &= matched
    if masked_regions is not None:
        region_targets = masked_regions.bool()
        if matched is not None:
            region_targets = region_targets & matched
        if region_attention_mask is not None:
            region_targets = region_targets & region_attention_mask.to(region_targets.device).bool()
    return text_targets, region_targets


class ImageBERTForPreTraining(ImageBERTPreTrainedModel):
    r"""
    ImageBERT with its four pretraining heads: masked language modelling (MLM), masked object classification (MOC),
    masked region feature regression (MRFR) and image-text matching (ITM).

    Each loss is computed only where its targets are given. When `itm_labels` is given, MLM, MOC and MRFR count only
    the matched pairs (conditional masking, see `pretraining_targets`): a caption is not reconstructed from an image
    it does not describe, and targets given for a negative (`itm_labels == 0`) never reach a loss. This model is the
    one place that applies the rule: `DataCollatorForImageBERTPretraining` masks negatives like positives and leaves
    their targets in the batch.
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
        if hasattr(self.cls.predictions, "bias"):
            self.cls.predictions.bias = new_embeddings.bias

    @can_return_tuple
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
        sparse_prediction: bool = False,
        **kwargs: Unpack[TransformersKwargs],
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
            region_feature_targets (`torch.FloatTensor` of shape `(num_masked, region_feature_size)` or `(batch_size, num_regions, region_feature_size)`, *optional*):
                The regions' features before masking, for MRFR: either of the masked regions only, one row per True
                of `masked_regions` in row-major order (`masked_regions.nonzero()`; what the pretraining collator
                gives), or of every region.
            itm_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                1 when the text describes the regions' image, 0 for a negative pair. The MLM, MOC and MRFR targets
                of a negative are ignored (conditional masking).
            sparse_prediction (`bool`, defaults to `False`):
                Run the MLM, MOC and MRFR heads only where their losses have targets (the loss is the same, the step
                cheaper: pretraining runs use it); `mlm_logits`, `moc_logits` and `mrfr_predictions` then come back
                flattened over those positions, `(num_targets, ...)`.
            kwargs: transformers' standard keyword arguments (`output_attentions`, `output_hidden_states`,
                `return_dict`, ...), passed to [`ImageBERTModel.forward`].
        """
        validate_inputs(
            self.config,
            input_ids=input_ids,
            region_features=region_features,
            region_locations=region_locations,
            region_attention_mask=region_attention_mask,
            labels=labels,
            masked_regions=masked_regions,
            region_class_labels=region_class_labels,
            region_class_probs=region_class_probs,
            region_feature_targets=region_feature_targets,
            itm_labels=itm_labels,
        )
        kwargs["return_dict"] = True
        outputs = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            region_features=region_features,
            region_locations=region_locations,
            region_attention_mask=region_attention_mask,
            **kwargs,
        )
        text_length = 0 if input_ids is None else input_ids.shape[1]
        text_output = outputs.last_hidden_state[:, :text_length]
        region_output = outputs.last_hidden_state[:, text_length:]
        text_targets, region_targets = pretraining_targets(
            itm_labels,
            labels if input_ids is not None else None,
            masked_regions if region_features is not None else None,
            region_attention_mask,
        )
        itm_logits = self.cls.seq_relationship(outputs.pooler_output)
        losses = {}
        mlm_logits = moc_logits = mrfr_predictions = None
        if input_ids is not None:
            mlm_logits, losses["mlm"] = self._text_predictions(text_output, labels, text_targets, sparse_prediction)
        if region_features is not None:
            if region_feature_targets is not None and region_targets is not None:
                region_feature_targets = _aligned_feature_targets(
                    region_feature_targets, masked_regions, region_targets, sparse_prediction
                )
            moc_logits, mrfr_predictions, losses["moc"], losses["mrfr"] = self._region_predictions(
                region_output, region_targets, region_class_labels, region_class_probs, region_feature_targets,
                sparse_prediction,
            )  # fmt: skip
        if itm_labels is not None:
            losses["itm"] = image_text_matching_loss(itm_logits, itm_labels)
        losses = {task: value for task, value in losses.items() if value is not None}

        loss = None
        if losses:
            loss = sum(getattr(self.config, f"{task}_loss_weight") * value for task, value in losses.items())
        return ImageBERTForPreTrainingOutput(
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

    def _text_predictions(
        self,
        text_output: torch.Tensor,
        labels: torch.Tensor | None,
        text_targets: torch.Tensor | None,
        sparse_prediction: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The MLM scores and, where the text has targets, the MLM loss. Sparse: scored only where a target is."""
        if sparse_prediction and text_targets is not None:
            logits = self.cls.predictions(text_output[text_targets])
            return logits, masked_language_modeling_loss(logits, labels[text_targets], text_targets, sparse=True)
        logits = self.cls.predictions(text_output)
        if text_targets is None:
            return logits, None
        return logits, masked_language_modeling_loss(logits, labels, text_targets, sparse=False)

    def _region_predictions(
        self,
        region_output: torch.Tensor,
        region_targets: torch.Tensor | None,
        region_class_labels: torch.Tensor | None,
        region_class_probs: torch.Tensor | None,
        region_feature_targets: torch.Tensor | None,
        sparse_prediction: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The MOC scores and MRFR predictions, and their losses where regions have targets (`region_targets`:
        the masked regions of matched pairs). Sparse: every output and target flattened over those regions."""
        if sparse_prediction and region_targets is not None:
            region_output = region_output[region_targets]
            region_class_labels = None if region_class_labels is None else region_class_labels[region_targets]
            region_class_probs = None if region_class_probs is None else region_class_probs[region_targets]
            region_targets = torch.ones(region_output.shape[0], dtype=torch.bool, device=region_output.device)
        moc_logits = self.cls.object_predictions(region_output)
        mrfr_predictions = self.cls.feature_regression(region_output)
        if region_targets is None:
            return moc_logits, mrfr_predictions, None, None
        moc_loss = masked_object_classification_loss(
            moc_logits, region_targets, self.config.moc_loss_type, region_class_labels, region_class_probs
        )
        mrfr_loss = None
        if region_feature_targets is not None:
            mrfr_loss = masked_region_feature_regression_loss(mrfr_predictions, region_feature_targets, region_targets)
        return moc_logits, mrfr_predictions, moc_loss, mrfr_loss


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

    @can_return_tuple
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
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageBERTForImageTextRetrievalOutput | tuple:
        r"""
        Model inputs as in [`ImageBERTModel.forward`] (text and regions both required), plus:

        Args:
            labels (`torch.Tensor` of shape `(batch_size,)`, *optional*):
                1 for matching pairs, 0 for non-matching ones (binary loss).
            group_size (`int`, *optional*):
                Size of the consecutive candidate groups (one positive first, then its negatives) for the multi-class
                and triplet losses.
            kwargs: transformers' standard keyword arguments, passed to [`ImageBERTModel.forward`].
        """
        if input_ids is None or region_features is None:
            raise ValueError("Retrieval scores (text, regions) pairs: give both input_ids and region_features.")
        validate_inputs(
            self.config,
            input_ids=input_ids,
            region_features=region_features,
            region_locations=region_locations,
            pair_labels=labels,
        )
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)):
            raise TypeError(f"group_size is a {type(group_size).__name__}; expected an int.")
        kwargs["return_dict"] = True
        outputs = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            region_features=region_features,
            region_locations=region_locations,
            region_attention_mask=region_attention_mask,
            **kwargs,
        )
        scores = _pair_scores(self.cls.seq_relationship, outputs.pooler_output)
        losses = self._losses(scores, labels, group_size)
        loss = None
        if losses:
            loss = sum(self.config.retrieval_loss_weights.get(name, 0.0) * value for name, value in losses.items())
        return ImageBERTForImageTextRetrievalOutput(
            loss=loss,
            binary_loss=losses.get("binary"),
            multiclass_loss=losses.get("multiclass"),
            triplet_loss=losses.get("triplet"),
            logits=scores,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

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
        encoder_grad: bool = True,
    ) -> torch.FloatTensor:
        """L2-normalised `(batch_size, contrastive_embedding_size)` embeddings of texts alone ([CLS] of a text-only
        pass). With `encoder_grad=False` the encoder pass keeps no gradients: a loss on the embeddings then trains
        the projection head only, and leaves the encoder the cross-encoder shares to its own losses."""
        with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True
            )
        return F.normalize(self.cls.text_projection(hidden.last_hidden_state[:, 0]).float(), dim=-1)

    def get_region_embeddings(
        self,
        region_features: torch.FloatTensor,
        region_locations: torch.FloatTensor,
        region_attention_mask: torch.Tensor | None = None,
        encoder_grad: bool = True,
    ) -> torch.FloatTensor:
        """L2-normalised `(batch_size, contrastive_embedding_size)` embeddings of images alone (mean of a
        regions-only pass over the real regions); `encoder_grad` as in `get_text_embeddings`."""
        with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
            hidden = self.bert(
                region_features=region_features,
                region_locations=region_locations,
                region_attention_mask=region_attention_mask,
                return_dict=True,
            ).last_hidden_state
        if region_attention_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            weights = region_attention_mask.to(hidden.dtype)[..., None]
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return F.normalize(self.cls.region_projection(pooled).float(), dim=-1)

    def contrastive_loss(
        self,
        text_embeddings: torch.Tensor,
        region_embeddings: torch.Tensor,
        all_text_embeddings: torch.Tensor | None = None,
        all_region_embeddings: torch.Tensor | None = None,
        first_index: int = 0,
    ) -> torch.FloatTensor:
        """Symmetric InfoNCE over a batch of matching (text, image) embeddings: row i of each belongs together.

        With `all_text_embeddings` / `all_region_embeddings` (a larger batch holding this one at rows `first_index`
        on, e.g. every process's batch), each text is contrasted with all those images and each image with all those
        texts, as CLIP-style training does across devices; the loss is this batch's share of that batch's loss.
        """
        _expect_shape(
            "region_embeddings", region_embeddings, _shape(text_embeddings), "one image embedding per text embedding"
        )
        all_text = text_embeddings if all_text_embeddings is None else all_text_embeddings
        all_regions = region_embeddings if all_region_embeddings is None else all_region_embeddings
        temperature = self.config.contrastive_temperature
        target = first_index + torch.arange(text_embeddings.shape[0], device=text_embeddings.device)
        text_to_image = text_embeddings @ all_regions.T / temperature
        image_to_text = region_embeddings @ all_text.T / temperature
        return (F.cross_entropy(text_to_image, target) + F.cross_entropy(image_to_text, target)) / 2


__all__ = [
    "ImageBERTForImageTextRetrieval",
    "ImageBERTForImageTextRetrievalOutput",
    "ImageBERTForPreTraining",
    "ImageBERTForPreTrainingOutput",
    "ImageBERTModel",
    "ImageBERTModelOutput",
    "ImageBERTPreTrainedModel",
    "pretraining_targets",
]
