"""Every shipped config in configs/ validates as the job it is for."""

from pathlib import Path

import pytest

from pipelines.ingest.config import IngestConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("ingest-*.yaml")), ids=lambda p: p.name)
def test_ingest_config_validates(path):
    cfg = IngestConfig.from_yaml(path.read_text())
    assert cfg.output.startswith("s3://") and cfg.samples_per_shard == 10000
    assert IngestConfig.from_yaml(cfg.to_yaml()) == cfg


def test_there_are_ingest_configs_to_check():
    assert len(list(CONFIGS.glob("ingest-*.yaml"))) >= 2
