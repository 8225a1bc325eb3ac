"""Does the training input pipeline keep up? ViT-Tiny-16 training samples/s fed by real shards through
pipelines.train.data.TrainLoader vs fed by synthetic in-memory batches: same process, model, batch and steps,
timed in alternating rounds. Also the raw rate of the loader alone and of the Ray Data alternative
(read_webdataset + map_batches + iter_torch_batches) that the loader's design comment weighs it against.

    python benchmarks/train_input_pipeline.py --batch-size 64 --threads 1 --workers 1 --steps 10 --rounds 8 \
        --json benchmarks/out/train_input_pipeline.json

On 2 cores: one training thread and one loader worker, so that each has a core when the machine is free.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import clip_core
from clip_core.training import create_optimizer, train_step
from pipelines.demo import scenes
from pipelines.formats.shards import MANIFEST_NAME, SUCCESS, shard_name
from pipelines.ingest import write_manifest, write_shard
from pipelines.train import data

MODEL = "ViT-Tiny-16"
OUT = Path(__file__).parent / "out"


def make_shards(root: Path, num_samples: int, num_shards: int, image_px: int) -> list[data.Shard]:
    """Drawn scenes as ingest shards (JPEG, quality 90), written once and reused."""
    if not (root / MANIFEST_NAME).exists():
        per_shard = num_samples // num_shards
        for shard_id in range(num_shards):
            rows = []
            for i in range(per_shard):
                index = shard_id * per_shard + i
                scene = scenes.make_scene(index, seed=0, size=(image_px, image_px))
                buffer = io.BytesIO()
                scene.image.save(buffer, format="JPEG", quality=90)
                rows.append(
                    {
                        "row_index": index,
                        "shard_id": shard_id,
                        "key": f"{shard_name(shard_id)}{i:04d}",
                        "url": f"https://img.example.com/{index}.jpg",
                        "caption": scene.caption,
                        "status": SUCCESS,
                        "image": buffer.getvalue(),
                        "image_ext": "jpg",
                    }
                )
            write_shard(str(root), shard_id, rows)
        write_manifest(str(root), expected_shards=num_shards)
    return data.resolve_shards([str(root)])


def synthetic_batch(batch_size: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    captions = [scenes.make_scene(i, seed=1, size=(8, 8)).caption for i in range(batch_size)]
    return torch.randn(batch_size, 3, image_size, image_size, generator=g), clip_core.tokenize(captions)


def process_tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and every live descendant (loader workers, Ray's processes).

    On a machine shared with other jobs, wall-clock rates say how much CPU we were given; CPU seconds per
    sample say what a pipeline costs."""
    parents, times = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        # After the command name: state, ppid, ..., utime and stime are fields 12 and 13 (0-based: 11, 12).
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = int(fields[11]) + int(fields[12])
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid and child not in tree]
        tree.update(children)
        frontier += children
    return sum(times.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


def train_rate(model, loss_fn, optimizer, next_batch, steps: int, batch_size: int) -> tuple[float, float]:
    """(samples/s, CPU seconds per step of the training thread itself)."""
    start, start_cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        images, texts = next_batch()
        train_step(model, loss_fn, optimizer, images, texts)
    return steps * batch_size / (time.perf_counter() - start), (time.thread_time() - start_cpu) / steps


def shard_loader(shards, args, image_size: int, workers: int) -> data.TrainLoader:
    """One rank's loader over every shard, as a 1-worker training run has it."""
    spec = data.LoaderSpec(
        shards=tuple(shards), rank=0, world_size=1, local_batch_size=args.batch_size, image_size=image_size,
        num_workers=workers, shuffle_buffer=args.shuffle_buffer, seed=0,
    )  # fmt: skip
    return data.TrainLoader(spec)


def loader_rate(shards, args, image_size: int, workers: int) -> dict:
    """Samples/s of the loader alone over epochs 2..n (epoch 1 warms up), and its first batch's delay."""
    epoch_batches = sum(s.num_samples for s in shards) // args.batch_size
    loader = shard_loader(shards, args, image_size, workers)
    timed_samples = epoch_batches * (args.raw_epochs - 1) * args.batch_size
    with loader:
        started = time.perf_counter()
        next(loader)
        first_batch_s = time.perf_counter() - started
        for _ in range(epoch_batches - 1):
            next(loader)
        started, started_cpu = time.perf_counter(), process_tree_cpu_seconds()
        for _ in range(epoch_batches * (args.raw_epochs - 1)):
            next(loader)
        elapsed, cpu = time.perf_counter() - started, process_tree_cpu_seconds() - started_cpu
    return {
        "workers": workers,
        "samples_per_s": timed_samples / elapsed,
        "cpu_ms_per_sample": 1000 * cpu / timed_samples,
        "first_batch_s": first_batch_s,
    }


def ray_data_rate(shards, args, image_size: int) -> dict:
    """The same decode, crop and tokenization as Ray Data map_batches tasks, consumed with
    iter_torch_batches as a Ray Train worker consumes its get_dataset_shard(), one iteration per epoch
    (as Ray Train does); epochs 2..n timed, their start-up included."""
    import ray

    transform = clip_core.image_transform(image_size, is_train=True)

    def as_image(jpg) -> Image.Image:
        # read_webdataset decodes images to arrays in its read tasks (even with decoder=False).
        return Image.fromarray(jpg) if isinstance(jpg, np.ndarray) else Image.open(io.BytesIO(jpg))

    def preprocess(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [transform(as_image(jpg)) for jpg in batch["jpg"]]
        captions = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in batch["txt"]]
        return {"image": torch.stack(images).numpy(), "text": clip_core.tokenize(captions).numpy()}

    ray.init(address="local", include_dashboard=False, num_cpus=args.ray_cpus, log_to_driver=False)
    try:
        started = time.perf_counter()
        dataset = ray.data.read_webdataset([s.uri for s in shards], decoder=False).map_batches(
            preprocess, batch_size=args.batch_size, batch_format="numpy"
        )
        first_batch_s, timed_start, timed_samples = None, None, 0
        for epoch in range(args.raw_epochs):
            if epoch == 1:
                timed_start, started_cpu = time.perf_counter(), process_tree_cpu_seconds()
            batches = dataset.iter_torch_batches(
                batch_size=args.batch_size, drop_last=True, local_shuffle_buffer_size=args.shuffle_buffer
            )
            for batch in batches:
                if first_batch_s is None:
                    first_batch_s = time.perf_counter() - started
                if epoch >= 1:
                    timed_samples += len(batch["image"])
        elapsed, cpu = time.perf_counter() - timed_start, process_tree_cpu_seconds() - started_cpu
    finally:
        ray.shutdown()
    return {
        "cpus": args.ray_cpus,
        "samples_per_s": timed_samples / elapsed,
        "cpu_ms_per_sample": 1000 * cpu / timed_samples,
        "first_batch_s": first_batch_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--image-px", type=int, default=96, help="stored JPEG size (scenes are square)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training loop")
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes while training")
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=15, help="timed training steps per round and source")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--raw-epochs", type=int, default=3, help="epochs read for the raw rates (1st untimed)"
    )
    parser.add_argument("--raw-workers", type=int, default=2)
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Data measurement")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    shards_root = OUT / f"train_shards_{args.samples}x{args.image_px}px_{args.shards}"
    shards = make_shards(shards_root, args.samples, args.shards, args.image_px)
    image_size = clip_core.get_model_config(MODEL)["vision_cfg"]["image_size"]
    model = clip_core.create_model(MODEL)
    loss_fn = clip_core.ClipLoss()
    optimizer = create_optimizer(model, lr=1e-4, weight_decay=0.1)

    synthetic = synthetic_batch(args.batch_size, image_size)
    loader = shard_loader(shards, args, image_size, args.workers)
    sources = {"synthetic": lambda: synthetic, "shards": lambda: next(loader)}
    for next_batch in sources.values():
        train_rate(model, loss_fn, optimizer, next_batch, args.warmup, args.batch_size)
    rates: dict[str, list[float]] = {name: [] for name in sources}
    step_cpu: dict[str, list[float]] = {name: [] for name in sources}
    waits = []
    for round_index in range(args.rounds):
        # Alternate which source goes first so that drifting machine load hits both alike.
        order = list(sources) if round_index % 2 == 0 else list(reversed(sources))
        for name in order:
            waited = loader.wait_seconds
            started = time.perf_counter()
            rate, cpu = train_rate(model, loss_fn, optimizer, sources[name], args.steps, args.batch_size)
            rates[name].append(rate)
            step_cpu[name].append(cpu)
            if name == "shards":
                waits.append((loader.wait_seconds - waited) / (time.perf_counter() - started))
        print(f"round {round_index}: " + ", ".join(f"{n} {rates[n][-1]:.1f} samples/s" for n in sources))
    loader.close()
    median = {name: statistics.median(values) for name, values in rates.items()}
    median_cpu = {name: statistics.median(values) for name, values in step_cpu.items()}
    ratio = median["shards"] / median["synthetic"]
    cpu_ratio = median_cpu["synthetic"] / median_cpu["shards"]
    print(
        f"{MODEL} batch {args.batch_size}, {args.threads} training thread(s), {args.workers} loader worker(s): "
        f"synthetic {median['synthetic']:.1f} samples/s, shards {median['shards']:.1f} samples/s, "
        f"ratio {ratio:.3f} (goal >= 0.95), waiting for data {100 * statistics.median(waits):.1f} % of the time"
    )
    print(
        f"training thread CPU per step: synthetic {1000 * median_cpu['synthetic']:.0f} ms, "
        f"shards {1000 * median_cpu['shards']:.0f} ms, ratio {cpu_ratio:.3f}; load average {os.getloadavg()}"
    )

    raw = [loader_rate(shards, args, image_size, w) for w in sorted({1, args.raw_workers})]
    for r in raw:
        print(
            f"TrainLoader alone, {r['workers']} worker(s): {r['samples_per_s']:.0f} samples/s, "
            f"{r['cpu_ms_per_sample']:.2f} CPU ms/sample (first batch after {r['first_batch_s']:.2f}s)"
        )
    ray_data = None
    if not args.no_ray:
        ray_data = ray_data_rate(shards, args, image_size)
        print(
            f"Ray Data alone, {ray_data['cpus']} CPUs: {ray_data['samples_per_s']:.0f} samples/s, "
            f"{ray_data['cpu_ms_per_sample']:.2f} CPU ms/sample (first batch after {ray_data['first_batch_s']:.2f}s)"
        )

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "date": date.today().isoformat(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "load_average": os.getloadavg(),
            "model": MODEL,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "train_samples_per_s": rates,
            "median": median,
            "ratio": ratio,
            "train_thread_cpu_s_per_step": step_cpu,
            "cpu_ratio": cpu_ratio,
            "data_wait_share": waits,
            "loader_alone": raw,
            "ray_data_alone": ray_data,
        }
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
