"""Zero-shot evaluation of CLIP checkpoints (classification, retrieval, linear probes) on Ray, logged to
MLflow, with CLIP_benchmark's metric definitions. CLI: `python -m pipelines.evaluate --help`."""

from pipelines.evaluate.config import EvaluateConfig, load_suite
from pipelines.evaluate.job import run

__all__ = ["EvaluateConfig", "load_suite", "run"]
