"""Run by tests/test_retrieval_finetuning.py under `accelerate launch` with two processes: each process contrasts its
own half of a fixed batch of embeddings with every process's (`gather_across_processes`) and writes its loss and the
gradient of its half to `<output_dir>/gather-<rank>.json`."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    from accelerate import PartialState

    from imagebert_hf import ImageBERTConfig, ImageBERTForImageTextRetrieval
    from imagebert_hf.training.retrieval_objective import gather_across_processes

    PartialState()  # starts the launch's process group
    rank = torch.distributed.get_rank()
    generator = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(8, 16, generator=generator), dim=-1)
    regions = F.normalize(torch.randn(8, 16, generator=generator), dim=-1)
    half = slice(4 * rank, 4 * (rank + 1))
    own_text = text[half].clone().requires_grad_(True)
    own_regions = regions[half].clone().requires_grad_(True)
    model = ImageBERTForImageTextRetrieval(ImageBERTConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=8))  # fmt: skip
    all_text, first = gather_across_processes(own_text)
    all_regions, _ = gather_across_processes(own_regions)
    loss = model.contrastive_loss(own_text, own_regions, all_text, all_regions, first)
    loss.backward()
    record = {"rank": rank, "first": first, "rows": all_text.shape[0], "loss": loss.item(),
              "text_grad": own_text.grad.tolist()}  # fmt: skip
    Path(sys.argv[1], f"gather-{rank}.json").write_text(json.dumps(record))
    # Both records are written once both processes pass the barrier; leaving without the interpreter's teardown
    # avoids gloo's threads aborting it (SIGABRT at exit, seen on loaded machines), which is not what is tested.
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
