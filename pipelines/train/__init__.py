"""Distributed CLIP pretraining on Ray Train (issue 4): config, input pipeline, checkpoints, tracking, job."""
