"""The training loop's bookkeeping without services: the steps that log, checkpoint and evaluate, and what each
log and checkpoint interval measures (mean loss, steps, training time without paused time, data wait)."""

import pytest
import torch

from pipelines.train import meter as meter_module
from pipelines.train.config import TrainConfig
from pipelines.train.meter import TrainMeter


def _config(**fields) -> TrainConfig:
    defaults = dict(steps=10, batch_size=8, log_every=4, checkpoint_every=5)
    return TrainConfig(data=["/d"], model="ViT-Tiny-16", output="/tmp/run", **(defaults | fields))


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(meter_module, "perf_counter", fake)
    return fake


def _steps_where(meter: TrainMeter, due) -> list[int]:
    steps = []
    while meter.step < meter.cfg.steps:
        meter.add_step(torch.tensor(1.0))
        if due(meter):
            steps.append(meter.step)
    return steps


def test_logs_and_checkpoints_every_n_steps_and_at_the_last_step():
    cfg = _config()
    assert _steps_where(TrainMeter(cfg), TrainMeter.due_for_log) == [4, 8, 10]
    assert _steps_where(TrainMeter(cfg), TrainMeter.due_for_checkpoint) == [5, 10]
    assert _steps_where(TrainMeter(cfg), TrainMeter.due_for_eval) == []  # no eval_every, no evaluation
    # A resumed run keeps the same steps: they are counted from the run's start, not from the restart.
    assert _steps_where(TrainMeter(cfg, step=5, samples_seen=40), TrainMeter.due_for_log) == [8, 10]


def test_evaluates_at_every_eval_every_step():
    cfg = _config(steps=20, eval_config="/evals/suite.yaml", eval_every=10)
    assert _steps_where(TrainMeter(cfg), TrainMeter.due_for_eval) == [10, 20]
    # An eval config alone evaluates at every checkpoint.
    cfg = _config(eval_config="/evals/suite.yaml")
    assert _steps_where(TrainMeter(cfg), TrainMeter.due_for_eval) == [5, 10]


def test_counts_steps_and_samples_from_where_the_run_resumed(clock):
    meter = TrainMeter(_config(), step=5, samples_seen=40)
    meter.add_step(torch.tensor(2.0))
    assert (meter.step, meter.samples_seen) == (6, 48)


def test_a_log_interval_measures_its_steps_without_paused_time_and_then_starts_over(clock):
    meter = TrainMeter(_config())
    for loss in (1.0, 2.0, 3.0):
        with meter.waiting_for_data():
            clock.now += 0.5
        clock.now += 1.5  # the step itself
        meter.add_step(torch.tensor(loss))
    with meter.paused():  # a checkpoint written inside the interval
        clock.now += 30.0
    interval = meter.end_log_interval()
    assert interval.loss == pytest.approx(2.0) and interval.steps == 3
    assert interval.seconds == pytest.approx(6.0) and interval.wait_seconds == pytest.approx(1.5)
    assert interval.data_wait_fraction == pytest.approx(0.25)

    # The next interval holds only what came after: its loss, its steps, its time, its wait.
    with meter.paused():  # logging the interval that ended
        clock.now += 10.0
    clock.now += 2.0
    meter.add_step(torch.tensor(5.0))
    interval = meter.end_log_interval()
    assert (interval.loss, interval.steps) == (pytest.approx(5.0), 1)
    assert interval.seconds == pytest.approx(2.0) and interval.wait_seconds == 0.0


def test_the_checkpoint_interval_has_its_own_losses_across_log_intervals(clock):
    meter = TrainMeter(_config())
    for loss in (1.0, 2.0):
        clock.now += 1.0
        meter.add_step(torch.tensor(loss))
    assert meter.end_log_interval().loss == pytest.approx(1.5)
    for loss in (3.0, 6.0):
        clock.now += 1.0
        meter.add_step(torch.tensor(loss))
    assert meter.end_checkpoint_interval() == pytest.approx(3.0)  # all four steps since the start
    clock.now += 1.0
    meter.add_step(torch.tensor(10.0))
    assert meter.end_checkpoint_interval() == pytest.approx(10.0)
    assert meter.end_log_interval().loss == pytest.approx((3.0 + 6.0 + 10.0) / 3)
