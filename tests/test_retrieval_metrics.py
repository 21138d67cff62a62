"""Recall@K against hand-computed cases, and the `evaluate` module shipped in the package."""

import numpy as np
import pytest
import torch

from imagebert_hf.evaluation.recall import format_metrics_table, retrieval_metrics, retrieval_ranks


def test_perfect_and_reversed_one_caption_per_image():
    scores = np.eye(4)
    metrics = retrieval_metrics(scores, [0, 1, 2, 3])
    assert metrics == {
        "tr_r1": 100.0, "tr_r5": 100.0, "tr_r10": 100.0, "ir_r1": 100.0, "ir_r5": 100.0, "ir_r10": 100.0,
        "rsum": 600.0,
    }  # fmt: skip
    # Correct pairs score lowest: every query ranks its answer last (rank 3 of 4), a hit only at K >= 4.
    metrics = retrieval_metrics(-np.eye(4), [0, 1, 2, 3], ks=(1, 3, 4))
    assert metrics["tr_r1"] == metrics["tr_r3"] == metrics["ir_r1"] == metrics["ir_r3"] == 0.0
    assert metrics["tr_r4"] == metrics["ir_r4"] == 100.0


def test_several_captions_per_image_hand_computed():
    # 3 images; texts 0,1 -> image 0; texts 2,3 -> image 1; text 4 -> image 2.
    text_to_image = [0, 0, 1, 1, 2]
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.2, 0.3],  # image 0: best caption (text 1) ranked 1st -> TR rank 0
            [0.8, 0.1, 0.7, 0.3, 0.2],  # image 1: text 0 (0.8) above its best caption text 2 (0.7) -> rank 1
            [0.6, 0.5, 0.4, 0.9, 0.2],  # image 2: its only caption (0.2) is last of 5 -> rank 4
        ]
    )
    tr_ranks, ir_ranks = retrieval_ranks(scores, text_to_image)
    assert tr_ranks.tolist() == [0, 1, 4]
    # text 0: image 0 scores 0.1, images 1 (0.8) and 2 (0.6) above -> 2; text 1: 0.9 top -> 0;
    # text 2: image 1 0.7 top -> 0; text 3: image 1 0.3, image 2 (0.9) above -> 1;
    # text 4: image 2 0.2, image 0 (0.3) above and image 1 (0.2) tied -> 2
    assert ir_ranks.tolist() == [2, 0, 0, 1, 2]
    metrics = retrieval_metrics(scores, text_to_image, ks=(1, 2))
    assert metrics["tr_r1"] == pytest.approx(100 / 3)
    assert metrics["tr_r2"] == pytest.approx(200 / 3)
    assert metrics["ir_r1"] == pytest.approx(40.0)
    assert metrics["ir_r2"] == pytest.approx(60.0)
    assert metrics["rsum"] == pytest.approx(100 / 3 + 200 / 3 + 40 + 60)


def test_ties_count_against_the_query():
    # A constant scorer must not look perfect: every candidate ties with the correct one.
    metrics = retrieval_metrics(np.zeros((3, 3)), [0, 1, 2], ks=(1, 2, 3))
    assert metrics["tr_r1"] == metrics["tr_r2"] == metrics["ir_r1"] == metrics["ir_r2"] == 0.0
    assert metrics["tr_r3"] == metrics["ir_r3"] == 100.0
    # One tie with a wrong candidate: rank 1 instead of 0, whatever the gallery order.
    scores = np.array([[0.5, 0.5], [0.1, 0.9]])
    tr_ranks, ir_ranks = retrieval_ranks(scores, [0, 1])
    assert tr_ranks.tolist() == [1, 0]
    assert ir_ranks.tolist() == [0, 0]
    tr_swapped, _ = retrieval_ranks(scores[:, ::-1].copy(), [1, 0])
    assert tr_swapped.tolist() == [1, 0]
    # Ties between two captions of the same image do not hurt that image.
    tr_ranks, _ = retrieval_ranks(np.array([[0.7, 0.7, 0.1], [0.0, 0.0, 1.0]]), [0, 0, 1])
    assert tr_ranks.tolist() == [0, 0]


def test_folds_average_independent_rankings():
    # 4 images in 2 folds, one caption each. Image 1's caption is beaten by image 2's caption (another fold),
    # which only matters when the 4 images are ranked together.
    scores = np.array(
        [
            [0.9, 0.1, 0.0, 0.0],
            [0.0, 0.5, 0.8, 0.0],
            [0.0, 0.0, 0.9, 0.1],
            [0.0, 0.3, 0.2, 0.1],
        ]
    )
    text_to_image = [0, 1, 2, 3]
    whole = retrieval_metrics(scores, text_to_image, ks=(1,))
    # TR ranks [0, 1, 0, 2] (image 1's caption is beaten by text 2); IR ranks [0, 0, 0, 1] (text 3 ties image 2).
    assert whole["tr_r1"] == 50.0
    assert whole["ir_r1"] == 75.0
    folds = retrieval_metrics(scores, text_to_image, num_folds=2, ks=(1,))
    # Fold 0: images 0,1 and texts 0,1 -> all correct. Fold 1: [[0.9, 0.1], [0.2, 0.1]] -> TR [0, 1]; IR text3
    # (0.1) ties image 2 (0.1) -> miss. So TR = (100 + 50) / 2, IR = (100 + 50) / 2.
    assert folds["tr_r1"] == 75.0
    assert folds["ir_r1"] == 75.0
    assert folds["rsum"] == 150.0
    # Fold averages equal the mean of the per-fold metrics computed separately.
    fold1 = retrieval_metrics(scores[2:, 2:], [0, 1], ks=(1,))
    assert folds["tr_r1"] == pytest.approx((100.0 + fold1["tr_r1"]) / 2)


