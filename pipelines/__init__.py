"""Ray jobs of the pipeline (ingest, training, evaluation) and what they share: storage, tracking, configs."""
