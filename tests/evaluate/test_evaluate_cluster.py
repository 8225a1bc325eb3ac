"""Evaluation's encoder pool follows the cluster: started on one worker node, it grows onto a node that joins
while the first encoder is busy (Ray's state API says where the encoders ran), and the features are the ones
a one-encoder run gives."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from pipelines import failpoints, storage
from pipelines.demo.data import write_retrieval_shards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DRIVER = """
import json, sys, ray, torch, clip_core
from pipelines.evaluate import config, datasets
from pipelines.evaluate.features import extract_features
address, uri, env = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ray.init(address=address, _node_ip_address="127.0.0.11", runtime_env={"env_vars": env}, log_to_driver=False)
torch.manual_seed(0)
model = clip_core.create_model("ViT-Tiny-16")
eval_set = datasets.open_dataset(config.DatasetConfig(name="r", uri=uri))
(features,) = extract_features([eval_set], "ViT-Tiny-16", model.state_dict(), 64, batch_size=8)
print(json.dumps({"keys": features.keys, "first": features.embeddings[:, :4].tolist()}))
"""


def test_the_encoder_pool_grows_onto_a_node_that_joins(multinode_ray, s3_prefix, tmp_path):
    cluster = multinode_ray
    uri = storage.join(s3_prefix, "retrieval")
    write_retrieval_shards(uri, 96, seed=3, size=64, captions_per_image=1, per_shard=8)
    first = cluster.add_node(num_cpus=2)

    pauses = tmp_path / "pauses"
    pauses.mkdir()
    env = {failpoints.PAUSE_ENV: "evaluate.batch_encoding", failpoints.PAUSE_DIR_ENV: str(pauses)}
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, cluster.gcs_address, uri, json.dumps(env)],
        env=cluster.driver_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        failpoints.wait_reached(pauses, "evaluate.batch_encoding", timeout_s=300)
        joined = cluster.add_node(num_cpus=2)
        # The first encoder is held on its first batch while work queues up: the pool should take the new node.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and joined.node_id not in _encoder_nodes(cluster):
            time.sleep(1.0)
        failpoints.release(pauses, "evaluate.batch_encoding")
        out, err = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 0, err[-4000:]
    assert joined.node_id in _encoder_nodes(cluster), _encoder_nodes(cluster)
    assert first.node_id in _encoder_nodes(cluster)

    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["keys"]) == 96 and result["keys"] == sorted(result["keys"])
    # The same features as a one-encoder run in this process.
    import clip_core
    from pipelines.evaluate import config, datasets
    from pipelines.evaluate.features import extract_features_locally

    torch.manual_seed(0)
    model = clip_core.create_model("ViT-Tiny-16")
    eval_set = datasets.open_dataset(config.DatasetConfig(name="r", uri=uri))
    local = extract_features_locally(eval_set, model.eval(), 64, batch_size=8)
    assert local.keys == result["keys"]
    torch.testing.assert_close(torch.tensor(result["first"]), local.embeddings[:, :4], rtol=1e-4, atol=1e-5)


def _encoder_nodes(cluster) -> set[str]:
    return {a["node_id"] for a in cluster.state("actors") if "ImageEncoder" in a.get("class_name", "")}
