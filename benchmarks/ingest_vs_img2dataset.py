"""Ingest throughput against img2dataset on the same URL list, served by nginx on loopback, same machine.

Generates photo-like JPEGs of mixed sizes (150 to 3,000 px wide; cached between runs), serves them with
nginx, then runs img2dataset (multiprocessing, 2 processes) and our job (`ray job submit` to the local
stack's Ray head, which is started first, as on a cluster) with the same settings: 256 px, keep_ratio,
WebDataset output, sha256. Reports images/s of both and the ratio.

    apt-get install -y nginx   # once
    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/ingest_vs_img2dataset.py --images 5000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parent.parent
NGINX_CONF = """
worker_processes 2;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 100000;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    server {{
        listen 127.0.0.1:{port};
        root {images};
    }}
}}
"""


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields with edges and grain: decodes and resizes like a photo, unlike flat colour."""
    coarse = rng.integers(0, 256, size=(max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    image = Image.fromarray(coarse, "RGB").resize((width, height), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-6, 7, size=(height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def generate_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"img{i:06d}.jpg"
        names.append(name)
        path = folder / name
        if path.exists():
            continue
        rng = np.random.default_rng([seed, i])
        width = int(rng.integers(150, 3001))
        height = int(np.clip(width * rng.uniform(0.5, 1.5), 100, 3000))
        photo_like(rng, width, height).save(path, quality=90)
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(images: Path, work: Path) -> tuple[subprocess.Popen, int]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise SystemExit("nginx is not installed: apt-get install -y nginx")
    port = free_port()
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(root=work, port=port, images=images))
    process = subprocess.Popen([nginx, "-c", str(conf), "-p", str(work)])
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return process, port
        time.sleep(0.05)
    raise SystemExit(f"nginx did not start; see {work}/error.log")


def run_img2dataset(url_list: Path, output: Path, processes: int) -> float:
    from img2dataset import download

    started = time.time()
    download(
        url_list=str(url_list),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        output_folder=str(output),
        processes_count=processes,
        thread_count=64,
        image_size=256,
        resize_mode="keep_ratio",
        compute_hash="sha256",
        number_sample_per_shard=1000,
        distributor="multiprocessing",
        enable_wandb=False,
        retries=0,
        timeout=30,
    )
    return time.time() - started


def count_img2dataset_successes(output: Path) -> int:
    return sum(json.loads(p.read_text())["successes"] for p in output.glob("*_stats.json"))


def run_ours(url_list: Path, output: Path, env: dict[str, str]) -> tuple[float, dict]:
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", env["RAY_API_SERVER_ADDRESS"],
        "--", sys.executable, "-m", "pipelines.ingest", "--input", str(url_list), "--output", str(output),
        "--image-size", "256", "--resize-mode", "keep_ratio", "--samples-per-shard", "1000",
        "--allow-private-networks",
    ]  # fmt: skip
    started = time.time()
    job = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
    if job.returncode != 0:
        raise SystemExit(f"our ingest job failed:\n{job.stdout[-5000:]}\n{job.stderr[-5000:]}")
    print("\n".join(line for line in job.stdout.splitlines() if "[ingest]" in line or line.startswith("|")))
    seconds = time.time() - started
    manifest = json.loads((output / "manifest.json").read_text())
    return seconds, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--processes", type=int, default=2, help="img2dataset processes")
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks" / "out" / "ingest_images")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from infra import local

    started = time.time()
    names = generate_images(args.cache, args.images)
    print(f"{len(names)} images ready in {args.cache} ({time.time() - started:.0f}s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        work = Path(tmp)
        nginx, port = start_nginx(args.cache, work / "nginx")
        try:
            url_list = work / "urls.parquet"
            table = pa.table(
                {
                    "url": [f"http://127.0.0.1:{port}/{n}" for n in names],
                    "caption": [f"photo number {i}" for i in range(len(names))],
                }
            )
            pq.write_table(table, url_list)
            local.start()
            env = local.stack_env()

            theirs_s = run_img2dataset(url_list, work / "img2dataset", args.processes)
            theirs_ok = count_img2dataset_successes(work / "img2dataset")
            ours_s, manifest = run_ours(url_list, work / "ours", env)
            ours_ok = manifest["totals"]["success"]
        finally:
            nginx.terminate()
            nginx.wait()

    theirs_rate, ours_rate = theirs_ok / theirs_s, ours_ok / ours_s
    result = {
        "date": str(date.today()),
        "cpus": os.cpu_count(),
        "images": len(names),
        "img2dataset": {
            "seconds": round(theirs_s, 1),
            "successes": theirs_ok,
            "images_per_s": round(theirs_rate, 1),
        },
        "ours": {
            "seconds": round(ours_s, 1),
            "successes": ours_ok,
            "images_per_s": round(ours_rate, 1),
        },
        "ratio": round(ours_rate / theirs_rate, 3),
    }
    print(f"\nIngest, {len(names)} images, {os.cpu_count()} cores, {date.today()}")
    print("| tool | seconds | images | images/s |\n|---|---:|---:|---:|")
    print(f"| img2dataset ({args.processes} processes) | {theirs_s:.1f} | {theirs_ok} | {theirs_rate:.1f} |")
    print(f"| clip-ray ingest (ray job submit) | {ours_s:.1f} | {ours_ok} | {ours_rate:.1f} |")
    print(f"ratio: {result['ratio']}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
