"""Zero-shot classifier weights from class names and prompt templates (CLIP's prompt ensembling), plus the
ImageNet class names and OpenAI's 80 ImageNet prompt templates that ship with the package."""

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

_DATA_DIR = Path(__file__).parent / "data"


def _read_lines(name: str) -> tuple[str, ...]:
    return tuple((_DATA_DIR / name).read_text(encoding="utf-8").splitlines())


# Templates are str.format strings with a `{c}` placeholder for the class name.
IMAGENET_CLASSNAMES = _read_lines("imagenet_classnames.txt")
OPENAI_IMAGENET_TEMPLATES = _read_lines("openai_imagenet_templates.txt")


def build_zero_shot_classifier(
    model: torch.nn.Module,
    tokenizer_fn: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Return the classifier matrix [embed_dim, num_classes]: column k is the renormalised mean of the
    normalised text embeddings of class k inside every template.

    `model` is anything with `encode_text(token_ids)`; its train/eval mode is left as the caller set it.
    `batch_size` bounds the prompts per forward pass: classes are encoded in groups of
    max(1, batch_size // len(templates)), so one class's prompts always share a pass. Embeddings are
    averaged in float32 whatever the model's precision, and the result is float32.
    """
    if len(classnames) == 0 or len(templates) == 0:
        raise ValueError("build_zero_shot_classifier needs at least one class name and one template.")
    num_templates = len(templates)
    classes_per_batch = max(1, batch_size // num_templates)

    columns = []
    with torch.no_grad():
        for start in range(0, len(classnames), classes_per_batch):
            batch_classnames = classnames[start : start + classes_per_batch]
            prompts = [template.format(c=name) for name in batch_classnames for template in templates]
            text_features = model.encode_text(tokenizer_fn(prompts).to(device))
            text_features = F.normalize(text_features.float(), dim=-1)
            class_embeddings = text_features.reshape(len(batch_classnames), num_templates, -1).mean(dim=1)
            columns.append(F.normalize(class_embeddings, dim=-1))
    return torch.cat(columns, dim=0).T
