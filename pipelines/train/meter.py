"""The training loop's bookkeeping: the step and sample counts a checkpoint saves, which steps log, save and
evaluate, and the loss, time and data wait of the current log and checkpoint intervals."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from time import perf_counter

import torch

from pipelines.train.config import TrainConfig


@dataclass(frozen=True)
class LogInterval:
    """This worker's steps since the last log."""

    loss: float  # mean over the interval's steps
    steps: int
    seconds: float  # training time: paused time (logging, checkpoint writing) left out
    wait_seconds: float  # of those, waiting for the loader

    @property
    def data_wait_fraction(self) -> float:
        return self.wait_seconds / self.seconds


class TrainMeter:
    """Counts steps and samples, and measures the log interval (its losses, training time, data wait) and the
    checkpoint interval (its losses). Each interval's counters start over in one place: `end_log_interval`
    and `end_checkpoint_interval`."""

    def __init__(self, cfg: TrainConfig, step: int = 0, samples_seen: int = 0):
        self.cfg = cfg
        self.step, self.samples_seen = step, samples_seen
        self._start_log_interval()
        self._start_checkpoint_interval()

    def _start_log_interval(self) -> None:
        self._log_losses: list[torch.Tensor] = []
        self._log_steps = 0
        self._log_started = perf_counter()
        self._wait_seconds = self._paused_seconds = 0.0

    def _start_checkpoint_interval(self) -> None:
        self._checkpoint_losses: list[torch.Tensor] = []

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        """Time spent inside counts as the trainer waiting for the loader."""
        started = perf_counter()
        yield
        self._wait_seconds += perf_counter() - started

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (logging, checkpoint writing) is left out of the log interval's training time."""
        started = perf_counter()
        yield
        self._paused_seconds += perf_counter() - started

    def add_step(self, loss: torch.Tensor) -> None:
        """One optimizer step of cfg.batch_size samples (all workers together) with this worker's loss."""
        self.step += 1
        self.samples_seen += self.cfg.batch_size
        self._log_steps += 1
        self._log_losses.append(loss)
        self._checkpoint_losses.append(loss)

    def _due(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.cfg.steps

    def due_for_log(self) -> bool:
        return self._due(self.cfg.log_every)

    def due_for_checkpoint(self) -> bool:
        return self._due(self.cfg.checkpoint_every)

    def due_for_eval(self) -> bool:
        """Whether to launch an evaluation of the checkpoint saved at this step (never without eval_every)."""
        return bool(self.cfg.eval_every) and self.step % self.cfg.eval_every == 0

    def end_log_interval(self) -> LogInterval:
        """The log interval that ends now; the next one starts."""
        seconds = perf_counter() - self._log_started - self._paused_seconds
        loss = float(torch.stack(self._log_losses).float().mean())
        interval = LogInterval(
            loss=loss, steps=self._log_steps, seconds=seconds, wait_seconds=self._wait_seconds
        )
        self._start_log_interval()
        return interval

    def end_checkpoint_interval(self) -> float:
        """This worker's mean loss since the last checkpoint; the next interval starts."""
        loss = float(torch.stack(self._checkpoint_losses).float().mean())
        self._start_checkpoint_interval()
        return loss
