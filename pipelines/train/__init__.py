"""Distributed CLIP pretraining on Ray Train: config, input pipeline, checkpoints, tracking, job."""
