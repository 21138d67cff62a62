"""The model under FSDP (`fully_shard`, FSDP2) with auto-wrap from `_no_split_modules`: two CPU processes over gloo,
one training step, checked against the same step without FSDP. (FSDP1 needs an accelerator device; FSDP2 runs on
CPU.)"""

import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from imagebert_hf import ImageBERTConfig, ImageBERTForPreTraining

from .test_modeling_imagebert import ImageBERTModelTester
from .testing_utils import tiny_config_kwargs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _batch(config, rank):
    tester = ImageBERTModelTester(batch_size=3, seed=rank)
    inputs = tester.prepare_inputs(config)
    return {**inputs, **tester.prepare_pretraining_targets(config, inputs)}


def _worker(rank, world_size, port, folder):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        config = ImageBERTConfig(**tiny_config_kwargs())
        torch.manual_seed(0)
        model = ImageBERTForPreTraining(config).train()
        reference = ImageBERTForPreTraining(config).train()
        reference.load_state_dict(model.state_dict())
        names = [name for name, _ in model.named_parameters()]
        # Auto-wrap from `_no_split_modules`: each module of those classes is an FSDP unit, the root holds the rest.
        # FSDP2 wants a tied parameter in one unit, so the embeddings share one with the MLM head
        # (its decoder is tied to the word embeddings, its bias to the head's).
        mesh = init_device_mesh("cpu", (world_size,))
        for module in model.modules():
            if type(module).__name__ in model._no_split_modules:
                if module is model.bert.embeddings:
                    assert model.get_output_embeddings().weight is module.word_embeddings.weight
                    fully_shard([module, model.cls.predictions], mesh=mesh)
                else:
                    fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        units = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]

        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        batch = _batch(config, rank)
        loss = model(**batch, sparse_prediction=True).loss
        loss.backward()
        optimizer.step()

        # The same step without FSDP: the mean of both processes' gradients, applied to the full model.
        reference_loss = reference(**batch, sparse_prediction=True).loss
        reference_loss.backward()
        for parameter in reference.parameters():
            dist.all_reduce(parameter.grad)
            parameter.grad /= world_size
        torch.optim.SGD(reference.parameters(), lr=0.1).step()
        updated = dict(zip(names, (p.full_tensor() for p in model.parameters())))
        difference = max((updated[n] - p).abs().max().item() for n, p in reference.named_parameters())
        if rank == 0:
            torch.save(
                {"units": units, "loss": (loss.item(), reference_loss.item()), "difference": difference},
                os.path.join(folder, "result.pt"),
            )
    except BaseException:
        dist.destroy_process_group()
        raise
    _leave_together(folder, rank, world_size)


def _leave_together(folder, rank, world_size, timeout=120.0):
    """End a worker that succeeded without tearing gloo down or finalizing the interpreter.

    Both teardowns are torch's, not the model's, and on a busy machine either can abort a worker now and then with
    "terminate called without an active exception" (a gloo or store thread still running when the interpreter or the
    process group goes away). Each worker marks itself done after the last collective and waits for the others'
    marks, so no process leaves while another can still talk to it; then `os._exit(0)` skips both teardowns.
    """
    Path(folder, f"done.{rank}").touch()
    deadline = time.monotonic() + timeout
    while not all(Path(folder, f"done.{other}").exists() for other in range(world_size)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker {rank}: the other workers did not finish within {timeout:.0f} s")
        time.sleep(0.02)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch without gloo")
def test_fsdp_auto_wrap_training_step_on_two_cpu_processes(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt")
    layers = [f"bert.encoder.layer.{i}" for i in range(2)]
    assert result["units"] == ["", "bert.embeddings", *layers, "cls.predictions"], result["units"]
    torch.testing.assert_close(*result["loss"], atol=1e-6, rtol=1e-6)
    assert result["difference"] < 1e-5
