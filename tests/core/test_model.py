"""Tests for clip_core.model: OpenCLIP parity for every shipped architecture, the forward API, gradient
checkpointing, fp32 LayerNorm under bf16 autocast, and towers that torch.compile traces without graph breaks."""

import gc
import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clip_core.model import (
    MODEL_CONFIG_DIR,
    add_model_config,
    create_model,
    get_model_config,
    list_models,
)
from clip_core.transformer import LayerNorm, VisionTransformer
from tests.gradients import assert_gradients_close

torch.set_num_threads(2)

REQUIRED = ["RN50", "RN101", "ViT-B-32", "ViT-B-16", "ViT-L-14"]
OPENCLIP_NAMED = REQUIRED + [f"{name}-quickgelu" for name in REQUIRED]
ALL_CONFIGS = OPENCLIP_NAMED + ["ViT-Tiny-16"]
# The parity tests build each architecture twice; beyond one ResNet and one ViT that is minutes of CPU, so the
# rest run in `make test` only (marked slow).
QUICK_CONFIGS = {"RN50", "ViT-B-32", "ViT-Tiny-16"}
OPENCLIP_CONFIG_DIR = Path(open_clip.__file__).parent / "model_configs"
CAPTIONS = ["a photo of a dog.", "a diagram of a transformer block with two layer norms"]
# A ModifiedResNet small enough for CPU tests: one block per stage, 16-channel stem.
TINY_RN = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}

# OpenCLIP learns our architectures (ViT-Tiny-16, and identical copies of its own) from our directory.
open_clip.add_model_config(MODEL_CONFIG_DIR)


def image_size(model) -> int:
    size = model.visual.image_size
    return size if isinstance(size, int) else size[0]


def perturb_(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every weight and buffer off its init (zeroed bn3 gains, unit BN statistics, zero biases), so that
    parity checks exercise every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5, generator=g)
            else:
                tensor.add_(0.02 * torch.randn(tensor.shape, generator=g))


def test_registry_lists_every_required_architecture():
    assert set(ALL_CONFIGS) <= set(list_models())


@pytest.mark.parametrize("name", OPENCLIP_NAMED)
def test_shipped_configs_equal_open_clip_builtin_configs(name):
    ours = json.loads((MODEL_CONFIG_DIR / f"{name}.json").read_text())
    theirs = json.loads((OPENCLIP_CONFIG_DIR / f"{name}.json").read_text())
    assert ours == theirs


def test_open_clip_accepts_our_tiny_config():
    assert "ViT-Tiny-16" in open_clip.list_models()
    assert open_clip.get_model_config("ViT-Tiny-16") == get_model_config("ViT-Tiny-16")


@pytest.fixture(
    scope="module",
    params=[
        name if name in QUICK_CONFIGS else pytest.param(name, marks=pytest.mark.slow) for name in ALL_CONFIGS
    ],
)
def model_pair(request):
    """(name, ours, OpenCLIP's) for one architecture, OpenCLIP's weights perturbed, both in eval mode."""
    name = request.param
    torch.manual_seed(0)
    theirs = open_clip.create_model(name).eval()
    perturb_(theirs)
    ours = create_model(name).eval()
    yield name, ours, theirs
    del ours, theirs
    gc.collect()


def test_state_dict_keys_shapes_and_buffers_match_open_clip(model_pair):
    _, ours, theirs = model_pair
    our_state, their_state = ours.state_dict(), theirs.state_dict()
    assert list(our_state) == list(their_state)
    assert {k: v.shape for k, v in our_state.items()} == {k: v.shape for k, v in their_state.items()}
    assert {k: v.dtype for k, v in our_state.items()} == {k: v.dtype for k, v in their_state.items()}
    # Non-persistent buffers (the text causal mask) exist in both and stay out of both state dicts.
    our_buffers, their_buffers = dict(ours.named_buffers()), dict(theirs.named_buffers())
    assert set(our_buffers) == set(their_buffers)
    assert set(our_buffers) - set(our_state) == set(their_buffers) - set(their_state) == {"attn_mask"}


