"""A small single-process CLIP run on the local stack: what `make demo` submits until the ingest, training
and evaluation stages exist. Trains ViT-Tiny-16 on drawn scenes, logs to MLflow, writes the checkpoint to
storage and measures zero-shot accuracy on held-out scenes.

    ray job submit -- python -m pipelines.quickstart --output s3://clip-data/demo/quickstart
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time

import mlflow
import torch

import clip_core
from clip_core.training import create_optimizer, train_step
from pipelines import scenes, storage

MODEL = "ViT-Tiny-16"


def scene_tensors(count: int, seed: int, transform) -> tuple[torch.Tensor, list[str], list[str], list[str]]:
    drawn = [scenes.make_scene(i, seed=seed) for i in range(count)]
    images = torch.stack([transform(s.image) for s in drawn])
    return images, [s.caption for s in drawn], [s.color for s in drawn], [s.shape for s in drawn]


def cosine_lr(step: int, total: int, base_lr: float, warmup: int) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base_lr * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def zero_shot_accuracy(model, images: torch.Tensor, labels: list[str], classnames, prompts) -> float:
    model.eval()
    classifier = clip_core.build_zero_shot_classifier(model, clip_core.tokenize, classnames, prompts)
    features = model.encode_image(images, normalize=True)
    predicted = (features @ classifier).argmax(dim=1)
    truth = torch.tensor([classnames.index(label) for label in labels])
    model.train()
    return float((predicted == truth).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="local path or s3:// URI for checkpoint and result")
    parser.add_argument("--train-scenes", type=int, default=4096)
    parser.add_argument("--eval-scenes", type=int, default=512)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--experiment", default="clip-ray-demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    model = clip_core.create_model(MODEL)
    size = clip_core.get_model_config(MODEL)["vision_cfg"]["image_size"]
    started = time.time()
    train_images, captions, _, _ = scene_tensors(
        args.train_scenes, args.seed, clip_core.image_transform(size, True)
    )
    train_tokens = clip_core.tokenize(captions)
    eval_images, _, colors, shapes = scene_tensors(
        args.eval_scenes, args.seed + 1000, clip_core.image_transform(size, False)
    )
    print(
        f"drew {args.train_scenes} training and {args.eval_scenes} held-out scenes in {time.time() - started:.1f}s"
    )

    loss_fn = clip_core.ClipLoss()
    optimizer = create_optimizer(model, lr=args.lr, weight_decay=0.1)
    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(run_name="quickstart") as run:
        mlflow.log_params({**vars(args), "model": MODEL})
        generator = torch.Generator().manual_seed(args.seed)
        seen, train_started = 0, time.time()
        for step in range(args.steps):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, args.steps, args.lr, warmup=max(1, args.steps // 10))
            batch = torch.randint(0, args.train_scenes, (args.batch_size,), generator=generator)
            loss = train_step(model, loss_fn, optimizer, train_images[batch], train_tokens[batch])
            seen += args.batch_size
            if step % 10 == 0 or step == args.steps - 1:
                samples_per_s = seen / (time.time() - train_started)
                metrics = {
                    "loss": float(loss),
                    "lr": optimizer.param_groups[0]["lr"],
                    "logit_scale": model.logit_scale.exp().item(),
                    "samples_per_s": samples_per_s,
                }
                mlflow.log_metrics(metrics, step=step)
                print(f"step {step:4d}  loss {float(loss):.3f}  {samples_per_s:.0f} samples/s", flush=True)

        color_acc = zero_shot_accuracy(model, eval_images, colors, list(scenes.COLORS), scenes.COLOR_PROMPTS)
        shape_acc = zero_shot_accuracy(model, eval_images, shapes, list(scenes.SHAPES), scenes.SHAPE_PROMPTS)
        checkpoint_uri = storage.join(args.output, "model.pt")
        buffer = io.BytesIO()
        clip_core.save_checkpoint(model, buffer)
        storage.write_bytes(checkpoint_uri, buffer.getvalue())
        result = {
            "model": MODEL,
            "steps": args.steps,
            "samples_per_s": round(seen / (time.time() - train_started), 1),
            "final_loss": round(float(loss), 4),
            "zeroshot/scenes-color/acc1": round(color_acc, 4),
            "zeroshot/scenes-shape/acc1": round(shape_acc, 4),
            "chance/scenes-color": round(1 / len(scenes.COLORS), 4),
            "chance/scenes-shape": round(1 / len(scenes.SHAPES), 4),
            "checkpoint": checkpoint_uri,
            "mlflow_run_id": run.info.run_id,
            "mlflow_experiment_id": run.info.experiment_id,
        }
        mlflow.log_metrics({k: v for k, v in result.items() if k.startswith("zeroshot/")})
        mlflow.set_tag("checkpoint_uri", checkpoint_uri)
    storage.write_bytes(storage.join(args.output, "result.json"), json.dumps(result, indent=2).encode())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
