"""clip_core.training: the optimizer groups and one training step agree with OpenCLIP's trainer."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch

import clip_core
from clip_core.training import adamw_param_groups, create_optimizer, train_step
from tests.gradients import assert_gradients_close, assert_weights_close, zero_gradient_entries


@pytest.fixture(scope="module", autouse=True)
def _openclip_knows_tiny():
    open_clip.add_model_config(clip_core.MODEL_CONFIG_DIR)


def _batch(n: int = 6):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 64, 64, generator=g)
    texts = clip_core.tokenize([f"a drawing of shape number {i}" for i in range(n)])
    return images, texts


def test_no_weight_decay_on_gains_biases_embeddings_and_logit_scale():
    model = clip_core.create_model("ViT-Tiny-16")
    no_decay, decay = adamw_param_groups(model, weight_decay=0.2)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.2
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "logit_scale" in undecayed
    assert "visual.class_embedding" in undecayed
    assert "ln_final.weight" in undecayed and "transformer.resblocks.0.attn.in_proj_bias" in undecayed
    assert "visual.proj" in decayed and "token_embedding.weight" in decayed
    assert undecayed.isdisjoint(decayed)
    assert len(undecayed) + len(decayed) == len(names)
    # The same split as OpenCLIP's trainer rule.
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    assert undecayed == {n for n, p in model.named_parameters() if exclude(n, p)}


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def test_train_step_matches_openclip_trainer_step():
    torch.manual_seed(0)
    theirs = open_clip.create_model("ViT-Tiny-16", output_dict=True)
    ours = clip_core.create_model("ViT-Tiny-16")
    ours.load_state_dict(theirs.state_dict())
    images, texts = _batch()

    their_opt = torch.optim.AdamW(adamw_param_groups(theirs, 0.2), lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    our_opt = create_optimizer(ours, lr=1e-3, weight_decay=0.2)
    # The same optimizer: hyperparameters and parameter membership, group by group.
    names = {id(p): n for n, p in ours.named_parameters()} | {id(p): n for n, p in theirs.named_parameters()}
    for our_group, their_group in zip(our_opt.param_groups, their_opt.param_groups, strict=True):
        for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
            assert our_group[key] == their_group[key], key
        assert [names[id(p)] for p in our_group["params"]] == [names[id(p)] for p in their_group["params"]]

    their_loss_fn = open_clip.ClipLoss()
    for _ in range(3):
        their_opt.zero_grad()
        out = theirs(images, texts)
        their_loss = sum(their_loss_fn(**out, output_dict=True).values())
        their_loss.backward()
        their_grads = _gradients(theirs)
        their_opt.step()
        with torch.no_grad():
            theirs.logit_scale.clamp_(0, math.log(100))
        # train_step leaves this step's gradients in .grad (it clears them at the start of the next step).
        our_loss = train_step(ours, clip_core.ClipLoss(), our_opt, images, texts)
        assert our_loss.item() == pytest.approx(their_loss.item(), rel=1e-5, abs=1e-6)
        assert_gradients_close(_gradients(ours), their_grads, rel=1e-4)

    assert_weights_close(ours.state_dict(), theirs.state_dict(), rtol=1e-4, atol=1e-5)


def test_key_biases_have_no_true_gradient():
    # What tests.gradients leaves out of weight comparisons must really be outside every loss's reach.
    torch.manual_seed(0)
    model = clip_core.create_model("ViT-Tiny-16")
    images, texts = _batch()
    out = model(images, texts, output_dict=True)
    clip_core.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    grads = _gradients(model)
    skipped = {name: zero_gradient_entries(name, g) for name, g in grads.items()}
    skipped = {name: s for name, s in skipped.items() if s is not None}
    assert len(skipped) == 2 * 2  # ViT-Tiny-16: 2 image and 2 text blocks (see its config)
    for name, entries in skipped.items():
        whole = grads[name].norm()
        assert whole > 0, name
        assert grads[name][entries].norm() < 1e-4 * whole, name


def test_logit_scale_is_clamped_at_100():
    model = clip_core.create_model("ViT-Tiny-16")
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    optimizer = create_optimizer(model, lr=1e-3)
    images, texts = _batch(4)
    train_step(model, clip_core.ClipLoss(), optimizer, images, texts)
    assert model.logit_scale.item() == pytest.approx(math.log(100))


def test_gradient_clipping_bounds_the_update():
    images, texts = _batch(4)
    deltas = {}
    for clip in (None, 1e-4):
        torch.manual_seed(0)
        model = clip_core.create_model("ViT-Tiny-16")
        before = model.visual.proj.detach().clone()
        # Plain SGD so that the size of the update follows the size of the clipped gradient.
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        train_step(model, clip_core.ClipLoss(), optimizer, images, texts, grad_clip_norm=clip)
        deltas[clip] = (model.visual.proj.detach() - before).norm().item()
    assert deltas[1e-4] <= 1e-4 * 1.01
    assert deltas[None] > 10 * deltas[1e-4]


def test_bf16_autocast_step_runs_and_keeps_fp32_weights():
    model = clip_core.create_model("ViT-Tiny-16")
    optimizer = create_optimizer(model, lr=1e-3)
    images, texts = _batch(4)
    loss = train_step(model, clip_core.ClipLoss(), optimizer, images, texts, precision="bf16")
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_warmup_cosine_schedule_matches_openclip_cosine_lr():
    from open_clip_train.scheduler import cosine_lr

    from clip_core.training import WarmupCosineSchedule

    model = clip_core.create_model("ViT-Tiny-16")
    ours, theirs = create_optimizer(model, lr=5e-4), create_optimizer(model, lr=5e-4)
    schedule = WarmupCosineSchedule(ours, base_lr=5e-4, warmup_steps=10, total_steps=100)
    their_schedule = cosine_lr(theirs, 5e-4, 10, 100)
    for step in range(100):
        assert schedule(step) == pytest.approx(their_schedule(step), rel=1e-12)
        assert [g["lr"] for g in ours.param_groups] == pytest.approx([g["lr"] for g in theirs.param_groups])
    assert schedule(0) == pytest.approx(5e-5) and schedule(9) == pytest.approx(5e-4)
    assert schedule(99) < 1e-6
