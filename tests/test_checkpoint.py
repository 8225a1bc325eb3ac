"""Tests for clip_core.checkpoint: every checkpoint layout we read, files OpenCLIP reads back, refusal of
malicious pickles, clear errors for the wrong architecture, and architecture inference from weights."""

import io
import os
import warnings

import open_clip
import pytest
import torch

from clip_core.checkpoint import (
    CheckpointError,
    infer_model_config,
    load_checkpoint,
    load_state_dict,
    plain_state_dict,
    read_checkpoint_file,
    save_checkpoint,
)
from clip_core.model import CLIP, MODEL_CONFIG_DIR, create_model, get_model_config

torch.set_num_threads(2)
open_clip.add_model_config(MODEL_CONFIG_DIR)

TINY_RN = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 16, "patch_size": None},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}


@pytest.fixture()
def trained():
    """A ViT-Tiny-16 whose weights differ from any fresh init (as after training)."""
    torch.manual_seed(0)
    model = create_model("ViT-Tiny-16").eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    return model


def fresh() -> CLIP:
    torch.manual_seed(123)
    return create_model("ViT-Tiny-16").eval()


def assert_same_weights(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state[key], value.to(state[key].dtype)), key


def test_plain_state_dict_round_trips_through_torch_save(trained, tmp_path):
    save_checkpoint(trained, tmp_path / "model.pt")
    assert not (tmp_path / "model.pt.partial").exists()
    model = fresh()
    load_checkpoint(model, tmp_path / "model.pt")
    assert_same_weights(model, trained.state_dict())
    assert torch.load(tmp_path / "model.pt", weights_only=True).keys() == trained.state_dict().keys()


def test_safetensors_round_trip(trained, tmp_path):
    save_checkpoint(trained, tmp_path / "model.safetensors")
    from safetensors.torch import load_file

    assert load_file(tmp_path / "model.safetensors").keys() == trained.state_dict().keys()
    model = create_model("ViT-Tiny-16", pretrained=tmp_path / "model.safetensors")
    assert_same_weights(model, trained.state_dict())


def test_open_clip_training_checkpoint_with_ddp_prefixes_loads(trained, tmp_path):
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    trained(torch.randn(2, 3, 64, 64), open_clip.tokenize(["a", "b"]))[0].sum().backward()
    optimizer.step()
    # OpenCLIP's trainer saves {epoch, name, state_dict, optimizer} with DDP's "module." prefixes.
    checkpoint = {
        "epoch": 7,
        "name": "tiny-run",
        "state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()},
        "optimizer": optimizer.state_dict(),
    }
    torch.save(checkpoint, tmp_path / "epoch_7.pt")
    model = fresh()
    load_checkpoint(model, tmp_path / "epoch_7.pt")
    assert_same_weights(model, trained.state_dict())
    raw = read_checkpoint_file(tmp_path / "epoch_7.pt")
    assert raw["epoch"] == 7 and raw["optimizer"]["state"]


def test_torch_compile_prefixes_are_stripped_on_save_and_load(trained, tmp_path):
    compiled = torch.compile(trained)  # compiles lazily; nothing runs here
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    torch.save(compiled.state_dict(), tmp_path / "compiled.pt")
    model = fresh()
    load_checkpoint(model, tmp_path / "compiled.pt")
    assert_same_weights(model, trained.state_dict())
    assert plain_state_dict(compiled).keys() == trained.state_dict().keys()


def test_openai_state_dict_with_extra_entries_loads(trained, tmp_path):
    # OpenAI's state dicts hold fp16 weights next to three hyperparameter entries.
    state = {k: v.half() if v.is_floating_point() else v for k, v in trained.state_dict().items()}
    state.update(
        input_resolution=torch.tensor(64), context_length=torch.tensor(77), vocab_size=torch.tensor(49408)
    )
    torch.save(state, tmp_path / "openai.pt")
    model = fresh()
    load_checkpoint(model, tmp_path / "openai.pt")
    assert_same_weights(model, {k: v for k, v in state.items() if k in trained.state_dict()})
    assert model.visual.conv1.weight.dtype == torch.float32


