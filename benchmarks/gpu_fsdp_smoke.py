"""FSDP smoke test on two GPUs (run by `benchmarks/gpu_checks.sh` when a machine has more than one).

Two processes (nccl, one GPU each) shard a small `ImageBERTForPreTraining` with FSDP2 (`fully_shard`, one unit per
`_no_split_modules` module, the embeddings with the tied MLM head) and run a few bf16-autocast AdamW steps on the
same batch; the losses must be finite and fall, and both processes must agree on them. Prints one line with the
losses and `ok`, exits non-zero otherwise.

    python benchmarks/gpu_fsdp_smoke.py                          # 2 GPUs, nccl
    python benchmarks/gpu_fsdp_smoke.py --device cpu --dry_run   # 2 CPU processes over gloo: checks the script
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, device_type: str, steps: int, folder: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from imagebert_hf import ImageBERTConfig, ImageBERTForPreTraining

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world_size)
    try:
        device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
        if device_type == "cuda":
            torch.cuda.set_device(device)
        config = ImageBERTConfig(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            region_feature_size=64,
            num_object_classes=16,
        )
        torch.manual_seed(0)
        model = ImageBERTForPreTraining(config).to(device).train()
        mesh = init_device_mesh(device_type, (world_size,))
        for module in model.modules():
            if type(module).__name__ in model._no_split_modules:
                if module is model.bert.embeddings:
                    fully_shard([module, model.cls.predictions], mesh=mesh)
                else:
                    fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(1)
        batch_size, text, regions = 4, 12, 10
        batch = {
            "input_ids": torch.randint(1000, 2000, (batch_size, text), generator=generator),
            "attention_mask": torch.ones(batch_size, text, dtype=torch.long),
            "region_features": torch.randn(batch_size, regions, 64, generator=generator),
            "region_locations": torch.rand(batch_size, regions, 5, generator=generator),
            "region_attention_mask": torch.ones(batch_size, regions, dtype=torch.long),
            "labels": torch.where(
                torch.rand(batch_size, text, generator=generator) < 0.3,
                torch.randint(1000, 2000, (batch_size, text), generator=generator),
                torch.full((batch_size, text), -100),
            ),
            "masked_regions": torch.rand(batch_size, regions, generator=generator) < 0.3,
            "region_class_labels": torch.randint(0, 16, (batch_size, regions), generator=generator),
            "region_feature_targets": torch.randn(batch_size, regions, 64, generator=generator),
            "itm_labels": torch.tensor([1, 0, 1, 1]),
        }
        batch = {key: value.to(device) for key, value in batch.items()}
        losses = []
        for _ in range(steps):
            with torch.autocast(device_type, dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
        losses = torch.stack(losses)
        gathered = [torch.zeros_like(losses) for _ in range(world_size)]
        dist.all_gather(gathered, losses)
        if rank == 0:
            torch.save([g.cpu() for g in gathered], os.path.join(folder, "losses.pt"))
    finally:
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (nccl, one GPU per process) or cpu (gloo)")
    parser.add_argument("--nproc", type=int, default=2, help="processes")
    parser.add_argument("--steps", type=int, default=5, help="training steps on the same batch")
    parser.add_argument("--dry_run", action="store_true", help="2 steps: checks the script (with --device cpu)")
    args = parser.parse_args()
    if args.dry_run:
        args.steps = 2
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        raise SystemExit(
            f"gpu_fsdp_smoke.py: --nproc {args.nproc} needs that many GPUs, found {torch.cuda.device_count()}."
        )
    if args.device not in ("cuda", "cpu"):
        raise SystemExit(f"gpu_fsdp_smoke.py: --device must be cuda or cpu, got {args.device!r}.")
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(
            _worker, args=(args.nproc, _free_port(), args.device, args.steps, folder), nprocs=args.nproc, join=True
        )
        gathered = torch.load(os.path.join(folder, "losses.pt"))
    losses = gathered[0]
    finite = all(bool(torch.isfinite(g).all()) for g in gathered)
    agree = all(torch.allclose(g, losses, atol=1e-5) for g in gathered)
    falls = bool(losses[-1] < losses[0])
    ok = finite and agree and falls
    print(
        f"FSDP smoke, {args.nproc} processes on {args.device}: losses {[round(v, 4) for v in losses.tolist()]}; "
        f"finite {finite}, same on every process {agree}, falling {falls}: {'ok' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