def test_state_dict_loads_both_ways_strict(model_pair):
    _, ours, theirs = model_pair
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    with torch.no_grad():
        ours.logit_scale.add_(0.5)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(theirs.logit_scale, ours.logit_scale)


def test_features_match_open_clip(model_pair):
    name, ours, theirs = model_pair
    ours.load_state_dict(theirs.state_dict(), strict=True)
    torch.manual_seed(1)
    size = image_size(theirs)
    images = torch.randn(2, 3, size, size)
    tokens = open_clip.tokenize(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), theirs.encode_image(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.encode_text(tokens), theirs.encode_text(tokens), rtol=0, atol=1e-5)
        ours_out, theirs_out = ours(images, tokens), theirs(images, tokens)
    for ours_tensor, theirs_tensor in zip(ours_out, theirs_out, strict=True):
        torch.testing.assert_close(ours_tensor, theirs_tensor, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("ViT-Tiny-16").eval()


def test_forward_returns_normalised_features_and_exp_logit_scale(tiny):
    images, tokens = torch.randn(2, 3, 64, 64), open_clip.tokenize(CAPTIONS)
    with torch.no_grad():
        image_features, text_features, logit_scale = tiny(images, tokens)
        torch.testing.assert_close(image_features, F.normalize(tiny.encode_image(images), dim=-1))
        torch.testing.assert_close(text_features, tiny.encode_text(tokens, normalize=True))
        assert image_features.shape == text_features.shape == (2, 64)
        torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(2))
        torch.testing.assert_close(logit_scale, torch.tensor(1 / 0.07))

        out = tiny(images, None, output_dict=True)
        assert set(out) == {"image_features", "text_features", "logit_scale"}
        assert out["text_features"] is None
        torch.testing.assert_close(out["image_features"], image_features)
        image_only, text_only, _ = tiny(None, tokens)
        assert image_only is None
        torch.testing.assert_close(text_only, text_features)


def test_output_dict_set_at_creation_is_the_default():
    model = create_model("ViT-Tiny-16", output_dict=True).eval()
    with torch.no_grad():
        assert isinstance(model(None, open_clip.tokenize(CAPTIONS)), dict)
        assert isinstance(model(None, open_clip.tokenize(CAPTIONS), output_dict=False), tuple)


def test_text_features_ignore_tokens_after_end_of_text(tiny):
    # The causal mask hides the padding after end-of-text, so cutting it off changes nothing; shorter token
    # rows are accepted. With a bidirectional mask the features would change.
    tokens = open_clip.tokenize(CAPTIONS)
    assert tokens.argmax(dim=-1).max() < 20
    with torch.no_grad():
        full = tiny.encode_text(tokens)
        torch.testing.assert_close(tiny.encode_text(tokens[:, :20]), full, rtol=0, atol=1e-5)
        tokens[:, 30] = 1000  # a token after end-of-text, lower than its id so the read-out stays put
        torch.testing.assert_close(tiny.encode_text(tokens), full, rtol=0, atol=1e-5)


def test_grad_checkpointing_saves_fewer_activations_and_keeps_gradients():
    torch.manual_seed(0)
    model = create_model("ViT-Tiny-16").train()
    images, tokens = torch.randn(2, 3, 64, 64), open_clip.tokenize(CAPTIONS)

    def gradients_and_saved_tensors():
        saved = []

        def pack(tensor):
            saved.append(tensor.numel())
            return tensor

        model.zero_grad(set_to_none=True)
        # Checkpointed blocks keep their own inputs only, so the autograd graph saves fewer tensors.
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            image_features, text_features, logit_scale = model(images, tokens)
            logits = logit_scale * image_features @ text_features.T
            labels = torch.arange(2)
            loss = F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}, sum(saved)

    plain, plain_saved = gradients_and_saved_tensors()
    model.set_grad_checkpointing(True)
    checkpointed, checkpointed_saved = gradients_and_saved_tensors()
    assert checkpointed_saved < plain_saved / 2
    assert_gradients_close(checkpointed, plain, rel=1e-5)


