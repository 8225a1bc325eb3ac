"""Training-step throughput: our full training step as the job runs it against OpenCLIP's, on the same model
config, weights, batch, precision and hardware, one process.

Ours: the warm-up + cosine schedule, then clip_core.training.accumulated_train_step (forward, ClipLoss,
backward, gradient clipping, AdamW, logit-scale clamp; with --accum-steps k > 1 the cached-features
accumulation path). OpenCLIP: open_clip_train.train.train_one_epoch itself, run over the same batches, with
its create_loss, cosine_lr scheduler and AdamW parameter groups as open_clip_train.main builds them, and
accum_freq = k. Rounds alternate between the two so that drift in machine load hits both alike. On a GPU
it also reports MFU from the forward FLOPs in ../shared/CLIP.md (a training step counts as 3x forward).

    python benchmarks/train_step_vs_openclip.py --models ViT-Tiny-16 ViT-B-32 --batch-size 32 --accum-steps 1 2
    python benchmarks/train_step_vs_openclip.py --device cuda --precision bf16 --batch-size 256 \
        --models ViT-B-32 ViT-B-16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import open_clip
import torch
from open_clip_train.data import DataInfo
from open_clip_train.scheduler import cosine_lr
from open_clip_train.train import train_one_epoch

import clip_core
from clip_core.training import WarmupCosineSchedule, accumulated_train_step, create_optimizer

# Forward GFLOPs per sample (image + text tower) from ../shared/CLIP.md.
FORWARD_GFLOPS = {"ViT-B-32": 14.78, "ViT-B-16": 41.09, "RN50": 18.18}
# Dense bf16 peak TFLOP/s by device name fragment.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}
LR, WEIGHT_DECAY, WARMUP, TOTAL_STEPS = 5e-4, 0.2, 2, 1000


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


class BatchList:
    """The dataloader interface train_one_epoch reads: iteration plus num_batches and num_samples."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.batches = batches
        self.num_batches = len(batches)
        self.num_samples = sum(len(images) for images, _ in batches)

    def __iter__(self):
        return iter(self.batches)


def openclip_args(name: str, args, device: torch.device, micro_batch: int) -> argparse.Namespace:
    """The open_clip_train.main arguments that train_one_epoch and create_loss read, for one process."""
    return argparse.Namespace(
        model=name, device=str(device), precision="amp_bf16" if args.precision == "bf16" else "fp32",
        accum_freq=args.accum, grad_clip_norm=args.grad_clip_norm, batch_size=micro_batch, world_size=1,
        rank=0, local_rank=0, distributed=False, horovod=False, distill=False, skip_scheduler=False,
        log_every_n_steps=100, wandb=False, save_logs=False, local_loss=False, gather_with_grad=False,
        cache_labels=True, siglip=False, coca_caption_loss_weight=2.0, coca_contrastive_loss_weight=1.0,
        loss_dist_impl=None, val_frequency=1, epochs=1,
    )  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(run_steps, n: int, device: torch.device) -> float:
    """Seconds per optimizer step over n steps."""
    sync(device)
    start = time.perf_counter()
    run_steps(n)
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

    micro_batch = args.batch_size // args.accum
    micro_batches = [synthetic_batch(cfg, micro_batch, device, seed=j) for j in range(args.accum)]
    their_args = openclip_args(name, args, device, micro_batch)
    # OpenCLIP's optimizer exactly as open_clip_train.main builds it; ours through clip_core.training.
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(theirs.named_parameters())
    their_opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": WEIGHT_DECAY},
        ],
        lr=LR,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    their_scheduler = cosine_lr(their_opt, LR, WARMUP, TOTAL_STEPS)
    their_loss = open_clip.create_loss(their_args)
    our_opt = create_optimizer(ours, lr=LR, weight_decay=WEIGHT_DECAY)
    our_schedule = WarmupCosineSchedule(our_opt, LR, WARMUP, TOTAL_STEPS)
    our_loss = clip_core.ClipLoss()

    def their_steps(n: int) -> None:
        data = {"train": DataInfo(BatchList(micro_batches * n))}
        train_one_epoch(theirs, data, their_loss, 0, their_opt, None, their_scheduler, None, their_args)

    def our_steps(n: int) -> None:
        # The job's loop body, less the data wait and the metric bookkeeping every log_every steps.
        for step in range(n):
            our_schedule(step)
            accumulated_train_step(
                ours,
                our_loss,
                our_opt,
                micro_batches,
                precision=args.precision,
                grad_clip_norm=args.grad_clip_norm,
            )

    their_steps(args.warmup)
    our_steps(args.warmup)
    their_times, our_times = [], []
    for _ in range(args.rounds):
        their_times.append(time_steps(their_steps, args.steps, device))
        our_times.append(time_steps(our_steps, args.steps, device))
    their_sps = args.batch_size / statistics.median(their_times)
    our_sps = args.batch_size / statistics.median(our_times)
    result = {
        "model": name,
        "batch_size": args.batch_size,
        "accum_steps": args.accum,
        "precision": args.precision,
        "grad_clip_norm": args.grad_clip_norm,
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
    parser.add_argument("--batch-size", type=int, default=32, help="samples per optimizer step")
    parser.add_argument(
        "--accum-steps", type=int, nargs="+", default=[1, 2], help="micro-batches per step; each is measured"
    )
    parser.add_argument("--grad-clip-norm", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if any(args.batch_size % k for k in args.accum_steps):
        parser.error("--batch-size must be divisible by every --accum-steps value")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # train_one_epoch logs through the root logger; its progress lines are not part of this report.
    logging.getLogger().setLevel(logging.WARNING)
    open_clip.add_model_config(clip_core.MODEL_CONFIG_DIR)

    results = []
    for name in args.models:
        for accum in args.accum_steps:
            args.accum = accum
            results.append(bench_model(name, args, device))
            print(json.dumps(results[-1]), flush=True)
    print(
        f"\nTraining step, {machine(device)}, {args.precision}, grad clip {args.grad_clip_norm}, {date.today()}"
    )
    print("| model | batch | accum | OpenCLIP samples/s | ours samples/s | ratio | MFU ours / OpenCLIP |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        mfu = f"{r['ours_mfu']:.1%} / {r['openclip_mfu']:.1%}" if "ours_mfu" in r else "n/a"
        print(
            f"| {r['model']} | {r['batch_size']} | {r['accum_steps']} | {r['openclip_samples_per_s']} | "
            f"{r['ours_samples_per_s']} | {r['ratio']}x | {mfu} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(device), "results": results}, indent=2))


if __name__ == "__main__":
    main()
