"""The trainer's side of its checkpoints (layout in pipelines.formats.checkpoints): saving one with model.pt,
state.pt (optimizer, scaler, schedule, data position, step) and checkpoint.json last, loading them back for
a resume, and pruning to the newest few and the best.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import torch

from pipelines import storage
from pipelines.formats.checkpoints import (
    MARKER_FILE,
    MODEL_FILE,
    STATE_FILE,
    Checkpoint,
    list_complete,
    step_folders,
    step_uri,
)


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save(
    checkpoints_uri: str,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    info: dict[str, Any],
    settings: storage.S3Settings | None = None,
) -> Checkpoint:
    """Write one checkpoint; it becomes visible to readers only when checkpoint.json lands, last."""
    uri = step_uri(checkpoints_uri, step)
    marker = storage.join(uri, MARKER_FILE)
    # A re-save of the same step (after a restart) must not look complete while its files are replaced.
    storage.delete(marker, settings=settings)
    storage.write_bytes(storage.join(uri, MODEL_FILE), _torch_bytes(model_state), settings=settings)
    storage.write_bytes(storage.join(uri, STATE_FILE), _torch_bytes(train_state), settings=settings)
    info = {**info, "step": step, "created_at": time.time()}
    storage.write_bytes(marker, json.dumps(info, indent=2).encode(), settings=settings)
    return Checkpoint(uri, step, info)


def load_model_state(checkpoint: Checkpoint, settings: storage.S3Settings | None = None) -> dict:
    return torch.load(
        io.BytesIO(storage.read_bytes(checkpoint.model_uri, settings=settings)), weights_only=True
    )


def load_train_state(checkpoint: Checkpoint, settings: storage.S3Settings | None = None) -> dict:
    # weights_only still admits the plain containers, numbers and strings the trainer stores.
    return torch.load(
        io.BytesIO(storage.read_bytes(checkpoint.state_uri, settings=settings)), weights_only=True
    )


def prune(
    checkpoints_uri: str,
    keep_last: int,
    best_metric: str | None = None,
    best_mode: str = "min",
    settings: storage.S3Settings | None = None,
) -> list[int]:
    """Delete all but the newest `keep_last` complete checkpoints and the best one by `best_metric`;
    incomplete folders older than the newest complete checkpoint are leftovers of crashes and go too.
    A folder in progress (newer than every complete one) is left alone. Returns the deleted steps."""
    complete = list_complete(checkpoints_uri, settings=settings)
    if not complete:
        return []
    keep = {c.step for c in complete[-keep_last:]}
    scored = [c for c in complete if isinstance(c.info.get("metrics", {}).get(best_metric), (int, float))]
    if best_metric and scored:
        pick = min if best_mode == "min" else max
        keep.add(pick(scored, key=lambda c: c.info["metrics"][best_metric]).step)
    newest = complete[-1].step
    deleted = []
    for step, uri in sorted(step_folders(checkpoints_uri, settings=settings).items()):
        if step in keep or step > newest:
            continue
        # The marker goes first, so a half-deleted folder is never taken for a complete checkpoint.
        storage.delete(storage.join(uri, MARKER_FILE), settings=settings)
        storage.delete(uri, recursive=True, settings=settings)
        deleted.append(step)
    return deleted
