"""Every shipped config in configs/ validates as the job it is for."""

import pytest

from pipelines.ingest.config import IngestConfig
from pipelines.train.config import TrainConfig
from tests.paths import CONFIGS


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("ingest-*.yaml")), ids=lambda p: p.name)
def test_ingest_config_validates(path):
    cfg = IngestConfig.from_yaml(path.read_text())
    assert cfg.output.startswith("s3://") and cfg.samples_per_shard == 10000
    assert IngestConfig.from_yaml(cfg.to_yaml()) == cfg


def test_there_are_ingest_configs_to_check():
    assert len(list(CONFIGS.glob("ingest-*.yaml"))) >= 2


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("train-*.yaml")), ids=lambda p: p.name)
def test_train_config_validates_with_the_published_hyperparameters(path):
    cfg = TrainConfig.from_yaml(path.read_text())
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg
    assert cfg.model == "ViT-B-32" and cfg.use_gpu and cfg.precision == "bf16"
    # OpenCLIP's ViT optimiser settings (open_clip_train/params.py), as in the paper.
    assert (cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay) == (5e-4, 0.9, 0.98, 1e-6, 0.2)
    assert all(uri.startswith("s3://") for uri in cfg.data) and cfg.output.startswith("s3://")
    # 32 epochs of the dataset at the global batch.
    epoch_samples = {"laion400m": 407_000_000, "cc12m": 10_968_539}[path.stem.rsplit("-", 1)[1]]
    assert cfg.steps == -(-32 * epoch_samples // cfg.batch_size)
    if "laion400m" in path.name:
        assert (cfg.batch_size, cfg.warmup) == (32768, 2000)
    else:
        assert (cfg.batch_size, cfg.warmup) == (1280, 10000)


def test_there_are_train_configs_to_check():
    assert {p.name for p in CONFIGS.glob("train-*.yaml")} >= {
        "train-vit-b-32-cc12m.yaml",
        "train-vit-b-32-laion400m.yaml",
    }
