"""The numbers of an evaluation, from features: zero-shot classification (acc1, acc5, mean per-class recall,
per-class recall, confusion matrix), image-text retrieval recall@k, and linear probes (full and few-shot)
fitted by multinomial logistic regression on frozen image features. Definitions follow CLIP_benchmark's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of samples whose label is among the k highest logits."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(dim=1).float().mean())


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[true class, predicted class] -> count."""
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """acc1, acc5 (NaN with fewer than 5 classes, as CLIP_benchmark), mean_per_class_recall (over the classes
    that have samples), plus `per_class_recall` (NaN for a class without samples) and `confusion`."""
    num_classes = logits.shape[1]
    predictions = logits.argmax(dim=1)
    confusion = confusion_matrix(predictions, labels, num_classes)
    support = confusion.sum(dim=1)
    per_class = torch.where(
        support > 0, confusion.diag().double() / support.clamp(min=1).double(), torch.tensor(math.nan)
    )
    present = per_class[support > 0]
    return {
        "acc1": topk_accuracy(logits, labels, 1),
        "acc5": topk_accuracy(logits, labels, 5) if num_classes >= 5 else math.nan,
        "mean_per_class_recall": float(present.mean()),
        "per_class_recall": per_class.tolist(),
        "support": support.tolist(),
        "confusion": confusion,
        "predictions": predictions,
    }


def zero_shot_logits(image_embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Cosine similarities scaled by 100, as CLIP reports them (the scale changes no metric)."""
    return 100.0 * image_embeddings.float() @ classifier.float()


def retrieval_metrics(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    text_image_index: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """image_retrieval_recall@k: share of captions whose image is among the k images most similar to it.
    text_retrieval_recall@k: share of images with at least one of their captions among the k captions most
    similar to them. Embeddings are L2-normalised; an image may have several captions."""
    owner = torch.as_tensor(list(text_image_index), dtype=torch.long)
    scores = text_embeddings.float() @ image_embeddings.float().T  # [texts, images]
    metrics = {}
    for k in ks:
        top_images = scores.topk(min(k, scores.shape[1]), dim=1).indices
        metrics[f"image_retrieval_recall@{k}"] = float(
            (top_images == owner[:, None]).any(dim=1).float().mean()
        )
        top_texts = scores.T.topk(min(k, scores.shape[0]), dim=1).indices  # [images, k] caption indices
        hits = owner[top_texts] == torch.arange(scores.shape[1])[:, None]
        metrics[f"text_retrieval_recall@{k}"] = float(hits.any(dim=1).float().mean())
    return metrics


# ---------------------------------------------------------------------------------------------------------
# Linear probe


def fit_logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = 1e-3, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (weights [D, C], bias [C]) by L-BFGS on mean cross-entropy plus
    l2 * |W|^2, on standardised features as is usual for linear probes."""
    x = features.double()
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    l2: float = 1e-3,
    max_iter: int = 200,
) -> dict[str, float]:
    mean, std = train_x.mean(dim=0), train_x.std(dim=0).clamp(min=1e-6) if len(train_x) > 1 else 1.0
    weight, bias = fit_logistic_regression((train_x - mean) / std, train_y, num_classes, l2, max_iter)
    logits = ((test_x.double() - mean) / std) @ weight + bias
    result = classification_metrics(logits, test_y)
    return {k: result[k] for k in ("acc1", "acc5", "mean_per_class_recall")}


def few_shot_indices(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """`shots` random samples of every class (all of them when a class has fewer)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(chosen).sort().values


def linear_probe_metrics(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    full: bool = True,
    seeds: int = 3,
    l2: float = 1e-3,
    max_iter: int = 200,
) -> dict[str, float]:
    """acc1/acc5/mean_per_class_recall of the full probe, and `{k}shot_acc1` averaged over `seeds` draws."""
    metrics: dict[str, float] = {}
    if full:
        metrics.update(linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes, l2, max_iter))
    for k in shots:
        accs = []
        for seed in range(seeds):
            idx = few_shot_indices(train_y, k, seed)
            accs.append(
                linear_probe_accuracy(train_x[idx], train_y[idx], test_x, test_y, num_classes, l2, max_iter)[
                    "acc1"
                ]
            )
        metrics[f"{k}shot_acc1"] = sum(accs) / len(accs)
    return metrics
