"""Ingest stage: URL+caption lists to img2dataset-compatible WebDataset shards and Parquet, on Ray Data.

Its public API for other code (the demo writes its held-out shards with it) is the shard writer."""

from pipelines.ingest.writer import write_manifest, write_shard

__all__ = ["write_manifest", "write_shard"]
