"""The training job on Ray Train: the driver validates the config, resolves the shards, opens the MLflow run
and starts the workers; each worker runs `train_loop_per_worker` -- DDP over the clip_core model, shards
streamed by pipelines.train.data, checkpoints in storage, and resume from the newest complete one.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import mlflow
import torch
import torch.distributed as dist

import clip_core
from clip_core.training import WarmupCosineSchedule, accumulated_train_step, create_optimizer
from pipelines import failpoints, storage
from pipelines.config import without_credentials
from pipelines.entrypoint import JobError
from pipelines.formats.checkpoints import Checkpoint, latest, list_complete, open_checkpoint
from pipelines.tracking import use_tracking_server
from pipelines.train import checkpoints, tracking
from pipelines.train.config import TrainConfig
from pipelines.train.meter import TrainMeter

CONFIG_FILE = "train_config.yaml"
WORKERS_DIR = "workers"  # one small file per rank: pid and node, for operators (and the fault test)


@dataclass
class TrainSummary:
    """The final checkpoint, its metrics and where the run is tracked; printed as JSON."""

    checkpoint: str
    step: int
    metrics: dict[str, float]
    mlflow_run_id: str
    mlflow_experiment_id: str
    registered_model: str  # "name vN"
    seconds: float

    def __str__(self) -> str:
        return json.dumps(asdict(self), indent=2)


def run(cfg: TrainConfig) -> TrainSummary:
    """Train to cfg.steps (resuming whatever the output already holds) and register the final model."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train import data

    # Problems with the inputs stop the job here, before any worker starts, with one sentence.
    try:
        shards = data.resolve_shards(cfg.data)
        if cfg.resume is not None:
            open_checkpoint(cfg.resume)
        if cfg.eval_config is not None:
            from pipelines.scheduled_eval import ScheduledEvalConfig

            ScheduledEvalConfig.load(["--config", cfg.eval_config])  # a ConfigError is a ValueError
    except (ValueError, FileNotFoundError) as error:
        raise JobError(str(error)) from None
    started = time.time()
    with tracked_run(cfg, shards) as (run, worker_config):
        storage_fs, storage_path = ray_storage(cfg)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=worker_config,
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            scaling_config=scaling_config(cfg),
            run_config=ray.train.RunConfig(
                # A fresh name per driver: Ray's own run state is per attempt; ours lives in checkpoints/.
                name=f"train-{run.info.run_id[:8]}-{int(started)}",
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            ),
        )
        trainer.fit()
        final = latest(cfg.checkpoints_uri)
        if final is None or final.step < cfg.steps:
            raise RuntimeError(
                f"training ended without a checkpoint at step {cfg.steps} in {cfg.checkpoints_uri}"
            )
        version = tracking.register_final_model(final.model_uri, final.step, cfg.registered_model, final.info)
    return TrainSummary(
        checkpoint=final.uri,
        step=final.step,
        metrics=final.info.get("metrics", {}),
        mlflow_run_id=run.info.run_id,
        mlflow_experiment_id=run.info.experiment_id,
        registered_model=f"{cfg.registered_model} v{version}",
        seconds=round(time.time() - started, 1),
    )


@contextlib.contextmanager
def tracked_run(cfg: TrainConfig, shards: list) -> Iterator[tuple[mlflow.ActiveRun, dict[str, Any]]]:
    """The driver's side before any worker starts: the resolved config beside the output, MLflow pointed at
    the tracking server without credentials in its URI (they move to the environment, out of every log
    line), the run created or reopened with the config logged, and the loop config every worker is handed."""
    storage.write_bytes(storage.join(cfg.output, CONFIG_FILE), cfg.to_yaml().encode())
    use_tracking_server()
    with tracking.start_or_resume_run(cfg, shards) as run:
        mlflow.log_text(cfg.to_yaml(), CONFIG_FILE)
        yield run, loop_config(cfg, shards, run.info.run_id, run.info.experiment_id)


def ray_storage(cfg: TrainConfig):
    """(filesystem, path) for Ray Train's own run state under the output. Ray pickles the filesystem into its
    controller's arguments, so it carries no keys: every process takes them from its own environment."""
    return storage.pyarrow_filesystem(storage.join(cfg.output, "ray"), with_keys=False)


