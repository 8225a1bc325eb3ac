"""MLflow for evaluations: one run per evaluated checkpoint (tags link it to the checkpoint and the training
run it is nested under), metrics per dataset and task, the per-class table, the confusion matrix and a grid
of example predictions as figures, the suite config; the same metrics go into the training run at its step.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import torch  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from PIL import Image  # noqa: E402

KIND_TAG = "clip_ray.kind"


def start_eval_run(
    experiment: str,
    checkpoint_uri: str,
    model: str,
    parent_run_id: str | None,
    step: int | None,
    suite_yaml: str,
) -> str:
    """Create the evaluation run and return its id. With a training run it goes into that run's experiment:
    MLflow shows a run nested only under a parent of the same experiment."""
    client = MlflowClient()
    experiment_id = None
    if parent_run_id:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
    else:
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    tags = {KIND_TAG: "eval", "checkpoint_uri": checkpoint_uri, "model": model}
    if parent_run_id:
        tags |= {"training_run_id": parent_run_id, "mlflow.parentRunId": parent_run_id}
    if step is not None:
        tags["step"] = str(step)
    name = f"eval step {step}" if step is not None else "eval"
    run = client.create_run(experiment_id, tags=tags, run_name=name)
    client.log_param(run.info.run_id, "model", model)
    client.log_text(run.info.run_id, suite_yaml, "suite.yaml")
    return run.info.run_id


def mlflow_metric_name(name: str) -> str:
    """MLflow refuses '@' in metric names: `zeroshot/coco/image_retrieval_recall@5` is logged as
    `zeroshot/coco/image_retrieval_recall_at_5` (results JSON and return values keep the '@' form)."""
    return name.replace("@", "_at_")


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """Log the finite values (acc5 of a set with fewer than 5 classes is NaN and stays out)."""
    finite = {
        mlflow_metric_name(k): float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)
    }
    if finite:
        mlflow_metrics = [
            mlflow.entities.Metric(k, v, int(mlflow.utils.time.get_current_time_millis()), step or 0)
            for k, v in finite.items()
        ]
        MlflowClient().log_batch(run_id, metrics=mlflow_metrics)


def end_run(run_id: str, ok: bool) -> None:
    MlflowClient().set_terminated(run_id, "FINISHED" if ok else "FAILED")


def log_classification_artifacts(
    run_id: str,
    dataset: str,
    classnames: list[str],
    result: dict,
    examples: list[tuple[Image.Image, int, int]],
) -> None:
    """Per-class table, confusion-matrix figure and example-prediction grid under `zeroshot/<dataset>/`."""
    client = MlflowClient()
    confusion: torch.Tensor = result["confusion"]
    table = {
        "class": list(classnames),
        "recall": [None if math.isnan(r) else r for r in result["per_class_recall"]],
        "support": result["support"],
        "predicted": confusion.sum(dim=0).tolist(),
    }
    client.log_table(run_id, table, f"zeroshot/{dataset}/per_class.json")
    figure = confusion_figure(confusion, classnames, dataset)
    client.log_figure(run_id, figure, f"zeroshot/{dataset}/confusion_matrix.png")
    plt.close(figure)
    if examples:
        figure = examples_figure(examples, classnames, dataset)
        client.log_figure(run_id, figure, f"zeroshot/{dataset}/examples.png")
        plt.close(figure)


def confusion_figure(confusion: torch.Tensor, classnames: list[str], dataset: str):
    """Row-normalised confusion matrix; counts printed when the matrix is small enough to read them."""
    n = len(classnames)
    rows = confusion.double() / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    size = min(4 + 0.35 * n, 30)
    figure, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), classnames, rotation=90)
        ax.set_yticks(range(n), classnames)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                count = int(confusion[i, j])
                if count:
                    color = "white" if rows[i, j] > 0.5 else "black"
                    ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{dataset}: zero-shot confusion matrix")
    figure.tight_layout()
    return figure


def examples_figure(examples: list[tuple[Image.Image, int, int]], classnames: list[str], dataset: str):
    """Images with their predicted class (green when right, red when wrong) and, when wrong, the truth."""
    columns = min(8, len(examples))
    rows = math.ceil(len(examples) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, predicted, truth) in zip(axes.flat, examples):
        ax.imshow(image)
        right = predicted == truth
        title = classnames[predicted] if right else f"{classnames[predicted]}\n(true: {classnames[truth]})"
        ax.set_title(title, fontsize=8, color="green" if right else "red")
    figure.suptitle(f"{dataset}: zero-shot predictions")
    figure.tight_layout()
    return figure
