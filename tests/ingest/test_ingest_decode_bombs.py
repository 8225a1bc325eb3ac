"""Memory bounds of an ingest worker fed hostile files: each kind of decompression, tile, canvas and CPU bomb,
and more body bytes than a worker may hold, measured as the peak RSS of a fresh Python process (a child, so
that nothing else this test session did counts) above its own level once everything is imported and warm.
Every bomb must come back as failed_to_decode with its reason; none may cost the child MEMORY_BOUND_MB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests import image_bombs as bombs
from tests.http_fixtures import HttpTestServer
from tests.paths import REPO

# Every bomb is refused from its header, so a worker keeps little more than the bytes themselves (the
# largest is 6.4 MB) or, downloading, its 16 MiB budget of bodies. Before the guards the same files cost
# 0.2 to 2.3 GB each (a 164-byte TIFF: 770 MB; a 6.4 MB Radiance HDR: 2.3 GB).
MEMORY_BOUND_MB = 100


def run_child(script: str, *args: str) -> list[dict]:
    """Run `script` in a fresh Python with the repository first on its path; it prints JSON lines."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def bomb_files() -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, a fragment of the refusal, or None where the file is an ordinary image)."""
    four_k_tile = zlib.compress(bytes(4096 * 4096 * 3), 1)
    return {
        "hdr 10000x10000": (bombs.hdr_rle(10_000, 10_000), "format HDR is not allowed"),
        "tiff 16x16 in 16384x16384 tiles": (bombs.tiff(16, 16, tile=(16_384, 16_384)), "tiles are too large"),
        "tiff 16x16 in 4096x4096 tiles, valid": (
            bombs.tiff(16, 16, tile=(4096, 4096), block_data=four_k_tile),
            "tiles are too large",
        ),
        "tiff listing 500000 strips": (
            bombs.tiff(16, 16, rows_per_strip=1, blocks=500_000, compression=1, block_data=bytes(48)),
            "lists 500000 strips",
        ),
        "ico holding a 12000x12000 png": (
            bombs.ico_holding(bombs.png_zlib_bomb(12_000, 12_000, rgb=True)),
            "format ICO is not allowed",
        ),
        "png declaring 30000x30000": (bombs.png_header_only(30_000, 30_000), "decompression bomb"),
        "png 20000x20000 of zeros": (bombs.png_zlib_bomb(20_000, 20_000), "decompression bomb"),
        "png with 200000 chunks": (bombs.png_with_many_chunks(200_000), "more than 10000 chunks"),
        "progressive jpeg with 300 repeated scans": (
            bombs.progressive_jpeg_with_repeated_scans(2048, 300),
            "scans, above the limit of 100",
        ),
        "gif frame 13000x13000 on a 1x1 screen": (
            bombs.gif((1, 1), [(0, 0, 13_000, 13_000)], disposal=2),
            "decompression bomb",
        ),
        "gif comment of 2000000 sub-blocks": (
            bombs.gif_with_comment_blocks(2_000_000),
            "blocks before its first",
        ),
        "gif with 20000 frames": (bombs.gif((16, 16), [(0, 0, 16, 16)] * 20_000), None),
        "webp canvas 20000x20000": (bombs.webp_animation((20_000, 20_000), 1), "decompression bomb"),
        "webp with 50000 frames": (bombs.webp_animation((16, 16), 50_000), "more than 10000 chunks"),
        "bmp rle 2000x2000 padding": (bombs.bmp_rle8_row_padding_bomb(2000, 2000), "run-length encoded"),
        "jpeg with 200000 comment segments": (bombs.jpeg_with_header_segments(200_000), "marker segments"),
    }


RESIZER_CHILD = r"""
import json, resource, sys
from pathlib import Path
from PIL import Image
from pipelines.ingest.image_headers import DEFAULT_ALLOWED_FORMATS
from pipelines.ingest.resizer import Resizer, ResizerConfig
from tests.image_bombs import encoded

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

resizer = Resizer(ResizerConfig(image_size=256))
with_hdr = Resizer(ResizerConfig(image_size=256, allowed_formats=DEFAULT_ALLOWED_FORMATS + ("HDR",)))
# Warm: every decoder loaded and used once, so that the baseline holds their libraries and arenas.
photo = Image.radial_gradient("L").resize((800, 600)).convert("RGB")
for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
    assert resizer(encoded(photo, fmt)).status == "success", fmt
baseline = peak_mb()
for path in sorted(Path(sys.argv[1]).iterdir()):
    raw = path.read_bytes()
    for name, decode in (("default", resizer), ("hdr allowed", with_hdr)):
        result = decode(raw)
        print(json.dumps({"bomb": path.name, "resizer": name, "status": result.status,
                          "error": result.error_message, "grew_mb": peak_mb() - baseline}), flush=True)
        del result
    del raw
"""


@pytest.fixture(scope="module")
def bombs_by_name() -> dict[str, tuple[bytes, str | None]]:
    return bomb_files()


