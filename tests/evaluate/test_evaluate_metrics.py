"""The evaluation's metric definitions on inputs whose answers are known by hand (retrieval recall@k,
top-k accuracy, mean per-class recall, confusion matrix), cross-checked with scikit-learn where it has the
same metric, and the linear probe on separable features."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from pipelines.evaluate import metrics


def test_retrieval_recall_at_k_on_crafted_captions_is_exactly_the_hand_count():
    images = torch.eye(3)  # image i is the unit vector e_i
    e0, e1, e2 = images
    captions = F.normalize(torch.stack([e0, 0.2 * e0 + e1, e1 + 0.1 * e2, e0 + 0.05 * e2]), dim=-1)
    owners = [0, 0, 1, 2]  # image 0 has two captions
    result = metrics.retrieval_metrics(images, captions, owners, ks=(1, 2))
    # Captions -> images: captions 1 and 3 rank another image first, their own second.
    assert result["image_retrieval_recall@1"] == 0.5
    assert result["image_retrieval_recall@2"] == 1.0
    # Images -> captions: image 2's best caption is image 1's (0.0995 > 0.0499), its own comes second.
    assert result["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert result["text_retrieval_recall@2"] == 1.0


def test_retrieval_with_k_beyond_the_set_size_counts_every_item_as_retrieved():
    images = torch.eye(2)
    result = metrics.retrieval_metrics(images, images.flip(0), [0, 1], ks=(10,))
    assert result == {"image_retrieval_recall@10": 1.0, "text_retrieval_recall@10": 1.0}


def test_classification_metrics_match_the_hand_count_and_scikit_learn():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 5, 5])
    logits = torch.full((8, 6), -1.0)
    predicted = [0, 0, 1, 1, 2, 2, 5, 0]
    second = [1, 1, 0, 2, 1, 0, 0, 5]
    for i, (p, s) in enumerate(zip(predicted, second)):
        logits[i, p], logits[i, s] = 2.0, 1.0
    result = metrics.classification_metrics(logits, labels)
    assert result["acc1"] == pytest.approx(5 / 8)
    assert result["acc5"] == 1.0
    # Classes 3 and 4 have no samples: they are left out of the mean, as in balanced accuracy.
    assert result["mean_per_class_recall"] == pytest.approx((2 / 3 + 1 / 2 + 1 + 1 / 2) / 4)
    assert result["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert math.isnan(result["per_class_recall"][3]) and result["support"] == [3, 2, 1, 0, 0, 2]
    assert result["confusion"].tolist() == sk_confusion_matrix(labels, predicted, labels=range(6)).tolist()


def test_top5_accuracy_is_undefined_below_five_classes_as_in_clip_benchmark():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.2], [0.8, 0.1, 0.0, 0.3]])
    result = metrics.classification_metrics(logits, torch.tensor([1, 3]))
    assert result["acc1"] == 0.5 and math.isnan(result["acc5"])


def test_linear_probe_separates_separable_classes_and_reports_few_shot_accuracy():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=generator) * 4
    train_y = torch.arange(4).repeat_interleave(30)
    test_y = torch.arange(4).repeat_interleave(10)
    train_x = centres[train_y] + torch.randn(len(train_y), 16, generator=generator)
    test_x = centres[test_y] + torch.randn(len(test_y), 16, generator=generator)
    result = metrics.linear_probe_metrics(train_x, train_y, test_x, test_y, 4, shots=(1, 4), seeds=2)
    assert result["acc1"] == 1.0
    assert set(result) == {"acc1", "acc5", "mean_per_class_recall", "1shot_acc1", "4shot_acc1"}
    assert result["4shot_acc1"] >= 0.9
    # Chance is 0.25: even one example per class of these clusters beats it clearly.
    assert result["1shot_acc1"] > 0.5


def test_few_shot_draws_k_examples_of_every_class_reproducibly():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    chosen = metrics.few_shot_indices(labels, 4, seed=1)
    assert torch.bincount(labels[chosen]).tolist() == [4, 3, 4]
    assert torch.equal(chosen, metrics.few_shot_indices(labels, 4, seed=1))
    assert not torch.equal(chosen, metrics.few_shot_indices(labels, 4, seed=2))