def loop_config(
    cfg: TrainConfig, shards: list, run_id: str, experiment_id: str, tracking_uri: str | None = None
) -> dict[str, Any]:
    """What every worker is handed. Ray records it (task arguments; Ray Train's run state, shown in the
    dashboard), so it holds no credential: the tracking URI (default: the driver's) loses its
    `user:password@`, and the workers authenticate from their own environment (pipelines.tracking)."""
    return {
        "cfg": cfg.model_dump(mode="json"),
        "shards": [(s.uri, s.num_samples) for s in shards],
        "mlflow_run_id": run_id,
        "mlflow_experiment_id": experiment_id,
        "mlflow_tracking_uri": without_credentials(tracking_uri or mlflow.get_tracking_uri()),
    }


def scaling_config(cfg: TrainConfig):
    """Ray Train's scaling: `workers` workers, or elastic between min_workers and workers. Elastic, a lost
    worker's group restarts with as many workers as the cluster has room for (at least min_workers) from the
    newest checkpoint, and a running group is restarted larger when room appears, checked every
    resize_check_s."""
    import ray.train

    return ray.train.ScalingConfig(
        num_workers=(cfg.min_workers, cfg.workers) if cfg.elastic else cfg.workers,
        use_gpu=cfg.use_gpu,
        resources_per_worker=_worker_resources(cfg),
        elastic_resize_monitor_interval_s=cfg.resize_check_s,
    )


def _worker_resources(cfg: TrainConfig) -> dict[str, float]:
    return {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})


# ---------------------------------------------------------------------------------------------------------
# One training worker


