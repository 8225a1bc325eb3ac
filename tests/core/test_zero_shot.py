"""Tests for clip_core.zero_shot: shipped ImageNet metadata equals OpenCLIP's, and the prompt-ensembled
classifier equals OpenCLIP's for the same model."""

import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES as OPEN_CLIP_CLASSNAMES
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as OPEN_CLIP_TEMPLATES

from clip_core.model import create_model
from clip_core.tokenizer import tokenize
from clip_core.zero_shot import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, build_zero_shot_classifier


def test_imagenet_classnames_equal_open_clip():
    assert isinstance(IMAGENET_CLASSNAMES, tuple)
    assert len(IMAGENET_CLASSNAMES) == 1000
    assert list(IMAGENET_CLASSNAMES) == list(OPEN_CLIP_CLASSNAMES)


@pytest.mark.parametrize("classname", ["tench", "jack-o'-lantern", "Granny Smith", "toilet paper"])
def test_openai_templates_render_like_open_clip_lambdas(classname):
    assert isinstance(OPENAI_IMAGENET_TEMPLATES, tuple)
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80
    rendered = [template.format(c=classname) for template in OPENAI_IMAGENET_TEMPLATES]
    assert rendered == [template(classname) for template in OPEN_CLIP_TEMPLATES]


@pytest.fixture(scope="module")
def tiny_open_clip_model() -> CLIP:
    torch.manual_seed(0)
    model = CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    )
    return model.eval()


def test_classifier_equals_open_clip_for_the_same_model(tiny_open_clip_model):
    classnames = IMAGENET_CLASSNAMES[:23]
    # 400 prompts per pass = 5 classes per pass, so the last pass is ragged (3 classes).
    ours = build_zero_shot_classifier(
        tiny_open_clip_model, open_clip.tokenize, classnames, OPENAI_IMAGENET_TEMPLATES, batch_size=400
    )
    reference = open_clip.build_zero_shot_classifier(
        tiny_open_clip_model, open_clip.tokenize, classnames, OPEN_CLIP_TEMPLATES, num_classes_per_batch=7
    )
    assert ours.shape == (16, 23)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_classifier_does_not_depend_on_batch_size(tiny_open_clip_model):
    classnames = IMAGENET_CLASSNAMES[100:109]
    templates = OPENAI_IMAGENET_TEMPLATES[:6]
    one_class_per_pass = build_zero_shot_classifier(
        tiny_open_clip_model, open_clip.tokenize, classnames, templates, batch_size=1
    )
    all_in_one_pass = build_zero_shot_classifier(
        tiny_open_clip_model, open_clip.tokenize, classnames, templates, batch_size=10_000
    )
    torch.testing.assert_close(one_class_per_pass, all_in_one_pass, rtol=0, atol=1e-6)
    torch.testing.assert_close(all_in_one_pass.norm(dim=0), torch.ones(9))


def test_classifier_with_clip_core_model_and_tokenizer_equals_open_clip():
    torch.manual_seed(0)
    model = create_model("ViT-Tiny-16").eval()
    classnames = IMAGENET_CLASSNAMES[500:505]
    ours = build_zero_shot_classifier(model, tokenize, classnames, OPENAI_IMAGENET_TEMPLATES, batch_size=160)
    reference = open_clip.build_zero_shot_classifier(
        model, open_clip.tokenize, classnames, OPEN_CLIP_TEMPLATES
    )
    assert ours.shape == (64, 5)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


class BagOfCharsTextEncoder(nn.Module):
    """A text encoder that is not a CLIP model: the builder must only rely on encode_text."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.embedding = nn.Embedding(256, 5, padding_idx=0)  # padding adds nothing to the sum

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(token_ids).sum(dim=1)


def encode_chars(texts: list[str]) -> torch.Tensor:
    width = max(len(text) for text in texts)
    return torch.tensor([[ord(ch) % 256 for ch in text.ljust(width, "\0")] for text in texts])


def test_classifier_averages_normalised_prompt_embeddings_then_renormalises():
    model = BagOfCharsTextEncoder()
    classnames = ["cat", "dog", "axolotl"]
    templates = ["a photo of a {c}.", "{c}", "a drawing of the {c}, small."]
    got = build_zero_shot_classifier(model, encode_chars, classnames, templates, batch_size=4)
    expected = []
    with torch.no_grad():
        for name in classnames:
            per_template = [
                F.normalize(model.encode_text(encode_chars([t.format(c=name)]))[0], dim=0) for t in templates
            ]
            expected.append(F.normalize(torch.stack(per_template).mean(dim=0), dim=0))
    torch.testing.assert_close(got, torch.stack(expected, dim=1), rtol=0, atol=1e-6)
    assert not got.requires_grad


def test_classifier_rejects_empty_inputs():
    model = BagOfCharsTextEncoder()
    with pytest.raises(ValueError):
        build_zero_shot_classifier(model, encode_chars, [], ["{c}"])
    with pytest.raises(ValueError):
        build_zero_shot_classifier(model, encode_chars, ["cat"], [])
