"""Zero-shot classification throughput (images/s) of pipelines.evaluate against CLIP_benchmark on the same
checkpoint and the same images, in one process, runs alternating.

Data: 500x375 JPEGs of drawn scenes (a few hundred distinct pictures repeated to --images files; cached in
benchmarks/out/eval_images), written in CLIP_benchmark's WebDataset layout (what its `wds/` datasets read)
and as an image folder. CLIP_benchmark reads the tars through its own builder with a torch DataLoader of
--workers processes; ours runs its Ray Data job on an in-process Ray cluster of the machine's CPUs, started
once before the timed runs (on a cluster it is already running). Both run fp32 on the CPU.

    .venv/bin/python benchmarks/eval_vs_clip_benchmark.py --images 4000 --rounds 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import open_clip  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from clip_benchmark.datasets.builder import build_dataset  # noqa: E402
from clip_benchmark.metrics import zeroshot_classification  # noqa: E402

import clip_core  # noqa: E402
from pipelines.demo import scenes  # noqa: E402
from pipelines.evaluate import EvaluateConfig, run  # noqa: E402
from pipelines.evaluate.config import validate_suite  # noqa: E402

DISTINCT = 250


def make_data(root: Path, images: int) -> tuple[Path, Path]:
    """(wds folder, image folder) with `images` 500x375 JPEGs classified by colour; reused when present."""
    wds_dir, folder = root / f"wds_{images}", root / f"folder_{images}"
    if (wds_dir / "test" / "nshards.txt").exists() and (folder / "classnames.txt").exists():
        return wds_dir, folder
    classnames = sorted(scenes.COLORS)
    distinct = []
    for index in range(DISTINCT):
        scene = scenes.make_scene(index, seed=99, size=(500, 375))
        buffer = io.BytesIO()
        scene.image.save(buffer, format="JPEG", quality=90)
        distinct.append((buffer.getvalue(), classnames.index(scene.color)))
    (wds_dir / "test").mkdir(parents=True, exist_ok=True)
    for name, lines in (
        ("classnames.txt", classnames),
        ("zeroshot_classification_templates.txt", scenes.COLOR_PROMPTS),
    ):
        for where in (wds_dir, folder):
            where.mkdir(parents=True, exist_ok=True)
            (where / name).write_text("\n".join(lines) + "\n")
    with wds.ShardWriter(str(wds_dir / "test" / "%d.tar"), maxcount=1000, verbose=0) as sink:
        for i in range(images):
            jpeg, label = distinct[i % DISTINCT]
            sink.write({"__key__": f"s{i:07d}", "jpg": jpeg, "cls": label})
            (folder / classnames[label]).mkdir(exist_ok=True)
            (folder / classnames[label] / f"{i:07d}.jpg").write_bytes(jpeg)
        shards = sink.shard
    (wds_dir / "test" / "nshards.txt").write_text(f"{shards}\n")
    return wds_dir, folder


def topk_accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    # clip_benchmark 1.6's `accuracy` calls float() on a 1-element numpy array, which numpy >= 2.4 refuses.
    ranked = output.argsort(dim=1, descending=True)
    return [float((ranked[:, :k] == target[:, None]).sum()) / len(target) for k in topk]


def run_clip_benchmark(
    model_name: str, checkpoint: str, wds_dir: Path, batch_size: int, workers: int
) -> tuple[float, dict]:
    started = time.perf_counter()
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=checkpoint)
    model.eval()
    dataset = build_dataset("wds/bench", root=str(wds_dir), transform=preprocess, split="test",
                            task="zeroshot_classification")  # fmt: skip
    loader = torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None, num_workers=workers)
    loader.dataset.classes = dataset.classes
    metrics = zeroshot_classification.evaluate(
        model,
        loader,
        open_clip.get_tokenizer(model_name),
        dataset.classes,
        dataset.templates,
        "cpu",
        amp=False,
    )
    return time.perf_counter() - started, metrics


def run_ours(
    model_name: str, checkpoint: str, data: Path, batch_size: int, reduced_decode: bool
) -> tuple[float, dict]:
    suite = validate_suite({
        "datasets": [{"name": "bench", "uri": str(data)}], "batch_size": batch_size,
        "reduced_decode": reduced_decode, "example_images": 0,
    })  # fmt: skip
    started = time.perf_counter()
    metrics = run(
        EvaluateConfig(checkpoint=checkpoint, model=model_name, suite=suite, log_mlflow=False)
    ).metrics
    return time.perf_counter() - started, {k.rsplit("/", 1)[-1]: v for k, v in metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="ViT-Tiny-16")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="CLIP_benchmark DataLoader workers"
    )
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "out" / "eval_vs_clip_benchmark.json"))
    args = parser.parse_args()

    out = REPO / "benchmarks" / "out"
    wds_dir, folder = make_data(out / "eval_images", args.images)
    open_clip.add_model_config(clip_core.MODEL_CONFIG_DIR)
    zeroshot_classification.accuracy = topk_accuracy
    checkpoint = out / "eval_images" / f"{args.model}-random.pt"
    if not checkpoint.exists():
        torch.manual_seed(0)
        clip_core.save_checkpoint(clip_core.create_model(args.model), checkpoint)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)

    runs: dict[str, list[float]] = {
        "clip_benchmark": [],
        "ours_wds": [],
        "ours_folder": [],
        "ours_wds_full_decode": [],
    }
    accuracy: dict[str, dict] = {}
    for round_index in range(args.rounds):
        for name in runs:
            if name == "clip_benchmark":
                seconds, metrics = run_clip_benchmark(
                    args.model, str(checkpoint), wds_dir, args.batch_size, args.workers
                )
            else:
                data = folder if name == "ours_folder" else wds_dir
                seconds, metrics = run_ours(
                    args.model, str(checkpoint), data, args.batch_size, name != "ours_wds_full_decode"
                )
            runs[name].append(args.images / seconds)
            accuracy[name] = {k: round(v, 4) for k, v in metrics.items()}
            print(
                f"round {round_index}: {name} {args.images / seconds:.1f} images/s ({seconds:.1f}s) {accuracy[name]}",
                flush=True,
            )
    ray.shutdown()

    median = {name: statistics.median(values) for name, values in runs.items()}
    result = {
        "images": args.images, "image_size": "500x375 JPEG q90", "model": args.model, "rounds": args.rounds,
        "batch_size": args.batch_size, "clip_benchmark_workers": args.workers, "cpus": os.cpu_count(),
        "images_per_s": {k: [round(v, 1) for v in values] for k, values in runs.items()},
        "median_images_per_s": {k: round(v, 1) for k, v in median.items()},
        "ratio_vs_clip_benchmark": {k: round(v / median["clip_benchmark"], 2) for k, v in median.items() if k != "clip_benchmark"},
        "metrics": accuracy,
        "load_average_1min": round(os.getloadavg()[0], 1),
    }  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
