"""Scheduled evaluation: evaluate each new checkpoint once with a suite and keep the registry's `champion`
alias on the best. `python -m pipelines.scheduled_eval --config FILE.yaml [--watch SECONDS]`; the trainer
calls `launch_background_pass(config_uri)` to start a pass without waiting for it."""

from pipelines.config import ConfigError
from pipelines.scheduled_eval.background import BackgroundPass, launch_background_pass
from pipelines.scheduled_eval.config import ScheduledEvalConfig
from pipelines.scheduled_eval.scheduler import run_pass

__all__ = [
    "BackgroundPass",
    "ConfigError",
    "ScheduledEvalConfig",
    "launch_background_pass",
    "run_pass",
]
