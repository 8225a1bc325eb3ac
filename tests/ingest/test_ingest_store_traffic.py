"""What an ingest run sends to the store, measured from outside by a counting proxy in front of S3: each image
is written once (into its shard's tar), so the payload bytes of every request of the run come to at most
1.05x the output it leaves. Staging the images and writing them again, as before, came to about 2x."""

from __future__ import annotations

import pytest

from pipelines import storage
from pipelines.formats import shards
from tests.ingest.conftest import NUM_SCENES
from tests.ingest.test_ingest_job import ingest_args, input_rows, run_ingest_job, write_input
from tests.s3_traffic import CountingProxy

pytestmark = pytest.mark.cluster


def test_an_ingest_run_writes_each_image_to_the_store_once(
    site, local_stack, local_stack_env, s3_prefix, tmp_path, monkeypatch
):
    rows = input_rows(site)[: NUM_SCENES + 3]  # scenes, a repeated URL, repeated bytes (kept in a tar), HTML
    args = ingest_args(write_input(rows, tmp_path / "pairs.parquet"), storage.join(s3_prefix, "out"))
    args[args.index("--image-size") + 1] = "192"  # images of a realistic size: a tar is mostly image bytes
    with CountingProxy(local_stack.config.s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        run_ingest_job(args)
        traffic = proxy.reset()
    monkeypatch.setenv("AWS_ENDPOINT_URL", local_stack.config.s3_endpoint)
    output = storage.join(s3_prefix, "out")
    manifest = shards.read_manifest(output)
    assert manifest["complete"] and manifest["totals"]["duplicate"] == 2
    final = sum(entry.size for entry in storage.list_files(output))
    written = traffic.bytes_sent
    print(
        f"payload sent {written} B for an output of {final} B: {written / final:.3f}x; requests {dict(traffic.requests)}"
    )
    # Everything the output holds went through the proxy, and little else did.
    assert final <= written <= 1.05 * final