def test_a_resizer_fed_every_kind_of_bomb_refuses_each_within_its_memory_bound(bombs_by_name, tmp_path):
    names = {}
    for index, (name, (raw, _)) in enumerate(bombs_by_name.items()):
        (tmp_path / f"{index:02d}").write_bytes(raw)
        names[f"{index:02d}"] = name
    rows = run_child(RESIZER_CHILD, str(tmp_path))
    assert len(rows) == 2 * len(bombs_by_name)
    for row in rows:
        name = names[row["bomb"]]
        expected = bombs_by_name[name][1]
        if row["resizer"] == "hdr allowed" and name.startswith("hdr"):
            expected = "decompression bomb"  # an allowed HDR is refused from its resolution line
        case = (name, row["resizer"], row["status"], row["error"], f"+{row['grew_mb']:.0f} MB")
        if expected is None:
            assert row["status"] == "success", case
        else:
            assert row["status"] == "failed_to_decode" and expected in row["error"], case
        assert row["grew_mb"] < MEMORY_BOUND_MB, case


STAGER_CHILD = r"""
import json, resource, sys
from pipelines.ingest import dedup, reader
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.job import ShardStager

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

warm_input, shard_input, output = sys.argv[1:4]
def config(input_uri):
    return IngestConfig.load([
        "--input", input_uri, "--output", output, "--allow-private-networks", "--image-size", "64",
        "--samples-per-shard", "100000", "--max-body-bytes", str(4 << 20), "--max-bytes-in-flight", str(16 << 20),
        "--max-in-flight", "64", "--max-retries", "0", "--timeout-s", "120",
    ])
stager = ShardStager(config(shard_input))
none = dedup.DUPLICATES_SCHEMA.empty_table()
(warm_spec,) = reader.plan_shards(config(warm_input))
warm = stager.stage(warm_spec, none)
baseline = peak_mb()
(spec,) = reader.plan_shards(config(shard_input))
table = stager.stage(spec, none)
stager.close()
for row in table.select(["url", "status", "error_message"]).to_pylist():
    print(json.dumps({**row, "grew_mb": peak_mb() - baseline}), flush=True)
"""


@pytest.fixture
def server():
    srv = HttpTestServer().start()
    yield srv
    srv.stop()


def test_a_shard_stager_downloading_bombs_and_many_big_bodies_stays_within_its_memory_bound(
    bombs_by_name, server, tmp_path
):
    # 160 bodies of 2 MiB each (320 MiB; the worker's budget is 16 MiB) and the bombs, all from a real
    # server, downloaded, decoded and filtered by the worker's ShardStager as in a job.
    big = f"/big?size={2 << 20}"
    expected = {server.url(f"{big}&n={i}"): "not an image" for i in range(160)}
    for index, (raw, reason) in enumerate(bombs_by_name.values()):
        if len(raw) <= 4 << 20:  # the largest body accepted here
            server.blobs[f"bomb{index}"] = raw
            expected[server.url(f"/blob/bomb{index}")] = reason
    server.blobs["photo"] = bombs.encoded(
        Image.radial_gradient("L").resize((300, 200)).convert("RGB"), "JPEG"
    )
    expected[server.url("/blob/photo")] = None
    for name, urls in (("warm", [server.url("/blob/photo"), server.url(big)]), ("shard", list(expected))):
        captions = [f"row {i}" for i in range(len(urls))]
        pq.write_table(pa.table({"url": urls, "caption": captions}), tmp_path / f"{name}.parquet")

    paths = [str(tmp_path / name) for name in ("warm.parquet", "shard.parquet", "out")]
    rows = run_child(STAGER_CHILD, *paths)
    assert [row["url"] for row in rows] == list(expected)
    for row in rows:
        reason = expected[row["url"]]
        case = (row["url"], row["status"], row["error_message"])
        if reason is None:
            assert row["status"] == "success", case
        else:
            assert row["status"] == "failed_to_decode" and reason in row["error_message"], case
    assert rows[-1]["grew_mb"] < MEMORY_BOUND_MB, f"the worker grew by {rows[-1]['grew_mb']:.0f} MB"


def test_opencv_limits_from_the_config_stop_opencv_itself(tmp_path):
    # The staging workers get these variables in their environment; in a fresh process OpenCV then refuses
    # images over max_image_pixels on its own, behind image_headers' checks.
    from pipelines.ingest import job
    from pipelines.ingest.config import IngestConfig

    cfg = IngestConfig.load(
        ["--input", "in.parquet", "--output", str(tmp_path / "out"), "--max-image-pixels", "10000"]
    )
    limits = job.opencv_limits(cfg)
    assert limits["OPENCV_IO_MAX_IMAGE_PIXELS"] == "10000"
    script = (
        "import sys, cv2, numpy as np\n"
        "for side in (100, 101):\n"
        "    ok, png = cv2.imencode('.png', np.zeros((side, side, 3), np.uint8))\n"
        "    try:\n"
        "        decoded = cv2.imdecode(png, cv2.IMREAD_UNCHANGED)\n"
        "    except cv2.error:\n"
        "        decoded = None\n"
        "    print(side, decoded is not None)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **limits},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.split() == ["100", "True", "101", "False"], result.stdout + result.stderr