def _mean_over_workers(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor.tolist()


def _start_checkpoint(cfg: TrainConfig) -> Checkpoint | None:
    """The newest complete checkpoint of this output, else --resume, else None (a fresh start)."""
    newest = latest(cfg.checkpoints_uri)
    if newest is not None:
        return newest
    return open_checkpoint(cfg.resume) if cfg.resume else None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from pipelines.train.data import LoaderSpec, Shard, TrainLoader, gather_positions

    cfg = TrainConfig.model_validate(config["cfg"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    worker = {"pid": os.getpid(), "node": socket.gethostname(), "started_at": time.time()}
    storage.write_bytes(
        storage.join(cfg.output, WORKERS_DIR, f"rank_{rank}.json"), json.dumps(worker).encode()
    )

    torch.manual_seed(cfg.seed)
    model = clip_core.create_model(cfg.model, device=device)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    optimizer = create_optimizer(
        model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )
    schedule = WarmupCosineSchedule(optimizer, cfg.lr, cfg.warmup, cfg.steps)
    step, samples_seen, position = 0, 0, None
    start = _start_checkpoint(cfg)
    if start is not None:
        model.load_state_dict(checkpoints.load_model_state(start))
        state = checkpoints.load_train_state(start)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        step, samples_seen = state["step"], state["samples_seen"]
        # Every stream's position; streams are laid out for `workers` ranks whatever the world size now, so
        # each continues where it stopped (pipelines.train.data, "Elastic").
        position = state["data_position"]
        if rank == 0:
            print(f"resuming from {start.uri} at step {step} with {world_size} workers", flush=True)

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    loss_fn = clip_core.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)

    shards = [Shard(uri, count) for uri, count in config["shards"]]
    loader_spec = LoaderSpec.from_config(cfg, shards, rank, world_size)
    loader = TrainLoader(loader_spec, position, pin_memory=device.type == "cuda")
    batches = iter(loader)

    if rank == 0:
        tracking.open_from_worker(config["mlflow_run_id"], config["mlflow_tracking_uri"])
    info_base = {
        "model": cfg.model,
        "mlflow_run_id": config["mlflow_run_id"],
        "mlflow_experiment_id": config["mlflow_experiment_id"],
        "output": cfg.output,
        "world_size": world_size,
        "global_batch_size": cfg.batch_size,
    }

    # The micro-batch is fixed; fewer workers accumulate more of them, so a step is batch_size at any size.
    accum_steps = cfg.accum_steps_at(world_size)
    meter = TrainMeter(cfg, step, samples_seen)
    while meter.step < cfg.steps:
        micro_batches = []
        for _ in range(accum_steps):
            with meter.waiting_for_data():
                images, texts = next(batches)
            micro_batches.append((images.to(device, non_blocking=True), texts.to(device, non_blocking=True)))
        lr = schedule(meter.step)
        loss = accumulated_train_step(
            model,
            loss_fn,
            optimizer,
            micro_batches,
            precision=cfg.precision,
            grad_clip_norm=cfg.grad_clip_norm,
        )
        meter.add_step(loss)
        epoch = meter.samples_seen / loader_spec.num_samples

        if meter.due_for_log():
            interval = meter.end_log_interval()
            # Logging, like checkpoint writing, is paused time: samples/s and the data-wait share measure
            # the training steps.
            with meter.paused():
                loss_value, wait_fraction = _mean_over_workers(
                    [interval.loss, interval.data_wait_fraction], device
                )
                if rank == 0:
                    metrics = {
                        "loss": loss_value,
                        "lr": lr,
                        "logit_scale": raw_model.logit_scale.exp().item(),
                        "samples_per_s": interval.steps * cfg.batch_size / interval.seconds,
                        "step_time_s": interval.seconds / interval.steps,
                        "data_wait_fraction": wait_fraction,
                        "epoch": epoch,
                    }
                    mlflow.log_metrics(metrics, step=meter.step)
                    print(
                        f"step {meter.step}/{cfg.steps} loss {loss_value:.4f} lr {lr:.2e} "
                        f"{metrics['samples_per_s']:.1f} samples/s data wait {wait_fraction:.1%}",
                        flush=True,
                    )

        if meter.due_for_checkpoint():
            with meter.paused():
                checkpoint_start = time.perf_counter()
                checkpoint_loss = _mean_over_workers([meter.end_checkpoint_interval()], device)[0]
                data_position = gather_positions(loader)
                corrupt = sum(p["corrupt"] for p in data_position["streams"].values())
                metrics = {"loss": checkpoint_loss, "corrupt_samples": corrupt}
                if rank == 0:
                    saved = checkpoints.save(
                        cfg.checkpoints_uri,
                        meter.step,
                        model_state=raw_model.state_dict(),
                        train_state={
                            "step": meter.step,
                            "samples_seen": meter.samples_seen,
                            "optimizer": optimizer.state_dict(),
                            "scheduler": schedule.state_dict(),
                            "scaler": None,  # bf16 autocast needs no loss scaling
                            "data_position": data_position,
                        },
                        info={
                            **info_base,
                            "samples_seen": meter.samples_seen,
                            "epoch": epoch,
                            "metrics": metrics,
                        },
                    )
                    checkpoints.prune(cfg.checkpoints_uri, cfg.keep_last, cfg.best_metric, cfg.best_mode)
                    kept = [c.uri for c in list_complete(cfg.checkpoints_uri)]
                    tracking.log_checkpoint(saved.uri, kept)
                    mlflow.log_metric(
                        "checkpoint_time_s", time.perf_counter() - checkpoint_start, step=meter.step
                    )
                    print(f"checkpoint {saved.uri}", flush=True)
                    if meter.due_for_eval():
                        _launch_eval(cfg.eval_config)
                # Checkpoints are NOT handed to Ray (no `checkpoint=`): ours, in the contract's layout with its
                # commit marker, is what evaluation, --resume and restarts read, and rank 0 already wrote it;
                # Ray would upload a second copy of every checkpoint to its storage_path for nothing.
                # The report still gives Ray's dashboard the step and loss, and keeps the workers in step.
                ray.train.report({"step": meter.step, **metrics})
                if rank > 0:
                    # The checkpoint is complete (the report waits for every rank). A test pauses a worker
                    # other than the writer here, to take its node away at a known step.
                    failpoints.reach("train.checkpoint_saved", meter.step)

    if rank == 0:
        mlflow.end_run()


def _launch_eval(config_uri: str | None) -> None:
    """Start one background evaluation pass; training goes on whatever happens to it."""
    try:
        from pipelines.scheduled_eval import launch_background_pass

        launched = launch_background_pass(config_uri)
        print(f"launched a background evaluation pass: {launched}", flush=True)
    except Exception as error:  # noqa: BLE001 - an evaluation problem must never stop training
        print(
            f"warning: could not launch the scheduled evaluation ({type(error).__name__}: {error})",
            flush=True,
        )
