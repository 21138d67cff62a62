"""Cross-encoder scoring split across the processes of a launch (`accelerate launch evaluate_retrieval.py`): each
process scores a contiguous share of the pairs on its own device, and every process gets all the scores back.

Full ranking of COCO's 5k test images scores 125M pairs, hours on one GPU; with N processes each scores a 1/N share.
The scores are those of one process up to float rounding (a share batches its pairs differently).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..models.imagebert.retrieval_index import (
    RegionBatches,
    num_region_images,
    prepare_region_inputs,
    prepare_text_inputs,
    score_pair_range,
    score_pairs,
)


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

    Full ranking (`score_all_pairs` with this scorer) lists no pairs: it shares out ranges of the pair list with
    `score_pair_range_across_processes`, the same shares with the same batches.

    Returns:
        `torch.Tensor` of shape `(num_pairs,)`, float32 on the CPU, on every process.

    Raises:
        ValueError: on every process, when the processes hold different pairs (their shares would not fit
            together): a shortlist from an approximate index can differ between processes.
    """
    from accelerate import PartialState

    processes = PartialState()
    if processes.num_processes == 1:
        return score_pairs(model, text_inputs, region_inputs, image_indices, text_indices, batch_size, progress)
    _check_same_pairs(image_indices, text_indices, processes.device)

    def score_share(start: int, end: int, share_progress: Callable | None) -> torch.Tensor:
        return score_pairs(
            model, text_inputs, region_inputs, image_indices[start:end], text_indices[start:end], batch_size,
            share_progress,
        )  # fmt: skip

    return _score_shares(processes, len(image_indices), score_share, progress)


def score_pair_range_across_processes(
    model,
    text_inputs: Mapping,
    region_inputs: Mapping | RegionBatches,
    start: int,
    end: int,
    batch_size: int = 256,
    progress: Callable | None = None,
) -> torch.Tensor:
    """`score_pair_range` with the range shared out over the processes of the current launch: each process scores a
    contiguous share of the pairs `start..end-1` of the image-major list of every pair, computing its batches
    without listing the pairs (COCO 5k's 125M pairs would cost 6.7 GB per process), and gets every score back.
    Call it on every process, with the same inputs and range. `progress` as in `score_pairs_across_processes`.

    Returns:
        `torch.Tensor` of shape `(end - start,)`, float32 on the CPU, on every process.

    Raises:
        ValueError: on every process, when the processes hold galleries or ranges of different sizes.
    """
    from accelerate import PartialState

    processes = PartialState()
    if processes.num_processes == 1:
        return score_pair_range(model, text_inputs, region_inputs, start, end, batch_size, progress)
    num_texts = prepare_text_inputs(text_inputs)["input_ids"].shape[0]
    num_images = num_region_images(prepare_region_inputs(region_inputs))
    _check_same_range(int(start), int(end), num_images, num_texts, processes.device)

    def score_share(share_start: int, share_end: int, share_progress: Callable | None) -> torch.Tensor:
        return score_pair_range(
            model, text_inputs, region_inputs, int(start) + share_start, int(start) + share_end, batch_size,
            share_progress,
        )  # fmt: skip

    return _score_shares(processes, int(end) - int(start), score_share, progress)


# `score_all_pairs` shares out ranges of the pair list rather than the list itself.
score_pairs_across_processes.score_pair_range = score_pair_range_across_processes


def _score_shares(processes, count: int, score_share: Callable, progress: Callable | None) -> torch.Tensor:
    """Scores this process's contiguous share of `count` pairs with `score_share(start, end, progress)` and gathers
    every process's share, in order."""
    from accelerate.utils import gather, pad_across_processes

    shares = processes.num_processes
    bounds = [count * share // shares for share in range(shares + 1)]
    start, end = bounds[processes.process_index], bounds[processes.process_index + 1]
    reported = 0

    def local_progress(done: int) -> None:
        nonlocal reported
        reported += done * shares
        progress(done * shares)

    local = score_share(start, end, None if progress is None else local_progress)
    # Shares differ by one pair at most; the collective needs equal lengths (and the device of the backend).
    padded = pad_across_processes(local.to(processes.device), dim=0)
    gathered, width = gather(padded).cpu(), padded.shape[0]
    if progress is not None and reported < count:  # this process's share was the smallest: the bar ends at the total
        progress(count - reported)
    return torch.cat(
        [gathered[share * width : share * width + bounds[share + 1] - bounds[share]] for share in range(shares)]
    )


def _check_same_range(start: int, end: int, num_images: int, num_texts: int, device) -> None:
    """Raises on every process unless all rank galleries of the same size over the same range of pairs."""
    from accelerate.utils import gather

    signature = torch.tensor([start, end, num_images, num_texts], dtype=torch.long, device=device)
    signatures = gather(signature).view(-1, 4).cpu()
    if not bool((signatures == signatures[0]).all()):
        held = ", ".join(f"{int(i)} x {int(t)} pairs {int(a)}-{int(b)}" for a, b, i, t in signatures.tolist())
        raise ValueError(
            f"the processes hold different pairs to score (images x texts and the range of pairs: {held}): each must "
            "load the same corpus and score the same range."
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


__all__ = ["score_pair_range_across_processes", "score_pairs_across_processes"]
