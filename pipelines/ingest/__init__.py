"""Ingest stage: URL+caption lists to img2dataset-compatible WebDataset shards and Parquet, on Ray Data."""