def test_torchscript_archive_loads(trained):
    # OpenAI released its weights as TorchScript archives, read through torch.jit.load's restricted unpickler.
    images, tokens = torch.randn(1, 3, 64, 64), open_clip.tokenize(["a dog"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(trained, {"encode_image": (images,), "encode_text": (tokens,)})
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    buffer.seek(0)
    model = fresh()
    load_checkpoint(model, buffer)
    assert_same_weights(model, trained.state_dict())


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"logit_scale": torch.zeros(())}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"never does .*mkdir"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match="arbitrary Python objects"):
        create_model("ViT-Tiny-16", pretrained=path)
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler runs it, which is what the refusal prevents.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_open_clip_loads_our_saved_files(trained, tmp_path):
    images, tokens = torch.randn(2, 3, 64, 64), open_clip.tokenize(["a photo of a cat.", "a red car"])
    with torch.no_grad():
        expected_image, expected_text = trained.encode_image(images), trained.encode_text(tokens)
    optimizer = torch.optim.AdamW(trained.parameters())
    save_checkpoint(trained, tmp_path / "plain.pt")
    save_checkpoint(trained, tmp_path / "plain.safetensors")
    save_checkpoint(trained, tmp_path / "epoch_3.pt", epoch=3, optimizer=optimizer, name="tiny")
    for file in ("plain.pt", "plain.safetensors", "epoch_3.pt"):
        theirs = open_clip.create_model("ViT-Tiny-16", pretrained=str(tmp_path / file)).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode_image(images), expected_image, rtol=0, atol=1e-5)
            torch.testing.assert_close(theirs.encode_text(tokens), expected_text, rtol=0, atol=1e-5)
    assert read_checkpoint_file(tmp_path / "epoch_3.pt")["epoch"] == 3


def test_save_to_a_file_object_and_read_it_back(trained):
    buffer = io.BytesIO()
    save_checkpoint(trained, buffer)
    buffer.seek(0)
    model = fresh()
    load_checkpoint(model, buffer)
    assert_same_weights(model, trained.state_dict())


def test_safetensors_refuses_training_state(trained, tmp_path):
    with pytest.raises(ValueError, match="weights only"):
        save_checkpoint(trained, tmp_path / "x.safetensors", epoch=1)


def test_wrong_architecture_error_names_keys_and_shapes(trained, tmp_path):
    save_checkpoint(trained, tmp_path / "vit_tiny.pt")
    resnet = create_model(TINY_RN)
    with pytest.raises(CheckpointError) as missing:
        load_checkpoint(resnet, tmp_path / "vit_tiny.pt")
    message = str(missing.value)
    assert "vit_tiny.pt does not fit" in message
    assert "missing keys (visual.conv1.weight" not in message  # the stem conv exists in both towers
    assert (
        "missing keys (visual.bn1.weight" in message and "unexpected keys (visual.class_embedding" in message
    )
    assert (
        "visual.conv1.weight is (128, 3, 16, 16) in the checkpoint but (8, 3, 3, 3) in the model" in message
    )
    assert message.count(".") >= 1 and "\n" not in message

    wider_patch = get_model_config("ViT-Tiny-16")
    wider_patch["vision_cfg"]["patch_size"] = 32
    with pytest.raises(
        CheckpointError, match=r"shape mismatches \(visual\.positional_embedding is \(17, 128\)"
    ):
        load_checkpoint(create_model(wider_patch), tmp_path / "vit_tiny.pt")


def test_non_strict_load_reports_incompatible_keys(trained):
    state = trained.state_dict()
    del state["logit_scale"]
    model = fresh()
    result = load_checkpoint(model, state, strict=False)
    assert result.missing_keys == ["logit_scale"] and result.unexpected_keys == []


def test_custom_text_layout_and_vector_logit_scale_load(trained):
    # OpenCLIP's CustomTextCLIP keeps the text tower under "text."; some releases store logit_scale as [1].
    text_parts = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    state = {(f"text.{k}" if k.startswith(text_parts) else k): v for k, v in trained.state_dict().items()}
    state["logit_scale"] = state["logit_scale"].reshape(1)
    model = fresh()
    load_checkpoint(model, state)
    assert_same_weights(model, trained.state_dict())


@pytest.mark.parametrize("name", ["ViT-Tiny-16", "ViT-B-32", "ViT-L-14", "RN50", "RN101"])
def test_infer_model_config_recovers_the_architecture(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        state = CLIP(**get_model_config(name)).state_dict()
    state["input_resolution"] = torch.tensor(224)  # OpenAI extras are ignored
    assert infer_model_config(state) == get_model_config(name)
    assert infer_model_config(state, quick_gelu=True)["quick_gelu"] is True


def test_inferred_config_builds_a_model_that_loads_the_weights(tmp_path):
    torch.manual_seed(0)
    model = create_model(TINY_RN)
    save_checkpoint(model, tmp_path / "rn.pt")
    state = load_state_dict(tmp_path / "rn.pt")
    assert infer_model_config(state) == TINY_RN
    rebuilt = create_model(infer_model_config(state), pretrained=tmp_path / "rn.pt")
    assert_same_weights(rebuilt, model.state_dict())


def test_non_checkpoint_files_fail_clearly(tmp_path):
    (tmp_path / "notes.pt").write_bytes(b"these are not weights at all")
    with pytest.raises(CheckpointError):
        load_state_dict(tmp_path / "notes.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_state_dict(tmp_path / "list.pt")
