"""The ingest tests' shared site: drawn scenes and hostile files over real HTTP on loopback."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from pipelines.demo import scenes
from tests.http_fixtures import HttpTestServer, serve_directory

NUM_SCENES = 40


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    """A static site of scene JPEGs and hostile files, and an aiohttp server of hostile endpoints."""
    root = tmp_path_factory.mktemp("site")
    captions = {}
    for i in range(NUM_SCENES):
        scene = scenes.make_scene(i, seed=5, size=(64 + 9 * i, 48 + 5 * i))
        scene.image.save(root / f"scene{i}.jpg", quality=90)
        captions[f"scene{i}.jpg"] = scene.caption
    for i in (100, 101, 102):
        scenes.make_scene(i, seed=5, size=(80, 80)).image.save(root / f"scene{i}.jpg", quality=90)
    (root / "copy_of_scene3.jpg").write_bytes((root / "scene3.jpg").read_bytes())
    (root / "page.jpg").write_bytes(b"<!doctype html><html><body>not an image</body></html>")
    (root / "truncated.jpg").write_bytes((root / "scene7.jpg").read_bytes()[:300])
    (root / "garbage.jpg").write_bytes(os.urandom(2000))
    Image.new("RGB", (10, 10), (9, 9, 9)).save(root / "tiny.jpg")
    Image.new("RGB", (400, 40), (90, 9, 9)).save(root / "wide.jpg")
    # A PNG header claiming 100k x 100k pixels: refused from the header, never decoded.
    (root / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x01\x86\xa0\x00\x01\x86\xa0\x08\x02\x00\x00\x00\x00\x00\x00\x00"
    )
    hostile = HttpTestServer().start()
    with serve_directory(root) as base:
        yield {"base": base, "hostile": hostile, "captions": captions}
    hostile.stop()
