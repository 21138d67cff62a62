"""The pretraining collator in DataLoader workers and without a seed: features without `sample_seed` get different
masks and negatives in each worker and each epoch (reproducibly under `torch.manual_seed`), features with one get
the batches they get in the main process, and a collator without `seed` leaves torch's global generator alone. And
a batch where only some features carry `itm_labels` is refused, naming a sample without one."""

import numpy as np
import pytest
import torch

from imagebert_hf.data.collator import DataCollatorForImageBERTPretraining


NUM_FEATURES, BATCH_SIZE = 16, 4


def same_features(tokenizer, sample_seeds: bool = False) -> list[dict]:
    """Features alike in text and region count, so only the random draws tell their batches apart."""
    rng = np.random.default_rng(0)
    features = []
    for i in range(NUM_FEATURES):
        feature = {
            "input_ids": tokenizer("a red circle to the left of a blue square on a black background")["input_ids"],
            "region_features": rng.standard_normal((10, 8)).astype(np.float32),
            "region_locations": np.full((10, 5), 0.5, np.float32),
            "image_id": f"img{i}",
        }
        if sample_seeds:
            feature["sample_seed"] = 1000 + i
        features.append(feature)
    return features


def draws(batch: dict) -> tuple:
    """What the collator's random draws decided in a batch: MLM targets, chosen regions, ITM labels."""
    return batch["labels"].tolist(), batch["masked_regions"].tolist(), batch["itm_labels"].tolist()


def epochs(loader, count: int = 2) -> list[list[tuple]]:
    return [[draws(batch) for batch in loader] for _ in range(count)]


def loader(features, collator, num_workers: int, **kwargs):
    return torch.utils.data.DataLoader(
        features, batch_size=BATCH_SIZE, collate_fn=collator, num_workers=num_workers, **kwargs
    )


@pytest.mark.parametrize("seed", [0, None], ids=["seed-0", "no-seed"])
def test_workers_draw_different_masks_and_negatives_in_each_worker_and_epoch(tokenizer, seed):
    collator = DataCollatorForImageBERTPretraining(tokenizer, seed=seed)
    torch.manual_seed(0)
    first, second = epochs(loader(same_features(tokenizer), collator, num_workers=2))
    # Batches 0 and 1 come from workers 0 and 1, each one's first batch.
    assert first[0] != first[1]
    assert first[2] != first[3]
    assert first != second  # each epoch starts its workers afresh, from the collator as built


def test_workers_draw_the_same_batches_again_under_the_same_torch_seed_and_others_under_another(tokenizer):
    collator = DataCollatorForImageBERTPretraining(tokenizer, seed=3)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(epochs(loader(same_features(tokenizer), collator, num_workers=2)))
    assert runs[0] == runs[1]
    # The workers' seeds come from torch's generator (or the loader's), and the collator's seed is mixed in.
    torch.manual_seed(6)
    assert epochs(loader(same_features(tokenizer), collator, num_workers=2)) != runs[0]
    generator = torch.Generator().manual_seed(6)
    with_generator = loader(same_features(tokenizer), collator, num_workers=2, generator=generator)
    assert epochs(with_generator) != runs[0]
    other = DataCollatorForImageBERTPretraining(tokenizer, seed=4)
    torch.manual_seed(5)
    assert epochs(loader(same_features(tokenizer), other, num_workers=2)) != runs[0]


def test_in_the_main_process_a_seed_gives_the_sample_seeds_of_its_generator(tokenizer):
    # The batches of `num_workers=0` with a seed are those of sample seeds drawn in order from a generator seeded
    # with it: a worker-aware collator leaves them as they were.
    features = same_features(tokenizer)
    generator = torch.Generator().manual_seed(11)
    seeded = [{**f, "sample_seed": int(torch.randint(0, 2**62, (1,), generator=generator))} for f in features]
    assert epochs(loader(features, DataCollatorForImageBERTPretraining(tokenizer, seed=11), 0), count=1) == epochs(
        loader(seeded, DataCollatorForImageBERTPretraining(tokenizer, seed=0), 0), count=1
    )


def test_sample_seeds_give_the_same_batches_in_workers_as_in_the_main_process(tokenizer):
    features = same_features(tokenizer, sample_seeds=True)
    collator = DataCollatorForImageBERTPretraining(tokenizer, seed=0)
    main = epochs(loader(features, collator, num_workers=0))
    assert epochs(loader(features, collator, num_workers=2)) == main
    assert main[0] == main[1]  # sample seeds decide everything


def test_a_collator_without_seed_leaves_the_global_generator_alone(tokenizer):
    torch.manual_seed(42)
    state = torch.get_rng_state()
    first = DataCollatorForImageBERTPretraining(tokenizer)
    assert torch.equal(torch.get_rng_state(), state)
    second = DataCollatorForImageBERTPretraining(tokenizer)
    features = same_features(tokenizer)
    # Without a seed each collator still draws its own sequence.
    assert draws(first(features)) != draws(second(features))


@pytest.mark.parametrize("given", [0, 1])
def test_itm_labels_on_only_some_features_are_refused_naming_the_first_without(tokenizer, given):
    features = same_features(tokenizer, sample_seeds=True)[:4]
    features[0]["itm_labels"] = given
    features[2]["itm_labels"] = 1
    collator = DataCollatorForImageBERTPretraining(tokenizer, seed=0)
    with pytest.raises(ValueError, match="itm_labels must be given for every sample or none") as info:
        collator(features)
    assert "'img1'" in str(info.value)
    assert "'img3'" not in str(info.value)
