"""pipelines.formats.checkpoints: a step folder counts as a checkpoint only with its checkpoint.json, found
without reading it; a URI opens as a checkpoint folder or a plain weights file; model.pt names its folder."""

from __future__ import annotations

import json

import pytest

from pipelines.formats import checkpoints


def _write(root, step: int, complete: bool) -> str:
    folder = checkpoints.step_uri(str(root), step)
    (root / f"step_{step:08d}").mkdir(parents=True)
    (root / f"step_{step:08d}" / checkpoints.MODEL_FILE).write_bytes(b"weights")
    if complete:
        (root / f"step_{step:08d}" / checkpoints.MARKER_FILE).write_text(json.dumps({"step": step}))
    return folder


def test_a_checkpoint_folder_without_checkpoint_json_is_not_listed(tmp_path):
    done = _write(tmp_path, 10, complete=True)
    torn = _write(tmp_path, 20, complete=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / checkpoints.MARKER_FILE).write_text("{}")  # not a step folder
    assert checkpoints.complete_folders(str(tmp_path)) == {10: done}
    assert checkpoints.step_folders(str(tmp_path)) == {10: done, 20: torn}
    assert [(c.uri, c.step, c.info) for c in checkpoints.list_complete(str(tmp_path))] == [
        (done, 10, {"step": 10})
    ]
    assert checkpoints.read_info(torn) is None and checkpoints.read_info(done) == {"step": 10}


def test_open_weights_takes_a_complete_folder_or_a_plain_file(tmp_path):
    done = _write(tmp_path, 10, complete=True)
    assert checkpoints.open_weights(done) == (f"{done}/{checkpoints.MODEL_FILE}", {"step": 10})
    plain = tmp_path / "weights.pt"
    plain.write_bytes(b"weights")
    assert checkpoints.open_weights(str(plain)) == (str(plain), None)
    torn = _write(tmp_path, 20, complete=False)
    with pytest.raises(FileNotFoundError, match="has no checkpoint.json, so it is an incomplete"):
        checkpoints.open_weights(torn)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoints.open_weights(str(tmp_path / "nope.pt"))


def test_a_training_checkpoints_model_file_stands_for_its_folder():
    folder = "s3://b/run/checkpoints/step_00000300"
    assert checkpoints.folder_of(f"{folder}/model.pt") == folder
    assert checkpoints.folder_of(folder) == folder
    assert checkpoints.folder_of("s3://b/elsewhere/step_00000300/model.pt").endswith("/model.pt")
    assert checkpoints.folder_of("runs:/abc/final_model/model.pt") == "runs:/abc/final_model/model.pt"
    assert checkpoints.checkpoints_uri("s3://b/run") == "s3://b/run/checkpoints"