def test_layer_norm_computes_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    norm = LayerNorm(256)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
        norm.bias.normal_(0.0, 0.1)
    # A large mean with small variations, the case where bf16 statistics go wrong.
    x = (300.0 + 4.0 * torch.randn(8, 256)).bfloat16()
    reference = F.layer_norm(x.float(), (256,), norm.weight, norm.bias, norm.eps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_low = norm(x)
        out_fp32 = norm(x.float())
    assert out_low.dtype == torch.bfloat16 and out_fp32.dtype == torch.float32
    assert torch.equal(out_low, reference.bfloat16())  # fp32 math, one rounding at the end
    torch.testing.assert_close(out_fp32, reference, rtol=0, atol=1e-6)
    # The plain bf16 computation differs, so the assertion above can tell the two apart.
    naive = F.layer_norm(x, (256,), norm.weight.bfloat16(), norm.bias.bfloat16(), norm.eps)
    assert not torch.equal(naive, reference.bfloat16())


def test_every_norm_in_the_towers_is_the_fp32_layer_norm(tiny):
    norms = [m for m in tiny.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 2 + 2 * 2 + 1  # vision blocks, ln_pre/ln_post, text blocks, ln_final
    assert all(type(m) is LayerNorm for m in norms)


def test_bf16_autocast_forward_stays_close_to_fp32(tiny):
    images, tokens = torch.randn(2, 3, 64, 64), open_clip.tokenize(CAPTIONS)
    with torch.no_grad():
        image_ref, text_ref, _ = tiny(images, tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            image_low, text_low, _ = tiny(images, tokens)
    assert image_low.dtype == text_low.dtype == torch.bfloat16
    assert F.cosine_similarity(image_low.float(), image_ref).min() > 0.99
    assert F.cosine_similarity(text_low.float(), text_ref).min() > 0.99


def test_bf16_precision_converts_the_same_tensors_as_open_clip():
    ours = create_model("ViT-Tiny-16", precision="bf16").eval()
    theirs = open_clip.create_model("ViT-Tiny-16", precision="bf16")
    assert {k: v.dtype for k, v in ours.state_dict().items()} == {
        k: v.dtype for k, v in theirs.state_dict().items()
    }
    assert ours.visual.conv1.weight.dtype == torch.bfloat16 and ours.ln_final.weight.dtype == torch.float32
    with torch.no_grad():
        image_features, text_features, _ = ours(torch.randn(2, 3, 64, 64), open_clip.tokenize(CAPTIONS))
    assert image_features.dtype == text_features.dtype == torch.bfloat16
    assert torch.isfinite(image_features).all() and torch.isfinite(text_features).all()


def test_pure_bf16_precision_casts_everything():
    model = create_model("ViT-Tiny-16", precision="pure_bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("config", ["ViT-Tiny-16", TINY_RN], ids=["ViT-Tiny-16", "tiny-ModifiedResNet"])
def test_towers_trace_without_graph_breaks(config):
    torch._dynamo.reset()
    model = create_model(config).eval()
    images, tokens = torch.randn(2, 3, 64, 64), open_clip.tokenize(CAPTIONS)
    image_explain = torch._dynamo.explain(model.encode_image)(images)
    text_explain = torch._dynamo.explain(model.encode_text)(tokens)
    assert image_explain.graph_count == text_explain.graph_count == 1
    assert image_explain.graph_break_count == 0, image_explain.break_reasons
    assert text_explain.graph_break_count == 0, text_explain.break_reasons
    torch._dynamo.reset()


def test_tiny_resnet_matches_open_clip_from_a_config_file(tmp_path):
    # Adding an architecture is a JSON file, for both libraries.
    (tmp_path / "RN-Tiny-test.json").write_text(json.dumps(TINY_RN))
    assert add_model_config(tmp_path / "RN-Tiny-test.json") == ["RN-Tiny-test"]
    open_clip.add_model_config(tmp_path / "RN-Tiny-test.json")
    theirs = open_clip.create_model("RN-Tiny-test").eval()
    perturb_(theirs)
    ours = create_model("RN-Tiny-test").eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), theirs.encode_image(images), rtol=0, atol=1e-5)


def test_add_model_config_from_dict_and_directory(tmp_path):
    cfg = get_model_config("ViT-Tiny-16")
    cfg["vision_cfg"]["layers"] = 1
    assert add_model_config(cfg, name="ViT-Tiny-16-one-layer") == ["ViT-Tiny-16-one-layer"]
    assert len(create_model("ViT-Tiny-16-one-layer").visual.transformer.resblocks) == 1

    (tmp_path / "Tiny-A.json").write_text(json.dumps(cfg))
    (tmp_path / "not-a-model.json").write_text(json.dumps({"mean": [0.5, 0.5, 0.5]}))
    assert add_model_config(tmp_path) == ["Tiny-A"]
    assert "Tiny-A" in list_models() and "not-a-model" not in list_models()


def test_get_model_config_returns_a_copy():
    get_model_config("ViT-Tiny-16")["embed_dim"] = 1
    assert get_model_config("ViT-Tiny-16")["embed_dim"] == 64


def test_unsupported_config_keys_and_unknown_names_fail_clearly():
    cfg = get_model_config("ViT-Tiny-16")
    cfg["vision_cfg"]["timm_model_name"] = "vit_base_patch16_224"
    with pytest.raises(ValueError, match="timm_model_name"):
        add_model_config(cfg, name="with-timm")
    with pytest.raises(KeyError, match="unknown model 'ViT-Nope'"):
        create_model("ViT-Nope")
    with pytest.raises(ValueError, match="precision"):
        create_model("ViT-Tiny-16", precision="fp8")
    with pytest.raises(FileNotFoundError, match="local paths only"):
        create_model("ViT-Tiny-16", pretrained="openai")


def test_quick_gelu_configs_use_quick_gelu():
    quick = create_model({**get_model_config("ViT-Tiny-16"), "quick_gelu": True})
    plain = create_model("ViT-Tiny-16")
    assert type(quick.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert isinstance(plain.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    forced = create_model("ViT-Tiny-16", force_quick_gelu=True)
    assert type(forced.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_patch_dropout_keeps_class_token_and_a_fraction_of_patches():
    torch.manual_seed(0)
    model = create_model("ViT-Tiny-16", force_patch_dropout=0.5)
    visual: VisionTransformer = model.visual
    tokens = torch.randn(2, 17, 128)
    kept = visual._drop_patches(tokens)
    assert kept.shape == (2, 1 + 8, 128)
    assert torch.equal(kept[:, 0], tokens[:, 0])
    for row in range(2):
        patch_rows = {tuple(t.tolist()) for t in tokens[row, 1:]}
        kept_rows = [tuple(t.tolist()) for t in kept[row, 1:]]
        assert len(set(kept_rows)) == 8 and set(kept_rows) <= patch_rows
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.eval()
        eval_features = model.encode_image(images)
        model.visual.patch_dropout = 0.0
        torch.testing.assert_close(model.encode_image(images), eval_features)  # no dropout at eval


def test_logit_bias_config_matches_open_clip_and_is_returned():
    # SigLIP-style configs add a learned logit bias next to the scale.
    cfg = {**get_model_config("ViT-Tiny-16"), "init_logit_bias": -10.0}
    ours = create_model(cfg).eval()
    theirs = open_clip.model.CLIP(**cfg).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        out = ours(None, open_clip.tokenize(CAPTIONS))
        assert len(out) == 4 and out[3].item() == -10.0
        assert ours(None, open_clip.tokenize(CAPTIONS), output_dict=True)["logit_bias"].item() == -10.0
