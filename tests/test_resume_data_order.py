"""A stage stopped and resumed walks every epoch in the order an uninterrupted run does: the same samples, in the
same batches, with the same sample seeds (and so the same masks and negatives), before and after the epoch it
stopped in; and pretraining and retrieval fine-tuning resumed across an epoch end on the same weights."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.utils import ModelOutput

from imagebert_hf.data.pair_sources import MixtureSampler
from imagebert_hf.training import (
    LoopSettings,
    PretrainingRunOptions,
    Schedule,
    Stage,
    TrainingStopped,
    build_accelerator,
    recipe_from_dict,
    run_pretraining,
    run_stage,
)
from imagebert_hf.training.arguments import RetrievalArguments
from imagebert_hf.training.loop import steps_per_epoch
from imagebert_hf.training.retrieval_finetuning import run_retrieval_finetuning

from .test_pretraining import tiny_recipe


NUM_SAMPLES, BATCH_SIZE = 20, 4  # 5 micro-batches an epoch


class Recorder(torch.nn.Module):
    """Records the `(sample id, sample seed)` pairs of every micro-batch it is given."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, index, seed):
        self.seen.append(list(zip(index.tolist(), seed.tolist())))
        loss = (self.weight - index.float().mean()).pow(2).sum()
        return ModelOutput(loss=loss, x_loss=loss)


class Indexed(torch.utils.data.Dataset):
    def __len__(self):
        return NUM_SAMPLES

    def __getitem__(self, item):
        index, seed = item
        return {"index": torch.tensor(index), "seed": torch.tensor(seed)}


def _sampler() -> MixtureSampler:
    # Shuffled per epoch, then grouped by a length that varies with the sample, as pretraining's sampler is.
    return MixtureSampler(
        [NUM_SAMPLES],
        [1.0],
        seed=7,
        sample_lengths=lambda samples: [(index % 3, index % 5) for index, _ in samples],
        group_size=BATCH_SIZE,
        pool_groups=2,
    )


def _stage(folder: Path, seen: list, max_steps: int, accumulation: int) -> Stage:
    sampler = _sampler()
    loader = torch.utils.data.DataLoader(Indexed(), batch_size=BATCH_SIZE, sampler=sampler)
    schedule = Schedule(
        learning_rate=0.01, max_steps=max_steps, warmup_steps=0, gradient_accumulation_steps=accumulation
    )
    return Stage(name="order", model=Recorder(seen), dataloader=loader, folder=folder, sampler=sampler,
                 schedule=schedule)  # fmt: skip


def _settings(**overrides) -> LoopSettings:
    return LoopSettings(loss_names=("x",), logging_steps=1, checkpointing_steps=1, **overrides)


@pytest.mark.parametrize(
    ("stop_after", "accumulation"),
    [(2, 1), (7, 1), (11, 1), (4, 2)],
    ids=["stopped-in-epoch-0", "stopped-in-epoch-1", "stopped-in-epoch-2", "accumulated-stopped-in-epoch-1"],
)
def test_a_resumed_stage_sees_the_batches_of_an_uninterrupted_one_in_every_epoch(tmp_path, stop_after, accumulation):
    epochs, batches_per_epoch = 4, NUM_SAMPLES // BATCH_SIZE
    max_steps = epochs * steps_per_epoch(batches_per_epoch, accumulation)
    accelerator = build_accelerator(tmp_path, report_to="none", cpu=True)
    straight: list = []
    run_stage(accelerator, _stage(tmp_path / "straight", straight, max_steps, accumulation), _settings())
    accelerator.free_memory()
    first: list = []
    with pytest.raises(TrainingStopped):
        run_stage(
            accelerator,
            _stage(tmp_path / "resumed", first, max_steps, accumulation),
            _settings(stop_after_global_step=stop_after),
        )
    accelerator.free_memory()
    rest: list = []
    run_stage(accelerator, _stage(tmp_path / "resumed", rest, max_steps, accumulation), _settings(), resume=True)
    accelerator.free_memory()

    sampler = _sampler()
    assert len(straight) == epochs * batches_per_epoch
    for epoch in range(epochs):
        part = slice(epoch * batches_per_epoch, (epoch + 1) * batches_per_epoch)
        order = sampler.indices(epoch)
        expected = [order[i : i + BATCH_SIZE] for i in range(0, NUM_SAMPLES, BATCH_SIZE)]
        assert [[tuple(s) for s in batch] for batch in straight[part]] == expected, f"epoch {epoch}, straight"
        assert (first + rest)[part] == straight[part], f"epoch {epoch}, stopped after step {stop_after} and resumed"


