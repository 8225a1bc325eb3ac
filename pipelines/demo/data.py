"""The demo's data, drawn scenes stored for each stage: a site of JPEGs with a URL + caption list, served
over loopback HTTP so the ingest stage downloads them for real, and held-out evaluation sets (image folders,
retrieval shards). Deterministic: the same seed and count give the same bytes.

    python -m pipelines.demo.data --root /tmp/scenes --count 5000 --serve   # a site anyone can ingest
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines import storage
from pipelines.demo import scenes
from pipelines.formats.shards import SUCCESS, shard_name
from pipelines.ingest import write_manifest, write_shard

PAIRS_FILE = "pairs.parquet"


def write_scene_site(root: str | Path, count: int, seed: int = 0) -> Path:
    """Write `count` scene JPEGs under root/images/ and root/pairs.parquet listing (relative path, caption).

    Sizes vary between 96 and 192 px a side, like the mixed sizes of web images, so the resizer has work
    to do. A finished site (its pairs file written last) is reused as it is."""
    root = Path(root)
    pairs = root / PAIRS_FILE
    if pairs.exists() and pq.read_metadata(pairs).num_rows == count:
        return pairs
    (root / "images").mkdir(parents=True, exist_ok=True)
    paths, captions = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, index, 1])
        size = (int(rng.integers(96, 193)), int(rng.integers(96, 193)))
        scene = scenes.make_scene(index, seed=seed, size=size)
        path = f"images/{index:06d}.jpg"
        scene.image.save(root / path, quality=90)
        paths.append(path)
        captions.append(scene.caption)
    partial = pairs.with_suffix(".partial")
    pq.write_table(pa.table({"path": paths, "caption": captions}), partial)
    partial.rename(pairs)
    return pairs


def write_url_list(root: str | Path, base_url: str, output: str | Path) -> Path:
    """The ingest input for a site served at base_url: Parquet with `url` and `caption` columns."""
    table = pq.read_table(Path(root) / PAIRS_FILE)
    urls = [f"{base_url}/{path}" for path in table.column("path").to_pylist()]
    output = Path(output)
    pq.write_table(pa.table({"url": urls, "caption": table.column("caption")}), output)
    return output


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        """Silent: one access-log line per image would bury the demo's progress lines."""


@contextlib.contextmanager
def serve(root: str | Path, port: int = 0) -> Iterator[str]:
    """Serve root over HTTP on 127.0.0.1 for the duration of the block; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="scene-site", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------------------
# Held-out evaluation sets on storage (local or S3)


def _jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_classification_folder(
    root_uri: str, attribute: str, count: int, seed: int, size: int = 96
) -> list[str]:
    """Write `count` scenes of stream `seed` as an image-folder tree classified by `attribute` ("color" or
    "shape"): `{root}/{class}/{index:06d}.jpg`, `classnames.txt` (the folders in sorted order) and
    `zeroshot_classification_templates.txt`. Classes get count // classes images each (the first ones get
    one more for the remainder), so every class folder exists. Returns the class names in label order."""
    if attribute not in ("color", "shape"):
        raise ValueError(f"attribute must be 'color' or 'shape', not {attribute!r}")
    classes = sorted(scenes.COLORS if attribute == "color" else scenes.SHAPES)
    if count < len(classes):
        raise ValueError(
            f"count must be at least {len(classes)} so that every {attribute} class has an image"
        )
    quota = {c: count // len(classes) + (1 if i < count % len(classes) else 0) for i, c in enumerate(classes)}
    index = 0
    while any(quota.values()):
        scene = scenes.make_scene(index, seed=seed, size=(size, size))
        label = scene.color if attribute == "color" else scene.shape
        if quota[label]:
            storage.write_bytes(storage.join(root_uri, label, f"{index:06d}.jpg"), _jpeg(scene.image))
            quota[label] -= 1
        index += 1
    prompts = scenes.COLOR_PROMPTS if attribute == "color" else scenes.SHAPE_PROMPTS
    storage.write_bytes(storage.join(root_uri, "classnames.txt"), ("\n".join(classes) + "\n").encode())
    storage.write_bytes(
        storage.join(root_uri, "zeroshot_classification_templates.txt"), ("\n".join(prompts) + "\n").encode()
    )
    return classes


def write_retrieval_shards(
    output_uri: str, count: int, seed: int, size: int = 96, captions_per_image: int = 3, per_shard: int = 1000
) -> int:
    """Write `count` scenes as ingest shards for zero-shot retrieval: each sample's .txt holds its caption and
    its .json a "captions" list of `captions_per_image` captions (the evaluator reads the list). Returns the
    number of shards."""
    shards = 0
    for shard_id, start in enumerate(range(0, count, per_shard)):
        rows = []
        for index in range(start, min(start + per_shard, count)):
            scene = scenes.make_scene(index, seed=seed, size=(size, size))
            captions = scenes.retrieval_captions(scene, captions_per_image)
            rows.append(
                {
                    "url": f"scene://{seed}/{index}",
                    "caption": captions[0],
                    "captions": captions,
                    "key": f"{shard_name(shard_id)}{index - start:04d}",
                    "status": SUCCESS,
                    "image": _jpeg(scene.image),
                    "image_ext": "jpg",
                    "width": size,
                    "height": size,
                    "original_width": size,
                    "original_height": size,
                    "row_index": index,
                    "shard_id": shard_id,
                }
            )
        write_shard(output_uri, shard_id, rows)
        shards += 1
    write_manifest(output_uri, expected_shards=shards)
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="local folder for the site")
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve", action="store_true", help="serve the site until interrupted")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    write_scene_site(args.root, args.count, args.seed)
    if args.serve:
        with serve(args.root, args.port) as base_url:
            urls = write_url_list(args.root, base_url, Path(args.root) / "urls.parquet")
            print(f"serving {args.count} scenes at {base_url}; ingest input: {urls}", flush=True)
            threading.Event().wait()


if __name__ == "__main__":
    main()
