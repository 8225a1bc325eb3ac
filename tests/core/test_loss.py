"""Tests for clip_core.loss: parity with OpenCLIP on one process, and exactness of the distributed modes
against single-process training on the concatenated batch (two gloo processes on CPU)."""

import socket

import open_clip.loss
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from clip_core.loss import ClipLoss
from clip_core.model import create_model
from clip_core.tokenizer import tokenize
from clip_core.zero_shot import IMAGENET_CLASSNAMES
from tests.gradients import assert_gradients_close

WORLD_SIZE = 2
LOCAL_BATCH = 4  # per rank; the single-process reference trains on both ranks' rows at once
# (local_loss, gather_with_grad) for every distributed mode.
MODES = [(False, True), (True, True), (False, False), (True, False)]


def random_features(batch: int, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image_features = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    text_features = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    return image_features, text_features


def loss_and_grads(loss_fn, image_features, text_features, logit_scale):
    image_features = image_features.clone().requires_grad_(True)
    text_features = text_features.clone().requires_grad_(True)
    logit_scale = logit_scale.clone().requires_grad_(True)
    loss = loss_fn(image_features, text_features, logit_scale)
    loss.backward()
    return loss.detach(), image_features.grad, text_features.grad, logit_scale.grad


@pytest.mark.parametrize("batch", [1, 8, 33])
def test_single_process_loss_and_gradients_equal_open_clip(batch):
    image_features, text_features = random_features(batch)
    logit_scale = torch.tensor(1 / 0.07)
    ours = loss_and_grads(ClipLoss(), image_features, text_features, logit_scale)
    reference = loss_and_grads(open_clip.loss.ClipLoss(), image_features, text_features, logit_scale)
    for got, expected in zip(ours, reference):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_loss_is_mean_of_both_directions_cross_entropy():
    image_features, text_features = random_features(6, seed=1)
    logit_scale = torch.tensor(20.0)
    similarity = logit_scale * image_features @ text_features.T
    labels = torch.arange(6)
    expected = (F.cross_entropy(similarity, labels) + F.cross_entropy(similarity.T, labels)) / 2
    torch.testing.assert_close(ClipLoss()(image_features, text_features, logit_scale), expected)
    # Perfectly aligned pairs of orthogonal features at the maximum scale leave almost no loss.
    identity = torch.eye(6, 16)
    assert ClipLoss()(identity, identity, torch.tensor(100.0)).item() < 1e-6


def test_output_dict_names_the_contrastive_loss():
    image_features, text_features = random_features(5)
    out = ClipLoss()(image_features, text_features, torch.tensor(10.0), output_dict=True)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(
        out["contrastive_loss"], ClipLoss()(image_features, text_features, torch.tensor(10.0))
    )


def test_cached_labels_follow_batch_size_changes():
    loss_fn = ClipLoss()
    reference = open_clip.loss.ClipLoss()
    for batch in (8, 3, 8):
        image_features, text_features = random_features(batch, seed=batch)
        torch.testing.assert_close(
            loss_fn(image_features, text_features, torch.tensor(10.0)),
            reference(image_features, text_features, torch.tensor(10.0)),
        )
    assert loss_fn.ground_truth(torch.device("cpu"), 3).tolist() == [0, 1, 2]


def test_local_loss_labels_are_offset_by_rank():
    loss_fn = ClipLoss(local_loss=True, rank=2, world_size=4)
    assert loss_fn.ground_truth(torch.device("cpu"), 3).tolist() == [6, 7, 8]
    assert ClipLoss(local_loss=False, rank=2, world_size=4).ground_truth(torch.device("cpu"), 3).tolist() == [
        0,
        1,
        2,
    ]


def test_distributed_loss_without_process_group_says_what_to_fix():
    image_features, text_features = random_features(4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ClipLoss(world_size=2, rank=0)(image_features, text_features, torch.tensor(10.0))


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    images = torch.randn(WORLD_SIZE * LOCAL_BATCH, 3, 64, 64, generator=generator)
    captions = [f"a photo of a {name}." for name in IMAGENET_CLASSNAMES[: WORLD_SIZE * LOCAL_BATCH]]
    return images, tokenize(captions)


def tiny_clip() -> nn.Module:
    torch.manual_seed(0)
    return create_model("ViT-Tiny-16", output_dict=True)


def train_step_grads(model: nn.Module, loss_fn: ClipLoss, images, texts) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    out = model(images, texts)
    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def distributed_worker(rank: int, port: int, results_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        model = tiny_clip()
        images, texts = global_batch()
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = {}
        for local_loss, gather_with_grad in MODES:
            loss_fn = ClipLoss(
                local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=WORLD_SIZE
            )
            loss, grads = train_step_grads(model, loss_fn, images[rows], texts[rows])
            # Average the loss and the gradients over ranks, as DDP does for gradients.
            dist.all_reduce(loss)
            for grad in grads.values():
                dist.all_reduce(grad)
            results[(local_loss, gather_with_grad)] = (
                loss / WORLD_SIZE,
                {name: grad / WORLD_SIZE for name, grad in grads.items()},
            )
        if rank == 0:
            torch.save(results, results_path)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    results_path = str(tmp_path_factory.mktemp("clip_loss_dist") / "results.pt")
    mp.spawn(distributed_worker, args=(free_port(), results_path), nprocs=WORLD_SIZE, join=True)
    return torch.load(results_path)


@pytest.fixture(scope="module")
def single_process_reference():
    model = tiny_clip()
    images, texts = global_batch()
    return train_step_grads(model, ClipLoss(), images, texts)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("local_loss", [False, True])
def test_gather_with_grad_matches_single_process_training(
    distributed_results, single_process_reference, local_loss
):
    loss, grads = distributed_results[(local_loss, True)]
    expected_loss, expected_grads = single_process_reference
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, expected in expected_grads.items():
        assert expected.abs().sum() > 0, f"reference gradient of {name} is zero; the check would be vacuous"
    assert_gradients_close(grads, expected_grads, rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("local_loss", [False, True])
def test_gather_without_grad_keeps_the_global_loss_value(
    distributed_results, single_process_reference, local_loss
):
    loss, _ = distributed_results[(local_loss, False)]
    torch.testing.assert_close(loss, single_process_reference[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_gather_without_grad_scales_encoder_gradients_by_one_over_world_size(
    distributed_results, single_process_reference
):
    # Each rank back-propagates the global loss into its own features only, so DDP's average divides the
    # encoder gradients by the world size; logit_scale sees the whole loss on every rank and stays exact.
    _, grads = distributed_results[(False, False)]
    _, expected_grads = single_process_reference
    scaled = {
        name: g * (1.0 if name == "logit_scale" else 1.0 / WORLD_SIZE) for name, g in expected_grads.items()
    }
    assert_gradients_close(grads, scaled, rel=1e-5)
