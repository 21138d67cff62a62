"""Image-text retrieval recall@K (TR and IR R@1/5/10 and RSUM) as an `evaluate` metric."""

import datasets
import evaluate
import numpy as np

from imagebert_hf.evaluation.recall import check_ks, retrieval_metrics


_DESCRIPTION = """
Recall@K of cross-modal retrieval from a score matrix, as reported for ImageBERT, UNITER and BLIP. Every example is
one text: its prediction is its row of scores against the whole image gallery (higher is better) and its reference
is the index of the image it describes. An image may have several texts. TR (image query, text gallery) counts an
image as found at K when any of its captions is among the K best texts; IR (text query, image gallery) counts a
text as found when its image is among the K best images. Ties count against the query.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[float]]`): for each text, its score against every image of the gallery.
    references (`list[int]`): for each text, the index of its image.
    num_folds (`int`, defaults to 1): rank consecutive equal folds of the images separately and average
        (5 for COCO 1k).
    ks (`list[int]`, defaults to [1, 5, 10]): the cut-offs K, positive integers (a list, tuple or 1-D integer array).
Returns:
    tr_r1, tr_r5, tr_r10, ir_r1, ir_r5, ir_r10 (percent) and rsum, their sum.
Examples:
    >>> metric = evaluate.load(retrieval_metric_path())
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[0, 1])["rsum"]
    600.0
"""

_CITATION = """
@article{qi2020imagebert,
  title={ImageBERT: Cross-modal Pre-training with Large-scale Weak-supervised Image-Text Data},
  author={Qi, Di and Su, Lin and Song, Jia and Cui, Edward and Bharti, Taroon and Sacheti, Arun},
  journal={arXiv preprint arXiv:2001.07966},
  year={2020}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ImageTextRetrieval(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("float64")}
            ),
            reference_urls=["https://arxiv.org/abs/2001.07966"],
        )

    def _compute(self, predictions, references, num_folds: int = 1, ks=(1, 5, 10)) -> dict[str, float]:
        ks = check_ks(ks)
        # Checked row by row: numpy's message for ragged rows names no text.
        expected = len(predictions[0]) if len(predictions) else 0
        for text, row in enumerate(predictions):
            if len(row) != expected:
                raise ValueError(
                    f"predictions: text {text} has {len(row)} scores where {expected} were expected (one per gallery "
                    "image, the same number for every text)."
                )
        scores = np.asarray(predictions, dtype=np.float64)
        if scores.ndim != 2:
            raise ValueError("every prediction must hold one score per gallery image, the same number for all texts.")
        bad = np.argwhere(~np.isfinite(scores))
        if len(bad):
            text, image = (int(i) for i in bad[0])
            raise ValueError(
                f"predictions[{text}][{image}] is {scores[text, image]}; every score must be a finite number (a "
                "missing score reads as nan)."
            )
        return retrieval_metrics(scores.T, np.asarray(references), num_folds=num_folds, ks=ks)


__all__ = ["ImageTextRetrieval"]
