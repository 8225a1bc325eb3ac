"""Training checkpoints in storage: `{output}/checkpoints/step_{N:08d}/` with model.pt (an OpenCLIP-format
state dict), state.pt (optimizer, scaler, schedule, data position, step) and checkpoint.json, written last
as the commit marker. Readers ignore folders without it; pruning keeps the newest few and the best.
"""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from pipelines import storage

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
MARKER_FILE = "checkpoint.json"
_STEP_DIR = re.compile(r"step_(\d{8})$")


@dataclass(frozen=True)
class Checkpoint:
    uri: str  # the step folder
    step: int
    info: dict[str, Any]  # the content of checkpoint.json

    @property
    def model_uri(self) -> str:
        return storage.join(self.uri, MODEL_FILE)

    @property
    def state_uri(self) -> str:
        return storage.join(self.uri, STATE_FILE)


def step_uri(checkpoints_uri: str, step: int) -> str:
    return storage.join(checkpoints_uri, f"step_{step:08d}")


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


def step_folders(checkpoints_uri: str, settings: storage.S3Settings | None = None) -> dict[int, str]:
    """Every step folder with anything in it, complete or not."""
    folders: dict[int, str] = {}
    for entry in storage.list_files(checkpoints_uri, settings=settings):
        parent = entry.uri.rsplit("/", 1)[0]
        match = _STEP_DIR.search(parent)
        if match:
            folders[int(match.group(1))] = parent
    return folders


def list_complete(checkpoints_uri: str, settings: storage.S3Settings | None = None) -> list[Checkpoint]:
    """Complete checkpoints (with their commit marker), oldest first."""
    found = []
    for entry in storage.list_files(checkpoints_uri, settings=settings):
        folder, _, name = entry.uri.rpartition("/")
        match = _STEP_DIR.search(folder)
        if name == MARKER_FILE and match:
            info = json.loads(storage.read_bytes(entry.uri, settings=settings))
            found.append(Checkpoint(folder, int(match.group(1)), info))
    return sorted(found, key=lambda c: c.step)


def latest(checkpoints_uri: str, settings: storage.S3Settings | None = None) -> Checkpoint | None:
    complete = list_complete(checkpoints_uri, settings=settings)
    return complete[-1] if complete else None


def open_checkpoint(uri: str, settings: storage.S3Settings | None = None) -> Checkpoint:
    """The complete checkpoint in a step folder (for --resume); one clear sentence if it is not one."""
    uri = uri.rstrip("/")
    marker = storage.join(uri, MARKER_FILE)
    if not storage.exists(marker, settings=settings):
        raise FileNotFoundError(
            f"{uri} is not a complete training checkpoint (no {MARKER_FILE}); give a step_NNNNNNNN folder "
            "that training finished writing"
        )
    info = json.loads(storage.read_bytes(marker, settings=settings))
    return Checkpoint(uri, int(info["step"]), info)


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
