"""Training checkpoints, as every job finds and opens them: `{output}/checkpoints/step_{N:08d}/` with model.pt
(an OpenCLIP-format state dict), state.pt (the trainer's own state) and checkpoint.json, written last as the
commit marker. Readers ignore folders without it. The trainer writes and prunes them (pipelines.train)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pipelines import storage

CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
MARKER_FILE = "checkpoint.json"
_STEP_DIR = re.compile(r"step_(\d{8,})")


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


def checkpoints_uri(output_uri: str) -> str:
    """Where a training output keeps its checkpoints."""
    return storage.join(output_uri, CHECKPOINTS_DIR)


def step_uri(checkpoints_uri: str, step: int) -> str:
    return storage.join(checkpoints_uri, f"step_{step:08d}")


def _step_of(folder: str) -> int | None:
    match = _STEP_DIR.fullmatch(folder.rpartition("/")[2])
    return int(match.group(1)) if match else None


def step_folders(checkpoints_uri: str, settings: storage.S3Settings | None = None) -> dict[int, str]:
    """Every step folder with anything in it, complete or not."""
    folders: dict[int, str] = {}
    for entry in storage.list_files(checkpoints_uri, settings=settings):
        parent = entry.uri.rpartition("/")[0]
        step = _step_of(parent)
        if step is not None:
            folders[step] = parent
    return folders


def complete_folders(checkpoints_uri: str, settings: storage.S3Settings | None = None) -> dict[int, str]:
    """Step -> folder of every complete checkpoint (its marker exists), without reading the markers."""
    folders: dict[int, str] = {}
    for entry in storage.list_files(checkpoints_uri, settings=settings):
        folder, _, name = entry.uri.rpartition("/")
        step = _step_of(folder)
        if name == MARKER_FILE and step is not None:
            folders[step] = folder
    return folders


def list_complete(checkpoints_uri: str, settings: storage.S3Settings | None = None) -> list[Checkpoint]:
    """Complete checkpoints (with their commit marker), oldest first."""
    found = []
    for step, folder in sorted(complete_folders(checkpoints_uri, settings=settings).items()):
        info = json.loads(storage.read_bytes(storage.join(folder, MARKER_FILE), settings=settings))
        found.append(Checkpoint(folder, step, info))
    return found


def latest(checkpoints_uri: str, settings: storage.S3Settings | None = None) -> Checkpoint | None:
    complete = list_complete(checkpoints_uri, settings=settings)
    return complete[-1] if complete else None


def read_info(folder_uri: str, settings: storage.S3Settings | None = None) -> dict[str, Any] | None:
    """The checkpoint.json of a folder, or None when it has none (not a complete checkpoint)."""
    marker = storage.join(folder_uri, MARKER_FILE)
    if not storage.exists(marker, settings=settings):
        return None
    return json.loads(storage.read_bytes(marker, settings=settings))


def open_checkpoint(uri: str, settings: storage.S3Settings | None = None) -> Checkpoint:
    """The complete checkpoint in a step folder (for --resume); one clear sentence if it is not one."""
    uri = uri.rstrip("/")
    info = read_info(uri, settings=settings)
    if info is None:
        raise FileNotFoundError(
            f"{uri} is not a complete training checkpoint (no {MARKER_FILE}); give a step_NNNNNNNN folder "
            "that training finished writing"
        )
    return Checkpoint(uri, int(info["step"]), info)


def open_weights(uri: str) -> tuple[str, dict[str, Any] | None]:
    """(weights file, checkpoint.json) of a URI naming a complete checkpoint folder, or (the URI, None) for
    a plain weights file. A folder without its marker and a URI naming nothing raise FileNotFoundError."""
    info = read_info(uri)
    if info is not None:
        return storage.join(uri, MODEL_FILE), info
    if storage.list_files(uri):
        raise FileNotFoundError(
            f"checkpoint folder {uri} has no {MARKER_FILE}, so it is an incomplete training checkpoint; pass "
            "a committed checkpoint folder or a weights file."
        )
    if not storage.exists(uri):
        raise FileNotFoundError(f"checkpoint {uri} does not exist; check the --checkpoint URI.")
    return uri, None


def folder_of(uri: str) -> str:
    """The step folder a URI stands for: a training checkpoint's model.pt stands for its folder (the identity
    a listing finds); any other URI stands for itself."""
    folder = uri.removesuffix(f"/{MODEL_FILE}")
    parent = folder.rpartition("/")[0]
    in_layout = _step_of(folder) is not None and parent.rpartition("/")[2] == CHECKPOINTS_DIR
    return folder if folder != uri and in_layout else uri
