"""Batches for ImageBERT pretraining: ITM negatives, MLM and region masking (MOC, MRFR), per-batch padding."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..models.imagebert.configuration_imagebert import FIELD_RULES, check_field
from ..models.imagebert.region_batching import (
    as_feature_tensor,
    check_region_record,
    check_region_values,
    empty_batch_tensor,
    pad_region_records,
    padded_length,
    share_batch_tensors,
)
from .negatives import CaptionPictures, choose_negative


def _as_tensor(value: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    return torch.as_tensor(np.asarray(value), dtype=dtype)


def _integer_ids(value: Any, name: str, key: str) -> torch.Tensor:
    """`value` (token ids or token types) as a flat long tensor; floats, booleans and other values raise, naming
    the sample (`name`) and `key`: a float id would be truncated into another token without a word."""
    if isinstance(value, torch.Tensor):
        integer = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
        dtype = str(value.dtype).replace("torch.", "")
    else:
        try:
            value = np.asarray(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name}: {key} is not a list of integers ({error}).") from error
        integer, dtype = value.dtype.kind in "iu", value.dtype
    if (value.size if isinstance(value, np.ndarray) else value.numel()) == 0:
        return torch.zeros(0, dtype=torch.long)
    if not integer:
        raise ValueError(f"{name}: {key} has dtype {dtype}; expected integers (ids are never rounded).")
    return _as_tensor(value, torch.long).flatten()


def _is_binary_label(value: Any) -> bool:
    """Whether `value` is the number 0 or 1 (an int, a whole float, a numpy or one-element torch scalar); NaN,
    booleans and strings are not."""
    if isinstance(value, (bool, str, bytes)):
        return False
    try:
        return float(value) in (0.0, 1.0)
    except (TypeError, ValueError, RuntimeError):
        return False


@dataclass(kw_only=True)
class MaskingSettings:
    """How pretraining batches are masked, and how many of their pairs become ITM negatives: settings of the
    collator, and of a recipe stage, which hands them on to its collator and datasets.

    Args:
        mlm_probability (`float`, defaults to 0.15): Share of text tokens chosen for MLM.
        region_mask_probability (`float`, defaults to 0.15): Share of regions chosen for MOC and MRFR.
        region_zero_probability (`float`, defaults to 0.9): Share of chosen regions whose feature is zeroed.
        itm_negative_probability (`float`, defaults to 0.5): Share of samples made negatives.
        text_negative_share (`float`, defaults to 0.5): Among negatives, the share whose text (rather than regions)
            is replaced.
    """

    mlm_probability: float = 0.15
    region_mask_probability: float = 0.15
    region_zero_probability: float = 0.9
    itm_negative_probability: float = 0.5
    text_negative_share: float = 0.5

    def masking_settings(self) -> dict[str, float]:
        """The settings above, by name."""
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(MaskingSettings)}

    def check_masking_settings(self, where: str = "") -> None:
        """Raises ValueError, naming the setting (after `where`), unless every one is a number in [0, 1]."""
        for name, value in self.masking_settings().items():
            # `not 0 <= value <= 1` also holds for NaN; a string would compare with a bare TypeError.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{where}{name} must be a number in [0, 1], got {value!r}.")


@dataclass
class DataCollatorForImageBERTPretraining(MaskingSettings):
    """Turns per-sample features into a padded pretraining batch for `ImageBERTForPreTraining`.

    Each feature is a dict with `input_ids` (special tokens included, unpadded), `region_features` (R, F) and
    `region_locations` (R, 5), and optionally `token_type_ids`, `region_class_labels` (R,), `region_class_probs`
    (R, C), `image_id`, `itm_labels` and `sample_seed`. `None` features (records that failed to load) are dropped
    and counted.

    What it does, in order:
    1. ITM: when the features carry no `itm_labels`, each sample becomes a negative with probability
       `itm_negative_probability`: its text (share `text_negative_share`) or its regions are replaced by those of
       another sample of the batch with a different `image_id` (`data.negatives.choose_negative`, the rule the
       datasets apply over a whole source). When they carry `itm_labels` (a dataset that picks negatives from the
       whole corpus), those are kept and nothing is drawn here. A batch where only some do raises ValueError.
    2. MLM: each text token that is neither special nor padding is chosen with probability `mlm_probability`;
       chosen tokens become [MASK] (80%), a random non-special token (10%) or stay (10%).
    3. Region masking: each real region is chosen with probability `region_mask_probability`;
       chosen regions get a zero feature with probability `region_zero_probability` and keep it otherwise.
       `region_feature_targets` holds the features of the chosen regions before masking (MRFR): one row per True of
       `masked_regions`, in its row-major order, `(num_masked, F)`; `region_class_labels` / `region_class_probs`
       pass through for MOC, which reads them at `masked_regions`. Labels are kept per sample (-100 on the regions of
       a sample without them); distributions come from every sample or none (a batch where only some samples have
       them raises ValueError, naming the first without).
    4. Padding of text and regions to the longest in this batch (optionally to a multiple, never beyond
       `max_text_length` / `max_regions`), regions through the shared `pad_region_records`.

    Negatives are masked exactly like positives (so masking says nothing about the ITM label) and keep their
    `labels`, `masked_regions` and region targets: `ImageBERTForPreTraining` leaves the targets of pairs with
    `itm_labels == 0` out of MLM, MOC and MRFR (conditional masking, `pretraining_targets`), and the training loop
    counts targets the same way.

    Randomness: a sample with `sample_seed` draws its masks (and, in-batch, its negative) from generators seeded
    with it alone, so the batch is the same however the samples are split across processes or resumed; otherwise
    each sample's seed comes from one generator seeded with `seed`, so the same sequence of calls gives the same
    batches. Inside a DataLoader worker that generator is seeded with `seed` and the worker's seed together, so
    the workers (and the epochs, each of which starts its workers afresh) draw different masks and negatives,
    reproducibly under `torch.manual_seed` or the loader's `generator`. A sample's masks do not depend on whether
    negatives are drawn.

    Args:
        tokenizer: A BERT tokenizer; gives the pad, [MASK] and special token ids and the vocabulary size.
        mlm_probability, region_mask_probability, region_zero_probability, itm_negative_probability,
            text_negative_share: as in `MaskingSettings` (keyword arguments); negatives are drawn in-batch.
        ensure_one_masked (`bool`, defaults to `True`): Mask at least one token and one region of every sample
            with any, so every masked loss is defined even for short captions (UNITER does the same).
        max_text_length (`int`, *optional*): Truncate text to this many tokens (the last one kept is [SEP]).
        max_regions (`int`, *optional*): Keep at most this many regions per sample.
        pad_to_multiple_of (`int`, *optional*): Round padded lengths up to a multiple of this, capped by
            `max_text_length` and `max_regions` (which the model checks its inputs against).
        pad_to_max_length (`bool`, defaults to `False`): Pad every batch to `max_text_length` tokens and `max_regions`
            regions (the paper's fixed layout; static shapes for compilers that want them) instead of to the batch's
            own longest sample.
        return_region_class_probs (`bool`, defaults to `True`): Return `region_class_probs` when the features have
            them (MOC's KL targets): every feature of a batch, or none.
        count_failed (`bool`, defaults to `False`): Add `num_failed_records` (dropped `None` features) to the batch.
        num_object_classes (`int`, *optional*): The MOC head's classes; a `region_class_labels` value outside
            `[0, num_object_classes)` (other than -100), or `region_class_probs` of another width, then raises,
            naming the sample, instead of reaching the loss.
        type_vocab_size (`int`, defaults to 2): The model's token types (`ImageBERTConfig.type_vocab_size`, 2 as in
            BERT); a `token_type_ids` value outside `[0, type_vocab_size)` raises, naming the sample.
        seed (`int`, *optional*): Seed of the generator used for samples without `sample_seed`; None draws one from
            the operating system (torch's global generator is left as it is).
        feature_dtype (`torch.dtype`, *optional*): The dtype of `region_features` and `region_feature_targets`. By
            default the records' own floating dtype: a float16 region cache gives float16 batches (exact, half the
            bytes to fill and to move to the device; the model converts them to its own dtype), a float32 one float32.
        full_region_feature_targets (`bool`, defaults to `False`): Return `region_feature_targets` for every region,
            `(batch_size, num_regions, F)`, as before the model accepted the masked rows only (a copy of the whole
            feature batch: the slower layout, for code that indexes the targets by region).

    Values are checked here, on the CPU, where the batch is made: the shapes and dtypes of each record's region
    arrays, one row per region, integer class labels (`check_region_record`, on the whole record, before the cut to
    `max_regions`), non-empty integer token ids within the tokenizer, integer token types within `type_vocab_size`
    and as many as the token ids, class labels within `num_object_classes`, ITM labels 0 or 1 (per sample), finite
    features, class distributions that sum to 1 (a region without one, all zeros, or a sample without them in a batch
    whose other samples have them, is refused when `return_region_class_probs`: MOC's KL loss would have no target
    there) and locations in [0, 1] (`check_region_values`, once over the padded batch). The model checks only
    shapes.
    """

    tokenizer: Any
    ensure_one_masked: bool = True
    max_text_length: int | None = None
    max_regions: int | None = None
    pad_to_multiple_of: int | None = None
    pad_to_max_length: bool = False
    return_region_class_probs: bool = True
    count_failed: bool = False
    seed: int | None = None
    num_object_classes: int | None = None
    full_region_feature_targets: bool = False
    feature_dtype: torch.dtype | None = None
    type_vocab_size: int = 2

    def __post_init__(self):
        self.check_masking_settings()
        # A non-positive max_regions would slice off regions ([:-1]) or leave none; zero text fails in torch.cat.
        for name in ("max_text_length", "max_regions", "num_object_classes"):
            if getattr(self, name) is not None:
                check_field(name, getattr(self, name), *FIELD_RULES[name])
        check_field("type_vocab_size", self.type_vocab_size, *FIELD_RULES["type_vocab_size"])
        if self.pad_to_multiple_of is not None:
            check_field("pad_to_multiple_of", self.pad_to_multiple_of, "int", 1, None)
        if self.seed is not None:
            check_field("seed", self.seed, "int", 0, None)
        for name in (
            "ensure_one_masked",
            "pad_to_max_length",
            "return_region_class_probs",
            "count_failed",
            "full_region_feature_targets",
        ):
            check_field(name, getattr(self, name), "bool", None, None)
        if self.pad_to_max_length and (self.max_text_length is None or self.max_regions is None):
            raise ValueError(
                "pad_to_max_length needs max_text_length and max_regions, got "
                f"{self.max_text_length} and {self.max_regions}."
            )
        if self.tokenizer.mask_token_id is None or self.tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer needs a [MASK] and a [PAD] token for MLM.")
        self._special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)
        # A lookup table (token id -> special), indexed by ids that `_check_values` keeps inside the vocabulary.
        self._is_special = np.zeros(max(len(self.tokenizer), int(self._special_ids.max()) + 1), dtype=bool)
        self._is_special[self._special_ids.numpy()] = True
        vocab_ids = torch.arange(len(self.tokenizer))
        self._random_token_ids = vocab_ids[~torch.isin(vocab_ids, self._special_ids)]
        # Fresh entropy for `seed=None` from the OS: `torch.seed()` would reseed torch's global generator, and with it
        # every later draw of the caller (model init, dropout) that `torch.manual_seed` had made reproducible.
        self._base_seed = self.seed if self.seed is not None else secrets.randbits(63)
        self._generator = torch.Generator()
        self._generator.manual_seed(self._base_seed)
        self._worker_seed = None  # the DataLoader worker seed `_generator` was last derived from

    # --- randomness -------------------------------------------------------------------------------------------
    def _sample_seed(self, feature: dict) -> int:
        seed = feature.get("sample_seed")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._fallback_generator()))
        return int(seed)

    def _fallback_generator(self) -> torch.Generator:
        """The generator of samples without `sample_seed`. Each DataLoader worker holds a copy of the collator made
        when its loader was iterated, generator included, so every worker would draw the same seeds (the same masks
        and negatives in every worker's batches, and again in every epoch): inside a worker it is derived once from
        the worker's seed (distinct per worker and per iteration of the loader, and reproducible under
        `torch.manual_seed` or the loader's `generator`) mixed with `seed`."""
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.seed != self._worker_seed:
            mixed = np.random.SeedSequence([self._base_seed, worker.seed]).generate_state(1, np.uint64)[0]
            self._generator.manual_seed(int(mixed))
            self._worker_seed = worker.seed
        return self._generator

    @staticmethod
    def _mask_generator(seed: int) -> torch.Generator:
        generator = torch.Generator()
        generator.manual_seed(seed)
        return generator

    # --- steps ------------------------------------------------------------------------------------------------
    def _in_batch_negatives(self, samples: list[dict]) -> None:
        if self.itm_negative_probability == 0.0:  # nothing to draw (the choice would always be "positive")
            return
        image_ids = [sample.get("image_id") for sample in samples]
        # Captions as the model reads them: the same ids on two pictures describe both.
        texts = [tuple(sample["_orig_input_ids"].tolist()) for sample in samples]
        described = CaptionPictures()
        for text, image_id in zip(texts, image_ids):
            described.add(text, image_id)
        for i, sample in enumerate(samples):
            # The shared rule (`choose_negative`), over the other samples of the batch, drawn from the sample's
            # seed apart from its masks, as the datasets draw theirs over a whole source.
            negative = choose_negative(
                np.random.default_rng([sample["_seed"], 17]),
                image_ids[i],
                len(samples),
                image_ids.__getitem__,
                self.itm_negative_probability,
                self.text_negative_share,
                exclude=i,
                caption_fits=lambda other, i=i: described.fit(texts[i], image_ids[i], texts[other], image_ids[other]),
            )
            if negative is None:
                continue
            source = samples[negative.partner]
            # Sources are read from the untouched copies, so a sample already turned negative is never chained.
            if negative.swap_text:
                sample["input_ids"] = source["_orig_input_ids"]
                sample["token_type_ids"] = source["_orig_token_type_ids"]
            else:
                for key in ("region_features", "region_locations", "region_class_labels", "region_class_probs"):
                    if key in source["_orig_regions"]:
                        sample[key] = source["_orig_regions"][key]
                    else:
                        sample.pop(key, None)
                sample["_regions_of"] = source["_regions_of"]
            sample["itm_labels"] = 0

    def _mask_text(self, input_ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # The draws come from the sample's torch generator; the rest is numpy, cheaper on arrays this small.
        ids = input_ids.numpy()
        candidates = ~self._is_special[ids]
        if not candidates.any() or self.mlm_probability == 0.0:
            return input_ids, torch.full_like(input_ids, -100)
        shape = input_ids.shape
        chosen = (torch.rand(shape, generator=generator).numpy() < np.float32(self.mlm_probability)) & candidates
        if self.ensure_one_masked and not chosen.any():
            positions = np.flatnonzero(candidates)
            chosen[positions[int(torch.randint(len(positions), (1,), generator=generator))]] = True
        action = torch.rand(shape, generator=generator).numpy()
        random_ids = self._random_token_ids[torch.randint(len(self._random_token_ids), shape, generator=generator)]
        # [MASK] for 80% of the chosen tokens, a random token for 10%, unchanged for the rest.
        masked = np.where(chosen & (action < np.float32(0.8)), self.tokenizer.mask_token_id, ids)
        to_random = chosen & (action >= np.float32(0.8)) & (action < np.float32(0.9))
        masked = np.where(to_random, random_ids.numpy(), masked)
        return torch.from_numpy(masked), torch.from_numpy(np.where(chosen, ids, -100))

    def _mask_regions(self, num_regions: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Which regions are chosen for MOC / MRFR, and which of those get a zero feature. The features themselves
        are zeroed once, in the padded batch."""
        chosen = torch.rand(num_regions, generator=generator).numpy() < np.float32(self.region_mask_probability)
        if self.region_mask_probability == 0.0:
            chosen[:] = False
        elif self.ensure_one_masked and num_regions > 0 and not chosen.any():
            chosen[int(torch.randint(num_regions, (1,), generator=generator))] = True
        zero = chosen & (
            torch.rand(num_regions, generator=generator).numpy() < np.float32(self.region_zero_probability)
        )
        return torch.from_numpy(chosen), torch.from_numpy(zero)

    # --- entry point ------------------------------------------------------------------------------------------
    def __call__(self, features: Sequence[dict | None]) -> dict[str, torch.Tensor]:
        num_failed = sum(feature is None for feature in features)
        samples = [self._prepare(feature) for feature in features if feature is not None]
        if not samples:
            raise ValueError(f"every record of this batch ({num_failed}) failed to load; nothing to collate.")
        self._check_class_probs_everywhere(samples)

        unlabelled = [sample for sample in samples if "itm_labels" not in sample]
        if not unlabelled:
            for sample in samples:
                sample["itm_labels"] = int(sample["itm_labels"])
        elif len(unlabelled) < len(samples):
            # Drawing in-batch negatives next to a dataset's own would overwrite its labels and mix two rules.
            raise ValueError(
                f"sample {unlabelled[0]['image_id']!r} has no itm_labels but {len(samples) - len(unlabelled)} of the "
                f"{len(samples)} samples of this batch have them; itm_labels must be given for every sample or none."
            )
        else:
            for sample in samples:
                sample["itm_labels"] = 1
            self._in_batch_negatives(samples)

        for sample in samples:
            # Negatives are masked exactly like positives and keep their targets; the model ignores those
            # (conditional masking is applied in one place, `pretraining_targets`).
            generator = self._mask_generator(sample["_seed"])
            sample["input_ids"], sample["labels"] = self._mask_text(sample["input_ids"], generator)
            sample["masked_regions"], sample["_zeroed_regions"] = self._mask_regions(
                sample["region_features"].shape[0], generator
            )
        batch = self._pad(samples)
        if self.count_failed:
            batch["num_failed_records"] = torch.tensor(num_failed)
        return share_batch_tensors(batch)

    def _check_class_probs_everywhere(self, samples: list[dict]) -> None:
        """With `return_region_class_probs`, a batch's class distributions come from every sample or none: padding
        keeps them only when every sample has them, so one sample without them would take MOC's KL targets from the
        whole batch, and a zero row in its place would be a target with nothing to learn."""
        if not self.return_region_class_probs:
            return
        missing = [sample for sample in samples if "region_class_probs" not in sample]
        if missing and len(missing) < len(samples):
            raise ValueError(
                f"sample {missing[0]['image_id']!r} has no region_class_probs but {len(samples) - len(missing)} of "
                f"the {len(samples)} samples of this batch have them, so MOC with moc_loss_type='kl' has no target "
                "in its regions; extract every source's regions with class distributions, or pass "
                "return_region_class_probs=False (moc_loss_type='cross_entropy')."
            )

    def _prepare(self, feature: dict) -> dict:
        if "input_ids" not in feature or "region_features" not in feature or "region_locations" not in feature:
            raise KeyError(
                "each feature needs 'input_ids', 'region_features' and 'region_locations'; got keys "
                f"{sorted(feature)}."
            )
        name = f"sample {feature.get('image_id')!r}"
        input_ids = _integer_ids(feature["input_ids"], name, "input_ids")
        token_type_ids = feature.get("token_type_ids")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        else:
            token_type_ids = _integer_ids(token_type_ids, name, "token_type_ids")
            if token_type_ids.shape != input_ids.shape:
                # Filling the row with fewer types would broadcast one type over every token.
                raise ValueError(
                    f"{name}: token_type_ids has {token_type_ids.numel()} entries but input_ids has "
                    f"{input_ids.numel()}; expected one token type per token."
                )
        # On the whole text, before the cut to max_text_length hides values.
        self._check_text(name, input_ids, token_type_ids)
        # Shapes and dtypes on the whole record, before the cut to max_regions hides rows that disagree.
        region_keys = ("region_features", "region_locations", "region_class_labels", "region_class_probs")
        check_region_record(
            feature,
            name,
            self.num_object_classes,
            region_keys if self.return_region_class_probs else region_keys[:3],
        )
        if self.max_text_length is not None and input_ids.shape[0] > self.max_text_length:
            # Keep [SEP] last so a truncated caption still looks like BERT input.
            input_ids = torch.cat([input_ids[: self.max_text_length - 1], input_ids[-1:]])
            token_type_ids = token_type_ids[: self.max_text_length]
        regions = {
            # Kept in the dtype they come in (a float16 cache row is not copied here); the batch is float32.
            "region_features": as_feature_tensor(feature["region_features"]),
            "region_locations": _as_tensor(feature["region_locations"], torch.float32),
        }
        if feature.get("region_class_labels") is not None:
            regions["region_class_labels"] = _as_tensor(feature["region_class_labels"], torch.long)
        if self.return_region_class_probs and feature.get("region_class_probs") is not None:
            regions["region_class_probs"] = _as_tensor(feature["region_class_probs"], torch.float32)
        self._check_values(feature, regions)
        if self.max_regions is not None:
            regions = {key: value[: self.max_regions] for key, value in regions.items()}
        sample = {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "_orig_input_ids": input_ids,
            "_orig_token_type_ids": token_type_ids,
            "_orig_regions": dict(regions),
            "_seed": self._sample_seed(feature),
            "image_id": feature.get("image_id"),
            "_regions_of": feature.get("image_id"),
            **regions,
        }
        if "itm_labels" in feature and feature["itm_labels"] is not None:
            sample["itm_labels"] = feature["itm_labels"]
        return sample

    def _check_text(self, name: str, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> None:
        """Token ids within the tokenizer and token types within `type_vocab_size`: beyond them the model's embedding
        lookup fails deep inside (a device-side assert on a GPU). `name` names the sample."""
        if not input_ids.numel():
            raise ValueError(f"{name}: input_ids is empty; every sample needs its text ([CLS] ... [SEP]).")
        vocab = len(self.tokenizer)
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise ValueError(
                f"{name}: input_ids hold {int(input_ids.min())}..{int(input_ids.max())}, outside the tokenizer's "
                f"{vocab} ids (was the text tokenized with another tokenizer?)."
            )
        pad = self.tokenizer.pad_token_id
        if pad is not None and bool((input_ids == pad).any()):
            # Padded already (`padding="max_length"` in a `datasets.map`): the batch would attend to the [PAD]
            # tokens as text, and a cut to max_text_length would end the text on one instead of [SEP].
            raise ValueError(
                f"{name}: input_ids hold the padding id {pad} at {(input_ids == pad).nonzero().flatten()[:5].tolist()}; "
                "give each text unpadded (tokenize without padding): the collator pads each batch itself."
            )
        if int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= self.type_vocab_size:
            raise ValueError(
                f"{name}: token_type_ids hold {int(token_type_ids.min())}..{int(token_type_ids.max())}; expected "
                f"values in [0, {self.type_vocab_size}) (type_vocab_size)."
            )

    def _check_values(self, feature: dict, regions: dict[str, torch.Tensor]) -> None:
        """The region and label values a model would fail on deep inside (or train on silently): class labels
        beyond the MOC head, regions without a class distribution for MOC's KL loss, ITM labels other than 0/1
        (features, locations and distributions: `check_region_values`, on the whole batch). Checked here, on the
        data loader's side, on every device alike; the model checks shapes only."""
        name = f"sample {feature.get('image_id')!r}"
        labels = regions.get("region_class_labels")
        if labels is not None and self.num_object_classes is not None:
            bad = (labels != -100) & ((labels < 0) | (labels >= self.num_object_classes))
            if bad.any():
                raise ValueError(
                    f"{name}: region_class_labels {labels[bad][:5].tolist()} are outside [0, "
                    f"{self.num_object_classes}) (num_object_classes; -100 for none), and are never clamped."
                )
        probs = regions.get("region_class_probs")
        if probs is not None and probs.numel():
            # All zeros is what the extractor and the region cache store for a region without a distribution (a
            # backbone without a classifier); MOC's KL loss would count it as a target with nothing to learn.
            empty = ~probs.ne(0).any(dim=-1)
            if empty.any():
                raise ValueError(
                    f"{name}: region_class_probs are all zero in {int(empty.sum())} of {len(empty)} regions (no class "
                    "distribution: the extractor had no classifier), so MOC with moc_loss_type='kl' has no target "
                    "there; extract regions with a classifier, or pass return_region_class_probs=False "
                    "(moc_loss_type='cross_entropy')."
                )
        itm = feature.get("itm_labels")
        if itm is not None and not _is_binary_label(itm):
            raise ValueError(f"{name}: itm_labels must be 0 or 1, got {itm!r}.")

    def _pad(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch_size = len(samples)
        padding = "max_length" if self.pad_to_max_length else "longest"
        lengths = [sample["input_ids"].shape[0] for sample in samples]
        text_length = padded_length(lengths, padding, self.max_text_length, self.pad_to_multiple_of)
        batch = {
            "input_ids": torch.full((batch_size, text_length), self.tokenizer.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros(batch_size, text_length, dtype=torch.long),
            "token_type_ids": torch.zeros(batch_size, text_length, dtype=torch.long),
            "labels": torch.full((batch_size, text_length), -100, dtype=torch.long),
        }
        for i, (sample, length) in enumerate(zip(samples, lengths)):
            batch["input_ids"][i, :length] = sample["input_ids"]
            batch["attention_mask"][i, :length] = 1
            batch["token_type_ids"][i, :length] = sample["token_type_ids"][:length]
            batch["labels"][i, :length] = sample["labels"]
        batch.update(
            pad_region_records(
                samples,
                padding,
                self.max_regions,
                self.pad_to_multiple_of,
                # Per record: one without labels gets -100 (no MOC target), the others keep theirs.
                return_labels=any("region_class_labels" in s for s in samples),
                return_probs=True,
                extra_keys={"masked_regions": False, "_zeroed_regions": False},
                feature_dtype=self.feature_dtype,
            )
        )
        check_region_values(batch, [sample["_regions_of"] for sample in samples])
        # MRFR regresses the features before masking; the model sees them with the chosen rows zeroed. The targets
        # are the masked rows only (a few percent of the batch), copied out before the zeroing, in place.
        zeroed = batch.pop("_zeroed_regions")
        features = batch["region_features"]
        if self.full_region_feature_targets:
            batch["region_feature_targets"] = features
            batch["region_features"] = features = empty_batch_tensor(features.shape, features.dtype).copy_(features)
        else:
            rows = batch["masked_regions"].flatten().nonzero().flatten()
            targets = empty_batch_tensor((len(rows), features.shape[-1]), features.dtype)
            batch["region_feature_targets"] = torch.index_select(features.flatten(0, 1), 0, rows, out=targets)
        # Row indices rather than a boolean mask over (B, R, F): a tenth of the time.
        features.flatten(0, 1).index_fill_(0, zeroed.flatten().nonzero().flatten(), 0.0)
        batch["itm_labels"] = torch.tensor([int(s["itm_labels"]) for s in samples], dtype=torch.long)
        return batch


__all__ = ["DataCollatorForImageBERTPretraining", "MaskingSettings"]