def test_coco_style_layout_five_captions_shuffled_columns():
    rng = np.random.default_rng(0)
    num_images = 10
    text_to_image = np.repeat(np.arange(num_images), 5)
    perm = rng.permutation(len(text_to_image))
    text_to_image = text_to_image[perm]
    scores = rng.normal(size=(num_images, len(text_to_image)))
    # A caption gets a clear margin only for images 0..6; 7, 8, 9 have none.
    for t, i in enumerate(text_to_image):
        if i < 7:
            scores[i, t] += 100.0
    metrics = retrieval_metrics(scores, text_to_image, num_folds=2)
    tr_ranks, ir_ranks = retrieval_ranks(scores, text_to_image)
    assert (tr_ranks[:7] == 0).all()
    # Brute force agrees with the vectorised ranks.
    for i in range(num_images):
        best = max(scores[i, t] for t in range(len(text_to_image)) if text_to_image[t] == i)
        expected = sum(scores[i, t] >= best for t in range(len(text_to_image)) if text_to_image[t] != i)
        assert tr_ranks[i] == expected
    for t, i in enumerate(text_to_image):
        assert ir_ranks[t] == sum(scores[j, t] >= scores[i, t] for j in range(num_images) if j != i)
    assert 0 < metrics["ir_r1"] < 100


@pytest.mark.parametrize(
    ("scores", "text_to_image", "num_folds", "message"),
    [
        (np.zeros((0, 3)), [], 1, "empty"),
        (np.zeros((2, 3)), [0, 1], 1, "3 texts"),
        (np.zeros((2, 2)), [0, 2], 1, r"\[0, 2\)"),
        (np.zeros((2, 2)), [0, 0], 1, "no caption"),
        (np.array([[0.0, np.nan], [0.0, 1.0]]), [0, 1], 1, "finite"),
        (np.zeros((3, 3)), [0, 1, 2], 2, "divisor"),
        (np.zeros(3), [0, 1, 2], 1, "matrix"),
    ],
)
def test_bad_input_is_named(scores, text_to_image, num_folds, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(scores, text_to_image, num_folds=num_folds)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        # 0.7, 1.2, 1.9 were cut to images 0, 1, 1 and scored as such.
        ({"text_to_image": [0.7, 1.2, 1.9]}, ValueError, r"whole image indices; got float64 values such as \[0.7\]"),
        ({"text_to_image": [0.0, float("nan"), 2.0]}, ValueError, r"such as \[nan\]"),
        ({"text_to_image": [True, False, True]}, ValueError, r"got bool values"),
        ({"num_folds": "3"}, TypeError, r"num_folds must be an integer, got '3'"),
        ({"num_folds": 3.0}, TypeError, r"num_folds must be an integer, got 3.0"),
        ({"ks": (0,)}, ValueError, r"ks must be a non-empty list of positive integers"),
        ({"ks": ()}, ValueError, r"ks must be a non-empty list"),
    ],
)
def test_indices_folds_and_cut_offs_that_are_not_whole_counts_are_refused(kwargs, error, message):
    arguments = {"text_to_image": [0, 1, 2], **kwargs}
    with pytest.raises(error, match=message):
        retrieval_metrics(np.eye(3), **arguments)
    # Whole floats are indices, as they are elsewhere.
    assert retrieval_metrics(np.eye(3), [0.0, 1.0, 2.0])["rsum"] == 600.0


def test_table_formatting():
    table = format_metrics_table({"toy": retrieval_metrics(np.eye(2), [0, 1])})
    assert table.splitlines()[2] == "| toy | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 600.0 |"


def test_evaluate_module_loads_offline_by_path(tmp_path, monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    from imagebert_hf.metrics import retrieval_metric_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    metric = evaluate.load(retrieval_metric_path(), cache_dir=str(tmp_path / "cache"))
    scores = np.array([[0.9, 0.8, 0.1], [0.2, 0.3, 0.7]])
    # Texts arrive in batches, one score row per text (its scores against every image).
    metric.add_batch(predictions=scores.T[:2].tolist(), references=[0, 0])
    metric.add_batch(predictions=scores.T[2:].tolist(), references=[1])
    result = metric.compute()
    assert result == pytest.approx(retrieval_metrics(scores, [0, 0, 1]))
    assert result["ir_r1"] == 100.0


def test_the_evaluate_module_refuses_a_fractional_reference_rather_than_truncating_it(tmp_path, monkeypatch):
    """Declared as int64, the references were cast by Arrow before the metric saw them: 1.7 silently became image 1.
    They now reach `retrieval_metrics`, which refuses indices that are not whole, as it does when called directly."""
    evaluate = pytest.importorskip("evaluate")
    from imagebert_hf.metrics import retrieval_metric_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    metric = evaluate.load(retrieval_metric_path(), cache_dir=str(tmp_path / "cache"))
    scores = [[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]]
    assert metric.compute(predictions=scores, references=[0, 1, 1])["rsum"] == pytest.approx(
        retrieval_metrics(np.asarray(scores).T, [0, 1, 1])["rsum"]
    )
    with pytest.raises(ValueError, match="whole"):
        metric.compute(predictions=scores, references=[0, 1.7, 1])
