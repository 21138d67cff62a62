"""The objective retrieval fine-tuning trains: the cross-encoder's retrieval losses plus the contrastive loss of its
unimodal shortlist heads, as one module (`RetrievalTrainingModel`), with in-batch hard negatives drawn by the unimodal
similarity (`mine_contrastive_negatives`, as ALBEF and BLIP train ITM)."""

from __future__ import annotations

import torch
from transformers.utils import ModelOutput


LOSS_NAMES = ("binary", "multiclass", "triplet", "contrastive")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
REGION_INPUTS = ("region_features", "region_locations", "region_attention_mask")


NEGATIVE_MINING = ("random", "contrastive")


class _GatherWithGradient(torch.autograd.Function):
    """All-gather whose backward hands each process the sum of every process's gradient for its own rows (each
    process's loss reads every process's rows)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows : (dist.get_rank() + 1) * rows]


def gather_across_processes(embeddings: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's `embeddings` stacked in rank order (gradients flow back to each process's own rows), and
    the row where this process's start; the tensor itself and 0 outside a multi-process run. Each process must hold
    as many rows (accelerate's prepared loaders give every process equal batches)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return embeddings, 0
    return _GatherWithGradient.apply(embeddings), dist.get_rank() * embeddings.shape[0]


def mine_contrastive_negatives(
    similarities: torch.Tensor,
    positive_images: torch.Tensor,
    num_negatives: int,
    negative_type: str,
    generator: torch.Generator | None = None,
    caption_matches: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In-batch hard negatives drawn by the unimodal similarity of the positives, as ALBEF and BLIP train ITM.

    Args:
        similarities: `(B, B)` text-image similarities of the batch's positives (row: text, column: image), already
            divided by the temperature.
        positive_images: `(B,)` the image of each positive; pairs of one image are never negatives of each other.
        num_negatives: negatives per positive (P).
        negative_type: `"text"` (another caption for the positive's image), `"image"` (another image for its
            caption) or `"both"` (each negative either kind, drawn 50/50 as the collator's random negatives are).
        generator: seeds the draws.
        caption_matches: `(B, B)` bool, True where positive a's caption also describes positive b's image (a caption
            identical to one of that image's: the collator's `positive_caption_matches`); such pairs are true, never
            negatives. Mining prefers the most similar pairs, so a duplicate caption would be its likeliest pick.

    Returns:
        `(text_source, image_source, found)`, each `(B, P)`: negative p of positive i pairs the caption of positive
        `text_source[i, p]` with the image of positive `image_source[i, p]`; `found` is False where the batch holds
        no valid pair to draw from (the caller keeps its random negative there).
    """
    batch_size = similarities.shape[0]
    invalid = positive_images[:, None] == positive_images[None, :]
    if caption_matches is not None:
        invalid = invalid | caption_matches.to(device=invalid.device, dtype=torch.bool)
    logits = similarities.detach().float().masked_fill(invalid, float("-inf"))
    # Row i: the candidates of positive i, captions for its image (columns of `logits`) or images for its caption.
    found_text, found_image = ~invalid.all(dim=0), ~invalid.all(dim=1)

    def draw(candidates: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
        # Rows without candidates get uniform weights; their draws are discarded through `found`.
        safe = torch.where(found[:, None], candidates, torch.zeros_like(candidates))
        return torch.multinomial(safe.softmax(dim=1), num_negatives, replacement=True, generator=generator)

    own = torch.arange(batch_size, device=similarities.device)[:, None].expand(batch_size, num_negatives)
    texts_for_image = draw(logits.T, found_text)
    images_for_text = draw(logits, found_image)
    if negative_type == "text":
        use_text = torch.ones(batch_size, num_negatives, dtype=torch.bool, device=similarities.device)
    elif negative_type == "image":
        use_text = torch.zeros(batch_size, num_negatives, dtype=torch.bool, device=similarities.device)
    else:
        use_text = torch.randint(
            2, (batch_size, num_negatives), generator=generator, device=similarities.device
        ).bool()
    text_source = torch.where(use_text, texts_for_image, own)
    image_source = torch.where(use_text, own, images_for_text)
    return text_source, image_source, torch.where(use_text, found_text[:, None], found_image[:, None])


class RetrievalTrainingModel(torch.nn.Module):
    """The cross-encoder's retrieval losses plus the contrastive loss of its unimodal heads, as one module, so the
    shared Accelerate loop (one forward, one `loss`) trains both.

    With `contrastive_trains_encoder=False`, the contrastive loss trains the projection heads only: the encoder the
    cross-encoder shares then learns from the retrieval losses alone (on the shared data the contrastive loss
    otherwise halves the cross-encoder's recall, docs/results.md).

    With `contrastive_weight=0` the projection heads are frozen (`requires_grad=False`): nothing trains them, and
    several processes need every trainable parameter to get a gradient at each step. With a weight above 0 they are
    trainable, whatever an earlier wrapper of the same model set.

    With `negative_mining="contrastive"`, each group's negatives are replaced by in-batch hard negatives drawn by
    the unimodal similarity (`mine_contrastive_negatives`): the cross-encoder then learns to separate the candidates
    a shortlist actually gives it, rather than random pairs, which a briefly trained shortlist already tells apart.
    """

    def __init__(
        self,
        model,
        contrastive_weight: float = 1.0,
        negative_mining: str = "random",
        negative_type: str = "both",
        seed: int = 0,
        contrastive_trains_encoder: bool = True,
    ):
        super().__init__()
        if negative_mining not in NEGATIVE_MINING:
            raise ValueError(f"negative_mining must be one of {NEGATIVE_MINING}, got {negative_mining!r}.")
        if negative_mining == "contrastive" and not contrastive_weight:
            raise ValueError("negative_mining='contrastive' draws by the unimodal heads: give contrastive_weight > 0.")
        self.model = model
        self.contrastive_weight = contrastive_weight
        self.negative_mining = negative_mining
        self.negative_type = negative_type
        self.seed = int(seed)
        self.contrastive_trains_encoder = contrastive_trains_encoder
        # Without their loss the projection heads get no gradient; DistributedDataParallel (built without
        # `find_unused_parameters`) fails on the step after one where a trainable parameter got none. With it they
        # train, also where an earlier wrapper of the same model froze them.
        for head in (model.cls.text_projection, model.cls.region_projection):
            head.requires_grad_(bool(contrastive_weight))

    def _mined_inputs(self, inputs, group_size, positive_index, positive_images, similarities, caption_matches):
        num_negatives = group_size - 1
        positive_images = positive_images.cpu()
        # Seeded by the batch itself, so that a resumed run (same data order) draws the same negatives.
        batch_key = int((positive_images * torch.arange(1, positive_images.numel() + 1)).sum())
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + batch_key)
        text_source, image_source, found = mine_contrastive_negatives(
            similarities.cpu(),
            positive_images,
            num_negatives,
            self.negative_type,
            generator,
            None if caption_matches is None else caption_matches.cpu(),
        )
        device = positive_index.device
        positives = positive_index.cpu()
        # Row of the batch each pair's text and regions come from: the positive itself first, then the negatives
        # (the mined one where the batch had another image, the collator's random one otherwise).
        random_rows = positives[:, None] + torch.arange(1, group_size)[None]
        text_rows = torch.where(found, positives[text_source], random_rows)
        image_rows = torch.where(found, positives[image_source], random_rows)
        text_rows = torch.cat([positives[:, None], text_rows], dim=1).reshape(-1).to(device)
        image_rows = torch.cat([positives[:, None], image_rows], dim=1).reshape(-1).to(device)
        mined = {}
        for key, value in inputs.items():
            rows = text_rows if key in TEXT_INPUTS else image_rows if key in REGION_INPUTS else None
            mined[key] = value[rows] if rows is not None else value
        return mined

    def forward(
        self, labels, group_size, positive_index, positive_images=None, positive_caption_matches=None, **inputs
    ) -> ModelOutput:
        contrastive, similarities = None, None
        # A micro-batch of one positive (the last of an epoch, or a batch size of 1) still runs the heads: its InfoNCE
        # is 0 with a zero gradient, which keeps every trainable parameter in each step's graph (see __init__); where
        # the step's global batch holds that one positive alone, no contrastive loss is reported.
        if self.contrastive_weight:
            text = {key: inputs[key][positive_index] for key in TEXT_INPUTS if key in inputs}
            regions = {key: inputs[key][positive_index] for key in REGION_INPUTS if key in inputs}
            grad = self.contrastive_trains_encoder
            text_embeddings = self.model.get_text_embeddings(**text, encoder_grad=grad)
            region_embeddings = self.model.get_region_embeddings(**regions, encoder_grad=grad)
            # Against every process's positives, as CLIP-style training does across devices: the softmax then runs
            # over the global batch of one micro-batch step whatever the number of processes.
            all_text, first = gather_across_processes(text_embeddings)
            all_regions, _ = gather_across_processes(region_embeddings)
            contrastive = self.model.contrastive_loss(text_embeddings, region_embeddings, all_text, all_regions, first)
            similarities = text_embeddings @ region_embeddings.T / self.model.config.contrastive_temperature
        if self.negative_mining == "contrastive" and similarities is not None and group_size > 1:
            if positive_images is None:
                raise ValueError("negative_mining='contrastive' needs the batch's positive_images (the collator's).")
            inputs = self._mined_inputs(
                inputs, group_size, positive_index, positive_images, similarities, positive_caption_matches
            )
        outputs = self.model(**inputs, labels=labels, group_size=group_size)
        losses = {f"{name}_loss": getattr(outputs, f"{name}_loss") for name in LOSS_NAMES[:3]}
        result = ModelOutput(loss=outputs.loss, **{key: value for key, value in losses.items() if value is not None})
        if contrastive is not None:
            if all_text.shape[0] > 1:  # one positive in the whole step has nothing to be contrasted with: no loss
                result["contrastive_loss"] = contrastive
            result["loss"] = outputs.loss + self.contrastive_weight * contrastive
        return result


__all__ = [
    "LOSS_NAMES",
    "NEGATIVE_MINING",
    "REGION_INPUTS",
    "RetrievalTrainingModel",
    "TEXT_INPUTS",
    "gather_across_processes",
    "mine_contrastive_negatives",
]
