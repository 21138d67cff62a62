"""Training numerics are pinned: refactoring the loop or the runners must not change a single loss.

`tests/data/training_determinism.json` holds, for the tiny two-stage pretraining recipe and a tiny retrieval
fine-tuning run, every setting (the whole recipe and every `RetrievalArguments` field, so that later changes of
defaults do not move it) and the loss of every step, written by the code before the stage runner was shared. The
tests rerun both and compare the losses bit for bit (every step, every task; the random draws of masking, negatives
and data order all feed them). A deliberate change of the numerics rewrites the file:

    python tests/test_training_determinism.py --write

Float results can differ in the last bits between torch builds or CPU instruction sets; on a machine other than
the one recorded (torch version, processor and the instruction set torch's CPU kernels use; a record without the
last is from an unknown one), the comparison allows a relative 1e-5 instead of equality.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest
import torch


GOLDEN = Path(__file__).resolve().parent / "data" / "training_determinism.json"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = PROJECT_ROOT / "examples" / "configs" / "pretrain_tiny_synthetic.yaml"
LOSS_KEYS = ("loss", "mlm", "moc", "mrfr", "itm", "binary", "multiclass", "triplet", "contrastive", "lr")

# A tiny retrieval run that goes through every random draw of fine-tuning: random negatives of both kinds, then
# in-batch negatives mined by the unimodal heads, three retrieval losses and the contrastive one.
RETRIEVAL_SETTINGS = {
    "synthetic_images": 24,
    "eval_images": 0,
    "loss_weights": "binary=1,multiclass=0.5,triplet=1",
    "negative_mining": "contrastive",
    "num_negatives": 2,
    "per_device_train_batch_size": 6,
    "max_steps": 6,
    "logging_steps": 1,
    "learning_rate": 1e-3,
    "seed": 7,
    "report_to": "none",
    "cpu": True,
}


def _machine() -> dict[str, str]:
    # The kernels torch picks follow the CPU's instruction set (AVX2, AVX512, ...), and so do the last bits of a sum.
    return {
        "torch": torch.__version__,
        "processor": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
    }


def _losses(history: list[dict]) -> list[dict]:
    return [{key: entry[key] for key in ("step", "stage", *LOSS_KEYS) if key in entry} for entry in history]


def run_tiny_pretraining(recipe_dict: dict, output_dir: Path) -> list[dict]:
    from imagebert_hf.training import run_pretraining
    from imagebert_hf.training.recipe import recipe_from_dict

    recipe = recipe_from_dict({**recipe_dict, "output_dir": str(output_dir)}, where="determinism recipe")
    return _losses(run_pretraining(recipe)["history"])


def run_tiny_retrieval(arguments: dict, output_dir: Path) -> list[dict]:
    from imagebert_hf.training import RetrievalArguments, run_retrieval_finetuning

    args = RetrievalArguments(**{**arguments, "output_dir": str(output_dir)})
    return _losses(run_retrieval_finetuning(args)["history"])


def write_golden(work_dir: Path) -> dict:
    """Runs both and writes the settings and losses to `GOLDEN` (the recipe and arguments spelled out in full)."""
    import dataclasses

    from imagebert_hf.training import RetrievalArguments
    from imagebert_hf.training.recipe import load_recipe, recipe_to_dict

    recipe_dict = recipe_to_dict(load_recipe(TINY_RECIPE, ["report_to=none", "logging_steps=1"]))
    recipe_dict.pop("output_dir")
    arguments = dataclasses.asdict(RetrievalArguments(output_dir="unused", **RETRIEVAL_SETTINGS))
    arguments.pop("output_dir")
    golden = {
        "machine": _machine(),
        "recipe": recipe_dict,
        "retrieval_arguments": arguments,
        "pretraining": run_tiny_pretraining(recipe_dict, work_dir / "pretraining"),
        "retrieval": run_tiny_retrieval(arguments, work_dir / "retrieval"),
    }
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n", encoding="utf-8")
    return golden


def _assert_same(got: list[dict], expected: list[dict], what: str, exact: bool) -> None:
    assert [entry["step"] for entry in got] == [entry["step"] for entry in expected], f"{what}: logged steps differ"
    for entry, reference in zip(got, expected):
        assert set(entry) == set(reference), f"{what} step {reference['step']}: logged keys differ"
        for key, value in reference.items():
            if exact or not isinstance(value, float):
                assert entry[key] == value, f"{what} step {reference['step']} {key}: {entry[key]!r} != {value!r}"
            else:
                assert entry[key] == pytest.approx(value, rel=1e-5), f"{what} step {reference['step']} {key}"


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


def test_pretraining_losses_are_unchanged(golden, tmp_path, one_thread):
    got = run_tiny_pretraining(golden["recipe"], tmp_path / "pretraining")
    assert len(got) == 12 and {entry["stage"] for entry in got} == {"noisy", "clean"}
    _assert_same(got, golden["pretraining"], "pretraining", exact=golden["machine"] == _machine())


def test_retrieval_finetuning_losses_are_unchanged(golden, tmp_path, one_thread):
    got = run_tiny_retrieval(golden["retrieval_arguments"], tmp_path / "retrieval")
    assert len(got) == 6
    _assert_same(got, golden["retrieval"], "retrieval fine-tuning", exact=golden["machine"] == _machine())


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_training_determinism.py --write  (rewrites tests/data/" + GOLDEN.name + ")")
    import torch

    torch.set_num_threads(1)  # as the tests run it (`one_thread`)
    with tempfile.TemporaryDirectory() as folder:
        written = write_golden(Path(folder))
    print(f"wrote {GOLDEN}: {len(written['pretraining'])} pretraining and {len(written['retrieval'])} retrieval steps")
