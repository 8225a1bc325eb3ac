"""Contrastive training in plain PyTorch: optimizer parameter groups, the warm-up + cosine learning rate,
and the training step, with gradient accumulation that keeps every micro-batch's negatives.

The Ray Train job and the benchmarks call these, so what is measured is what is trained.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

# The paper clips the learned temperature so that logits are scaled by at most 100.
MAX_LOGIT_SCALE = math.log(100.0)


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into decayed weights and undecayed gains, biases, 1-D embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.endswith("bias") or "logit_scale" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def create_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.2,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW with OpenCLIP's ViT defaults (betas 0.9/0.98, eps 1e-6, decay 0.2 on weights only)."""
    groups = adamw_param_groups(model, weight_decay)
    if fused is None:
        # The fused kernel is the fastest AdamW on GPU; on CPU the foreach path is.
        fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def autocast_context(device_type: str, precision: str):
    """Autocast for 'bf16' or 'fp16' mixed precision; a no-op for 'fp32'."""
    if precision == "fp32":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device_type, dtype=dtype)


def clamp_logit_scale(model: nn.Module) -> None:
    unwrapped = getattr(model, "module", model)
    with torch.no_grad():
        unwrapped.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def warmup_cosine_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to base_lr over warmup_steps, then cosine decay to 0 at total_steps (OpenCLIP's
    schedule: step 0 already trains at base_lr / warmup_steps)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


class WarmupCosineSchedule:
    """Sets the optimizer's learning rate for each step; its state is the schedule itself, so a resumed run
    whose config changed (say, more steps) follows the new schedule from where it stopped."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, warmup_steps: int, total_steps: int):
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.last_lr = 0.0

    def __call__(self, step: int) -> float:
        self.last_lr = warmup_cosine_lr(step, self.base_lr, self.warmup_steps, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.last_lr
        return self.last_lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_lr": self.base_lr,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "last_lr": self.last_lr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_lr = state.get("last_lr", 0.0)


def train_step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    texts: torch.Tensor,
    precision: str = "fp32",
    grad_clip_norm: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """Forward, symmetric contrastive loss, backward and optimizer step on one batch; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(images.device.type, precision):
        out = model(images, texts, output_dict=True)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    _backward(loss, scaler)
    _step(model, optimizer, grad_clip_norm, scaler)
    return loss.detach()


def accumulated_train_step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    precision: str = "fp32",
    grad_clip_norm: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One optimizer step over k micro-batches whose gradients equal those of one k-times larger batch.

    As in OpenCLIP: a first pass embeds every micro-batch without autograd; then each micro-batch is
    embedded again with autograd and scored against the cached features of all the others, so every
    sample still sees the whole accumulated batch as negatives while only one micro-batch's activations
    are alive at a time. Each pass back-propagates the full-batch loss into its own micro-batch's features;
    summed over the passes that is the full-batch gradient. The logit scale is shared by all passes, so
    it takes its gradient from the last pass only (OpenCLIP adds it k times). With DDP, gradients are
    all-reduced once, on the last pass. Returns the full-batch loss.
    """
    if len(micro_batches) == 1:
        images, texts = micro_batches[0]
        return train_step(model, loss_fn, optimizer, images, texts, precision, grad_clip_norm, scaler)

    device_type = micro_batches[0][0].device.type
    with torch.no_grad(), autocast_context(device_type, precision):
        cached = [model(images, texts, output_dict=True) for images, texts in micro_batches]
    image_features = [out["image_features"] for out in cached]
    text_features = [out["text_features"] for out in cached]

    optimizer.zero_grad(set_to_none=True)
    last = len(micro_batches) - 1
    for j, (images, texts) in enumerate(micro_batches):
        sync = model.no_sync() if j < last and hasattr(model, "no_sync") else nullcontext()
        with sync:
            with autocast_context(device_type, precision):
                out = model(images, texts, output_dict=True)
                logit_scale = out["logit_scale"] if j == last else out["logit_scale"].detach()
                all_images = torch.cat(image_features[:j] + [out["image_features"]] + image_features[j + 1 :])
                all_texts = torch.cat(text_features[:j] + [out["text_features"]] + text_features[j + 1 :])
                loss = loss_fn(all_images, all_texts, logit_scale)
            _backward(loss, scaler)
    _step(model, optimizer, grad_clip_norm, scaler)
    return loss.detach()


def _backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (loss if scaler is None else scaler.scale(loss)).backward()


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    grad_clip_norm: float | None,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Clip (on unscaled gradients), step the optimizer (through the scaler with fp16) and clamp the logit
    scale."""
    if grad_clip_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(_params(optimizer), grad_clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    clamp_logit_scale(model)


def _params(optimizer: torch.optim.Optimizer) -> Iterable[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]
