"""The local stack (S3 store, MLflow tracking server, Ray head) on loopback: stack.py starts, checks and stops
it, services.py says what each service runs, processes.py supervises them, state.py lays out the state dir."""

from infra.local.services import (
    BUCKETS,
    DATA_BUCKET,
    MLFLOW_ARTIFACTS_DESTINATION,
    MLFLOW_BUCKET,
    StackConfig,
)
from infra.local.stack import ServiceStatus, leased, load_config, stack_env, start, status, stop
from infra.local.state import DEFAULT_STATE_DIR, StackError

__all__ = [
    "BUCKETS",
    "DATA_BUCKET",
    "DEFAULT_STATE_DIR",
    "MLFLOW_ARTIFACTS_DESTINATION",
    "MLFLOW_BUCKET",
    "ServiceStatus",
    "StackConfig",
    "StackError",
    "leased",
    "load_config",
    "stack_env",
    "start",
    "status",
    "stop",
]
