"""Zero-shot evaluation of CLIP checkpoints (classification, retrieval, linear probes) on Ray, logged to
MLflow, with CLIP_benchmark's metric definitions. CLI: `python -m pipelines.evaluate --help`."""

from pipelines.evaluate.config import EvaluateConfig, SuiteConfig, load_suite
from pipelines.evaluate.job import Evaluation, EvaluationError, run

__all__ = ["EvaluateConfig", "Evaluation", "EvaluationError", "SuiteConfig", "load_suite", "run"]
