"""The training step's batch equivalences: k accumulated micro-batches give the gradients of one k-times
batch, and W data-parallel workers (DDP over gloo, gather-with-grad local loss) give the gradients of one
worker with a W-times batch -- so the global batch size means the same however it is split, and an elastic
run that loses a worker and accumulates twice as many micro-batches takes the same step."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import clip_core
from clip_core.training import accumulated_train_step
from tests.gradients import assert_gradients_close

MODEL = "ViT-Tiny-16"


def _batch(n: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 64, 64, generator=g)
    texts = clip_core.tokenize([f"a {['red', 'blue', 'green'][i % 3]} shape number {i}" for i in range(n)])
    return images, texts


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return clip_core.create_model(MODEL)


def _gradients_after_step(model, loss_fn, micro_batches) -> dict[str, torch.Tensor]:
    return _step(model, loss_fn, micro_batches)[1]


def _step(model, loss_fn, micro_batches) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step's loss and gradients. lr 0: the step leaves the weights as they were and the gradients of
    this step in .grad."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = accumulated_train_step(model, loss_fn, optimizer, micro_batches)
    module = getattr(model, "module", model)
    return loss, {name: p.grad.detach().clone() for name, p in module.named_parameters()}


def _split(images, texts, parts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(images.chunk(parts), texts.chunk(parts)))


def _assert_same_gradients(ours: dict, reference: dict) -> None:
    assert_gradients_close(ours, reference, rel=1e-4)


def test_accumulating_k_micro_batches_equals_one_k_times_batch():
    torch.set_num_threads(2)
    images, texts = _batch(12)
    reference = _gradients_after_step(_model(), clip_core.ClipLoss(), [(images, texts)])
    accumulated = _gradients_after_step(_model(), clip_core.ClipLoss(), _split(images, texts, 4))
    _assert_same_gradients(accumulated, reference)
    # The logit scale gets its gradient once, not once per micro-batch.
    assert reference["logit_scale"].abs().item() > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, accum_steps: int, local_batch: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        images, texts = _batch(world_size * local_batch)
        mine = slice(rank * local_batch, (rank + 1) * local_batch)
        model = torch.nn.parallel.DistributedDataParallel(_model())
        loss_fn = clip_core.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
        micro = _split(images[mine], texts[mine], accum_steps)
        loss, grads = _step(model, loss_fn, micro)
        # Each rank's loss is its own rows' share; the job logs their mean, which is the global batch's loss.
        dist.all_reduce(loss)
        if rank == 0:
            torch.save({"loss": loss / world_size, "grads": grads}, out)
    finally:
        dist.destroy_process_group()


def _ddp_step(tmp_path, world_size: int, accum_steps: int, local_batch: int) -> dict:
    out = str(tmp_path / f"grads_{world_size}_{accum_steps}.pt")
    mp.start_processes(
        _ddp_worker,
        args=(world_size, _free_port(), accum_steps, local_batch, out),
        nprocs=world_size,
        start_method="fork",
    )
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("accum_steps", [1, 2], ids=["no-accumulation", "accumulate-2"])
def test_two_ddp_workers_with_batch_b_equal_one_worker_with_batch_2b(tmp_path, accum_steps):
    torch.set_num_threads(2)
    local_batch = 4
    images, texts = _batch(2 * local_batch)
    reference = _gradients_after_step(_model(), clip_core.ClipLoss(), [(images, texts)])
    distributed = _ddp_step(tmp_path, world_size=2, accum_steps=accum_steps, local_batch=local_batch)
    _assert_same_gradients(distributed["grads"], reference)


def test_one_worker_accumulating_2a_micro_batches_takes_the_step_of_two_workers_accumulating_a(tmp_path):
    """What an elastic run does when it drops from 2 workers to 1: the micro-batch stays, accumulation
    doubles, and the step -- loss and gradients, all negatives of the global batch included -- is the same."""
    torch.set_num_threads(2)
    micro, accum = 2, 2
    images, texts = _batch(2 * accum * micro)
    one_loss, one_grads = _step(_model(), clip_core.ClipLoss(), _split(images, texts, 2 * accum))
    two = _ddp_step(tmp_path, world_size=2, accum_steps=accum, local_batch=accum * micro)
    torch.testing.assert_close(two["loss"], one_loss, rtol=1e-5, atol=0)
    _assert_same_gradients(two["grads"], one_grads)
    # Not vacuous: scoring each micro-batch against its own negatives only gives another loss.
    model = _model()
    with torch.no_grad():
        alone = [clip_core.ClipLoss()(*model(i, t)) for i, t in _split(images, texts, 2 * accum)]
    assert abs(torch.stack(alone).mean().item() - one_loss.item()) > 1e-3
