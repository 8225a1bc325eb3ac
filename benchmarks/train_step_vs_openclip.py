"""Training-step throughput of clip_core against OpenCLIP: same config, weights, batch and precision, one process.

Each step is forward + symmetric contrastive loss + backward + AdamW + logit-scale clamp. The two models are
timed in alternating rounds so that drift in machine load hits both alike. On a GPU it also reports MFU from
the forward FLOPs in ../shared/CLIP.md (a training step counts as 3x forward).

    python benchmarks/train_step_vs_openclip.py --models ViT-Tiny-16 ViT-B-32 --batch-size 32
    python benchmarks/train_step_vs_openclip.py --device cuda --precision bf16 --batch-size 256 \
        --models ViT-B-32 ViT-B-16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import open_clip
import torch
from open_clip_train.precision import get_autocast

import clip_core
from clip_core.training import MAX_LOGIT_SCALE, create_optimizer, train_step

# Forward GFLOPs per sample (image + text tower) from ../shared/CLIP.md.
FORWARD_GFLOPS = {"ViT-B-32": 14.78, "ViT-B-16": 41.09, "RN50": 18.18}
# Dense bf16 peak TFLOP/s by device name fragment.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def synthetic_batch(model_cfg: dict, batch_size: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = model_cfg["vision_cfg"]["image_size"]
    context = model_cfg["text_cfg"].get("context_length", 77)
    images = torch.randn(batch_size, 3, size, size, generator=g)
    # Captions of 8-40 tokens: start-of-text, random word ids, end-of-text, padding.
    texts = torch.zeros(batch_size, context, dtype=torch.long)
    for i in range(batch_size):
        n = int(torch.randint(8, 41, (1,), generator=g))
        texts[i, 0] = 49406
        texts[i, 1 : n - 1] = torch.randint(1, 49406, (n - 2,), generator=g)
        texts[i, n - 1] = 49407
    return images.to(device), texts.to(device)


def openclip_step(model, loss_fn, optimizer, images, texts, autocast):
    """The body of open_clip_train.train.train_one_epoch for accum_freq == 1, without logging."""
    optimizer.zero_grad()
    with autocast():
        out = model(images, texts)
        losses = loss_fn(**out, output_dict=True)
        total_loss = sum(losses.values())
    total_loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return total_loss.detach()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, n: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - start) / n


def bench_model(name: str, args, device: torch.device) -> dict:
    cfg = clip_core.get_model_config(name)
    torch.manual_seed(0)
    theirs = open_clip.create_model(name, precision="fp32", device=device, output_dict=True)
    ours = clip_core.create_model(name, device=device)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.train()
    ours.train()
    if args.grad_checkpointing:
        theirs.set_grad_checkpointing(True)
        ours.set_grad_checkpointing(True)

    images, texts = synthetic_batch(cfg, args.batch_size, device)
    # OpenCLIP's optimizer exactly as its trainer builds it; ours through clip_core.training.
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(theirs.named_parameters())
    their_opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2},
        ],
        lr=5e-4,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    our_opt = create_optimizer(ours, lr=5e-4, weight_decay=0.2)
    their_loss = open_clip.ClipLoss()
    our_loss = clip_core.ClipLoss()
    their_autocast = get_autocast("amp_bf16" if args.precision == "bf16" else "fp32", device_type=device.type)

    def their_step():
        openclip_step(theirs, their_loss, their_opt, images, texts, their_autocast)

    def our_step():
        train_step(ours, our_loss, our_opt, images, texts, precision=args.precision)

    for _ in range(args.warmup):
        their_step()
        our_step()
    their_times, our_times = [], []
    for _ in range(args.rounds):
        their_times.append(time_steps(their_step, args.steps, device))
        our_times.append(time_steps(our_step, args.steps, device))
    their_sps = args.batch_size / statistics.median(their_times)
    our_sps = args.batch_size / statistics.median(our_times)
    result = {
        "model": name,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "openclip_samples_per_s": round(their_sps, 2),
        "ours_samples_per_s": round(our_sps, 2),
        "ratio": round(our_sps / their_sps, 3),
    }
    peak = peak_tflops(device)
    if name in FORWARD_GFLOPS and peak:
        train_flops = 3 * FORWARD_GFLOPS[name] * 1e9
        result["ours_mfu"] = round(our_sps * train_flops / (peak * 1e12), 4)
        result["openclip_mfu"] = round(their_sps * train_flops / (peak * 1e12), 4)
    return result


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    gpu = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as cpuinfo:
        cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-Tiny-16", "ViT-B-32"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    open_clip.add_model_config(clip_core.MODEL_CONFIG_DIR)

    results = [bench_model(name, args, device) for name in args.models]
    print(f"\nTraining step, {machine(device)}, {args.precision}, {date.today()}")
    print("| model | batch | OpenCLIP samples/s | clip_core samples/s | ratio | MFU ours / OpenCLIP |")
    print("|---|---|---|---|---|---|")
    for r in results:
        mfu = f"{r['ours_mfu']:.1%} / {r['openclip_mfu']:.1%}" if "ours_mfu" in r else "n/a"
        print(
            f"| {r['model']} | {r['batch_size']} | {r['openclip_samples_per_s']} | "
            f"{r['ours_samples_per_s']} | {r['ratio']}x | {mfu} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(device), "results": results}, indent=2))


if __name__ == "__main__":
    main()
