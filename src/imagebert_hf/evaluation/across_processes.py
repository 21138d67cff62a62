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

    Raises:
        ValueError: on every process, when the processes hold different pairs (their shares would not fit
            together): a shortlist from an approximate index can differ between processes.
    """
    from accelerate import PartialState
    from accelerate.utils import gather, pad_across_processes

    processes = PartialState()
    if processes.num_processes == 1:
        return score_pairs(model, text_inputs, region_inputs, image_indices, text_indices, batch_size, progress)
    count, shares = len(image_indices), processes.num_processes
    _check_same_pairs(image_indices, text_indices, processes.device)
    bounds = [count * share // shares for share in range(shares + 1)]
    start, end = bounds[processes.process_index], bounds[processes.process_index + 1]
    reported = 0

    def local_progress(done: int) -> None:
        nonlocal reported
        reported += done * shares
        progress(done * shares)

    local = score_pairs(
        model,
        text_inputs,
        region_inputs,
        image_indices[start:end],
        text_indices[start:end],
        batch_size,
        None if progress is None else local_progress,
    )
    # Shares differ by one pair at most; the collective needs equal lengths (and the device of the backend).
    padded = pad_across_processes(local.to(processes.device), dim=0)
    gathered, width = gather(padded).cpu(), padded.shape[0]
    if progress is not None and reported < count:  # this process's share was the smallest: the bar ends at the total
        progress(count - reported)
    return torch.cat(
        [gathered[share * width : share * width + bounds[share + 1] - bounds[share]] for share in range(shares)]
    )


def _check_same_pairs(image_indices: torch.Tensor, text_indices: torch.Tensor, device) -> None:
    """Raises on every process unless all hold the same pairs in the same order (their count and an
    order-sensitive sum, compared over the processes), read in slices so that 125M pairs cost no extra gigabytes."""
    from accelerate.utils import gather

    image_indices, text_indices = torch.as_tensor(image_indices), torch.as_tensor(text_indices)
    total, step = 0, 1 << 22
    for start in range(0, len(image_indices), step):
        pairs = image_indices[start : start + step].long() * 1_000_003 + text_indices[start : start + step].long()
        positions = torch.arange(start + 1, start + len(pairs) + 1, dtype=torch.long)
        total = (total + int((pairs * positions).sum())) % (1 << 61)
    signature = torch.tensor([len(image_indices), total], dtype=torch.long, device=device)
    signatures = gather(signature).view(-1, 2).cpu()
    if not bool((signatures == signatures[0]).all()):
        raise ValueError(
            f"the processes hold different pairs to score ({', '.join(str(int(n)) for n in signatures[:, 0])} "
            "pairs): each must build the same list, and an approximate shortlist index (ivf, hnsw, or one on a "
            "GPU) can differ between processes; use index_type='flat' or one process."
        )


__all__ = ["score_pairs_across_processes"]
