"""The on-disk formats jobs hand each other: ingest shards and training checkpoints."""