# --------------------------------------------------------------------------------------------- whole runs


def _assert_same_weights(reference_dir: Path, resumed_dir: Path) -> None:
    reference = load_file(reference_dir / "final" / "model.safetensors")
    weights = load_file(resumed_dir / "final" / "model.safetensors")
    assert reference.keys() == weights.keys()
    for key in reference:
        torch.testing.assert_close(weights[key], reference[key], atol=1e-6, rtol=1e-5, msg=f"{key} differs")


def _pretraining_recipe(output_dir: Path, dropout: float = 0.0):
    recipe = tiny_recipe(output_dir, checkpointing_steps=2, save_total_limit=None)
    recipe["model"]["config"].update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    stage = dict(recipe["stages"][0])
    # 16 pairs by 4: 4 steps an epoch, so 10 steps run into a third epoch.
    stage["sources"] = [{"name": "s", "type": "synthetic", "num_images": 8, "seed": 0, "regions": "annotations"}]
    stage["max_steps"], stage["per_device_train_batch_size"] = 10, 4
    recipe["stages"] = [stage]
    return recipe_from_dict(recipe)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_pretraining_stopped_in_its_second_epoch_resumes_to_the_same_weights(tmp_path, one_thread, dropout):
    """With dropout on, every mask after the resume must be the uninterrupted run's: nothing may draw from the
    global RNG once more on resuming (a DataLoader's iterator, made anew, would)."""
    straight = run_pretraining(_pretraining_recipe(tmp_path / "straight", dropout))
    with pytest.raises(TrainingStopped):
        run_pretraining(_pretraining_recipe(tmp_path / "resumed", dropout), PretrainingRunOptions(stop_after_steps=6))
    resumed = run_pretraining(_pretraining_recipe(tmp_path / "resumed", dropout), PretrainingRunOptions(resume=True))
    assert [e["loss"] for e in resumed["history"]] == pytest.approx([e["loss"] for e in straight["history"]], rel=1e-5)
    _assert_same_weights(tmp_path / "straight" / "stage1-noisy", tmp_path / "resumed" / "stage1-noisy")


def test_retrieval_finetuning_stopped_in_its_second_epoch_resumes_to_the_same_weights(tmp_path, one_thread):
    def arguments(output_dir: Path, **flags) -> RetrievalArguments:
        # 16 captions by 4: 4 steps an epoch, so 10 steps run into a third epoch.
        return RetrievalArguments(
            output_dir=str(output_dir), synthetic_images=8, eval_images=0, max_steps=10, per_device_train_batch_size=4,
            report_to="none", logging_steps=1, checkpointing_steps=2, cpu=True, **flags,
        )  # fmt: skip

    straight = run_retrieval_finetuning(arguments(tmp_path / "straight"))
    with pytest.raises(TrainingStopped):
        run_retrieval_finetuning(arguments(tmp_path / "resumed", stop_after_steps=6))
    resumed = run_retrieval_finetuning(arguments(tmp_path / "resumed", resume=True))
    assert [h["step"] for h in resumed["history"]] == list(range(1, 11))
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in straight["history"]], rel=1e-5)
    _assert_same_weights(tmp_path / "straight", tmp_path / "resumed")
