"""Cross-encoder scoring split across the processes of a launch (`accelerate launch evaluate_retrieval.py`): each
process scores a contiguous share of the pairs on its own device, and every process gets all the scores back.

Full ranking of COCO's 5k test images scores 125M pairs, hours on one GPU; with N processes each scores a 1/N share.
The scores are those of one process up to float rounding (a share batches its pairs differently).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..models.imagebert.retrieval_index import RegionBatches, score_pairs


def score_pairs_across_processes(
    model,
    text_inputs: Mapping,
    region_inputs: Mapping | RegionBatches,
    image_indices: torch.Tensor,
    text_indices: torch.Tensor,
    batch_size: int = 256,
    progress: Callable | None = None,
) -> torch.Tensor:
    """`score_pairs` with the pairs shared out over the processes of the current launch (one process: the same as
    `score_pairs`). Call it on every process, with the same pairs. `progress` is called with the pairs done by all
    processes, estimated as this process's times their number (shares differ by one pair at most).

    Returns:
        `torch.Tensor` of shape `(num_pairs,)`, float32 on the CPU, on every process.
    """
    from accelerate import PartialState
    from accelerate.utils import gather, pad_across_processes

    processes = PartialState()
    if processes.num_processes == 1:
        return score_pairs(model, text_inputs, region_inputs, image_indices, text_indices, batch_size, progress)
    count, shares = len(image_indices), processes.num_processes
    bounds = [count * share // shares for share in range(shares + 1)]
    start, end = bounds[processes.process_index], bounds[processes.process_index + 1]
    local_progress = None if progress is None else (lambda done: progress(done * shares))
    local = score_pairs(
        model,
        text_inputs,
        region_inputs,
        image_indices[start:end],
        text_indices[start:end],
        batch_size,
        local_progress,
    )
    # Shares differ by one pair at most; the collective needs equal lengths (and the device of the backend).
    padded = pad_across_processes(local.to(processes.device), dim=0)
    gathered, width = gather(padded).cpu(), padded.shape[0]
    return torch.cat(
        [gathered[share * width : share * width + bounds[share + 1] - bounds[share]] for share in range(shares)]
    )


__all__ = ["score_pairs_across_processes"]
