"""One contrastive training step in plain PyTorch: optimizer parameter groups and the step itself.

The Ray Train job and the benchmarks call these, so what is measured is what is trained.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext

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
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(_params(optimizer), grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(_params(optimizer), grad_clip_norm)
        optimizer.step()
    clamp_logit_scale(model)
    return loss.detach()


def _params(optimizer: torch.optim.Optimizer) -> Iterable[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]
