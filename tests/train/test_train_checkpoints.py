"""pipelines.train.checkpoints: a checkpoint counts only once its checkpoint.json is written, model.pt is a
plain OpenCLIP state dict, and pruning keeps the newest few and the best, never a folder still being written."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

import clip_core
from pipelines.formats.checkpoints import Checkpoint, latest, list_complete, open_checkpoint, step_uri
from pipelines.train import checkpoints


def _save(root: str, step: int, loss: float, model_state=None) -> Checkpoint:
    state = model_state if model_state is not None else {"w": torch.full((2,), float(step))}
    return checkpoints.save(
        root,
        step,
        model_state=state,
        train_state={"step": step, "optimizer": {"state": {}}, "data_position": {"format": 1}},
        info={"model": "ViT-Tiny-16", "metrics": {"loss": loss}},
    )


def test_saved_checkpoint_has_the_contract_layout_and_loads_in_open_clip(tmp_path):
    torch.manual_seed(0)
    model = clip_core.create_model("ViT-Tiny-16")
    saved = _save(str(tmp_path), 40, 1.5, model.state_dict())
    folder = tmp_path / "step_00000040"
    assert saved.uri == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.json", "model.pt", "state.pt"]
    info = json.loads((folder / "checkpoint.json").read_text())
    assert info["step"] == 40 and info["metrics"] == {"loss": 1.5} and info["created_at"] > 0

    open_clip.add_model_config(clip_core.MODEL_CONFIG_DIR)
    theirs = open_clip.create_model("ViT-Tiny-16", pretrained=str(folder / "model.pt"))
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name], msg=name)
    assert checkpoints.load_train_state(saved)["step"] == 40


def test_a_folder_without_checkpoint_json_is_invisible(tmp_path):
    root = str(tmp_path)
    _save(root, 10, 3.0)
    # A crash after model.pt and before the marker: the newer folder must not be taken for a checkpoint.
    torn = Path(step_uri(root, 20))
    torn.mkdir()
    torch.save({"w": torch.zeros(2)}, torn / "model.pt")
    assert [c.step for c in list_complete(root)] == [10]
    assert latest(root).step == 10
    with pytest.raises(FileNotFoundError, match="is not a complete training checkpoint"):
        open_checkpoint(str(torn))
    assert open_checkpoint(step_uri(root, 10)).step == 10
    assert latest(str(tmp_path / "nothing-here")) is None


def test_prune_keeps_the_newest_and_the_best_and_drops_crash_leftovers(tmp_path):
    root = str(tmp_path)
    for step, loss in [(10, 4.0), (20, 1.0), (30, 3.0), (40, 2.5), (50, 2.0)]:
        _save(root, step, loss)
    leftover = Path(step_uri(root, 35))  # incomplete, older than the newest complete one
    leftover.mkdir()
    (leftover / "model.pt").write_bytes(b"partial")
    in_progress = Path(step_uri(root, 60))  # being written right now
    in_progress.mkdir()
    (in_progress / "model.pt").write_bytes(b"partial")

    deleted = checkpoints.prune(root, keep_last=2, best_metric="loss", best_mode="min")
    assert deleted == [10, 30, 35]
    assert [c.step for c in list_complete(root)] == [20, 40, 50]
    assert in_progress.exists()

    assert checkpoints.prune(root, keep_last=1, best_metric="loss", best_mode="max") == [20]
    assert [c.step for c in list_complete(root)] == [40, 50]


def test_saving_a_step_again_replaces_it(tmp_path):
    root = str(tmp_path)
    _save(root, 10, 3.0)
    _save(root, 10, 2.0)  # a restarted run reaching the same step
    (only,) = list_complete(root)
    assert only.info["metrics"]["loss"] == 2.0
    assert checkpoints.load_model_state(only)["w"].tolist() == [10.0, 10.0]
