"""The evaluation job: load a checkpoint, run every dataset and task of a suite (image features on Ray Data,
text features and metrics in the driver), log to MLflow, write the results JSON and return the metrics. `run`
is the entry point the CLI, the scheduled evaluation and tests share.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

import clip_core
from pipelines import storage
from pipelines.entrypoint import JobError
from pipelines.evaluate import metrics as metric_fns
from pipelines.evaluate import tracking
from pipelines.evaluate.config import DatasetConfig, EvaluateConfig, SuiteConfig
from pipelines.evaluate.datasets import DatasetError, EvalSet, open_dataset, read_item
from pipelines.evaluate.features import Features, extract_features
from pipelines.formats import checkpoints
from pipelines.tracking import use_tracking_server

TEXT_BATCH = 256


class EvaluationError(JobError, ValueError):
    """An evaluation that cannot run; the message is one sentence saying what to fix."""


# ---------------------------------------------------------------------------------------------------------
# Checkpoint


def resolve_checkpoint(checkpoint_uri: str) -> tuple[str, dict | None]:
    """(URI of the weights file, the training checkpoint's checkpoint.json or None for a plain file)."""
    try:
        return checkpoints.open_weights(checkpoint_uri)
    except FileNotFoundError as error:
        raise EvaluationError(str(error)) from None


def load_model(model_name: str, weights_uri: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The named architecture with the checkpoint's weights (OpenCLIP, training or OpenAI format)."""
    if model_name not in clip_core.list_models():
        raise EvaluationError(
            f"unknown model {model_name!r}; use one of {', '.join(clip_core.list_models())}."
        )
    try:
        state_dict = clip_core.load_state_dict(io.BytesIO(storage.read_bytes(weights_uri)))
        model = clip_core.create_model(model_name)
        clip_core.load_checkpoint(model, state_dict)
    except clip_core.CheckpointError as error:
        reason = str(error).split(";")[0]
        raise EvaluationError(
            f"checkpoint {weights_uri} does not match model {model_name} ({reason}); pass the --model the "
            "checkpoint was trained with."
        ) from None
    model.eval()
    return model, model.state_dict()


# ---------------------------------------------------------------------------------------------------------
# Text side (small: computed in the driver)


@torch.no_grad()
def encode_texts(model: torch.nn.Module, texts: list[str]) -> torch.Tensor:
    chunks = [
        F.normalize(model.encode_text(clip_core.tokenize(texts[i : i + TEXT_BATCH])).float(), dim=-1)
        for i in range(0, len(texts), TEXT_BATCH)
    ]
    return torch.cat(chunks)


# ---------------------------------------------------------------------------------------------------------
# Tasks


def _check_classification_set(eval_set: EvalSet, features: Features) -> None:
    name = eval_set.name
    if not eval_set.classnames:
        raise DatasetError(
            f"dataset {name} has no class names; add {name}'s classnames.txt or set classnames in the suite."
        )
    if not eval_set.templates:
        raise DatasetError(
            f"dataset {name} has no prompt templates; add zeroshot_classification_templates.txt or set "
            "templates in the suite."
        )
    if len(features.keys) == 0:
        raise DatasetError(f"dataset {name} at {eval_set.uri} has no images; check the URI and split.")
    if int(features.labels.min()) < 0:
        raise DatasetError(
            f"dataset {name} has samples without a class label (cls); it cannot be classified."
        )
    top = int(features.labels.max())
    if top >= len(eval_set.classnames):
        raise DatasetError(
            f"the class names of dataset {name} do not match its shards: labels go up to {top} but "
            f"{len(eval_set.classnames)} class names are given; give one name per class."
        )


def _example_images(eval_set: EvalSet, features: Features, count: int) -> list[tuple[int, Image.Image]]:
    """(feature index, thumbnail) of up to `count` samples spread over the set, reading as little as possible:
    single files directly, tar samples from the first shard only."""
    if count == 0:
        return []
    index_of = {k: i for i, k in enumerate(features.keys)}
    if eval_set.format == "image_folder":
        step = max(1, len(features.keys) // count)
        chosen = list(range(0, len(features.keys), step))[:count]
        images = [(i, storage.read_bytes(features.keys[i])) for i in chosen]
    else:
        samples = [
            s for s in read_item(eval_set.items[0], eval_set.captions_in_lines) if s["key"] in index_of
        ]
        step = max(1, len(samples) // count)
        images = [(index_of[s["key"]], s["image"]) for s in samples[::step][:count]]
    thumbnails = []
    for i, data in images:
        with Image.open(io.BytesIO(data)) as image:
            image.thumbnail((160, 160))
            thumbnails.append((i, image.convert("RGB")))
    return thumbnails


class Evaluator:
    """Runs a suite's datasets and tasks for one loaded model, caching image features per split."""

    def __init__(self, model: torch.nn.Module, model_name: str, state_dict: dict, suite: SuiteConfig):
        self.model, self.model_name, self.state_dict, self.suite = model, model_name, state_dict, suite
        self.image_size = clip_core.get_model_config(model_name)["vision_cfg"]["image_size"]
        self._features: dict[tuple[str, bool], tuple[EvalSet, Features]] = {}

    def extract(self) -> None:
        """Open every split the suite needs (so bad input stops before any work), then compute all their image
        features in one Ray Data job."""
        needed = []
        for cfg in self.suite.datasets:
            needed.append((cfg, False))
            if "linear_probe" in cfg.tasks:
                needed.append((cfg, True))
        eval_sets = [open_dataset(cfg, train=train) for cfg, train in needed]
        started = time.time()
        features = extract_features(
            eval_sets,
            self.model_name,
            self.state_dict,
            self.image_size,
            batch_size=self.suite.batch_size,
            workers=self.suite.workers,
            use_gpu=self.suite.use_gpu,
            reduced_decode=self.suite.reduced_decode,
        )
        seconds = time.time() - started
        total = sum(len(f.keys) for f in features)
        for (cfg, train), eval_set, found in zip(needed, eval_sets, features):
            self._features[(cfg.name, train)] = (eval_set, found)
            print(f"[evaluate] {cfg.name}{' (train)' if train else ''}: {len(found.keys)} images", flush=True)
        print(f"[evaluate] image features: {total} images in {seconds:.1f}s ({total / seconds:.1f} images/s)")

    def features(self, cfg: DatasetConfig, train: bool = False) -> tuple[EvalSet, Features]:
        if (cfg.name, train) not in self._features:
            self.extract()
        return self._features[(cfg.name, train)]

    def classification(self, cfg: DatasetConfig) -> tuple[dict[str, float], dict]:
        eval_set, features = self.features(cfg)
        _check_classification_set(eval_set, features)
        classifier = clip_core.build_zero_shot_classifier(
            self.model, clip_core.tokenize, eval_set.classnames, eval_set.templates
        )
        logits = metric_fns.zero_shot_logits(features.embeddings, classifier)
        result = metric_fns.classification_metrics(logits, features.labels)
        examples = [
            (image, int(result["predictions"][i]), int(features.labels[i]))
            for i, image in _example_images(eval_set, features, self.suite.example_images)
        ]
        artifacts = {"classnames": eval_set.classnames, "result": result, "examples": examples}
        return {k: result[k] for k in ("acc1", "acc5", "mean_per_class_recall")}, artifacts

    def retrieval(self, cfg: DatasetConfig) -> dict[str, float]:
        eval_set, features = self.features(cfg)
        if len(features.keys) == 0:
            raise DatasetError(
                f"dataset {cfg.name} at {eval_set.uri} has no images; check the URI and split."
            )
        without = sum(1 for c in features.captions if not c)
        if without:
            raise DatasetError(
                f"dataset {cfg.name} has {without} images without captions; retrieval needs a .txt or a json "
                "'captions' list per image."
            )
        texts = [text for captions in features.captions for text in captions]
        owners = [i for i, captions in enumerate(features.captions) for _ in captions]
        text_embeddings = encode_texts(self.model, texts)
        return metric_fns.retrieval_metrics(features.embeddings, text_embeddings, owners, self.suite.recall_k)

    def linear_probe(self, cfg: DatasetConfig) -> dict[str, float]:
        test_set, test = self.features(cfg)
        _, train = self.features(cfg, train=True)
        if len(train.keys) == 0 or len(test.keys) == 0 or int(min(train.labels.min(), test.labels.min())) < 0:
            raise DatasetError(
                f"dataset {cfg.name} needs labelled images in both its training and its evaluation split "
                "for a linear probe."
            )
        num_classes = max(int(train.labels.max()), int(test.labels.max())) + 1
        if test_set.classnames:
            num_classes = max(num_classes, len(test_set.classnames))
        probe = self.suite.linear_probe
        return metric_fns.linear_probe_metrics(
            train.embeddings,
            train.labels,
            test.embeddings,
            test.labels,
            num_classes,
            shots=probe.shots,
            full=probe.full,
            seeds=probe.seeds,
            l2=probe.l2,
            max_iter=probe.max_iter,
        )


def metric_name(task: str, dataset: str, metric: str) -> str:
    return f"{'linearprobe' if task == 'linear_probe' else 'zeroshot'}/{dataset}/{metric}"


@dataclass
class Evaluation:
    metrics: dict[str, float]  # {"zeroshot/<dataset>/acc1": value, ...}
    run_id: str | None  # the MLflow evaluation run
    parent_run_id: str | None  # the training run, when the checkpoint came from one
    step: int | None
    results: str | None = None  # where the results JSON was written

    def __str__(self) -> str:
        lines = ["", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {'n/a' if math.isnan(v) else f'{v:.4f}'} |" for k, v in self.metrics.items()]
        if self.run_id:
            lines.append(f"MLflow run: {self.run_id}")
        if self.results:
            lines.append(f"results: {self.results}")
        return "\n".join(lines)


def run(cfg: EvaluateConfig) -> Evaluation:
    """Evaluate one checkpoint on every dataset and task of the suite. Its metrics are
    `{"zeroshot/<dataset>/acc1": value, ...}`, NaN where a metric is undefined (acc5 with fewer than 5 classes).

    A training checkpoint folder's checkpoint.json supplies the training run and step when the config does not;
    the metrics are then also logged into that training run at that step. Needs a Ray cluster for the image
    features (ray.init() is called if none is connected).
    """
    checkpoint_uri, model, suite = cfg.checkpoint, cfg.model, cfg.suite
    parent_run_id, step = cfg.training_run_id, cfg.step
    weights_uri, info = resolve_checkpoint(checkpoint_uri)
    if info:
        if info.get("model") and info["model"] != model:
            raise EvaluationError(
                f"checkpoint {checkpoint_uri} was trained as {info['model']}, not {model}; pass --model "
                f"{info['model']}."
            )
        parent_run_id = parent_run_id or info.get("mlflow_run_id") or None
        step = step if step is not None else info.get("step")
    loaded, state_dict = load_model(model, weights_uri)
    evaluator = Evaluator(loaded, model, state_dict, suite)
    evaluator.extract()  # before the MLflow run: a bad dataset stops the job without leaving a failed run

    run_id = None
    if cfg.log_mlflow:
        use_tracking_server()  # credentials of the tracking URI into the environment, out of the job's log
        run_id = tracking.start_eval_run(
            cfg.experiment or suite.experiment, checkpoint_uri, model, parent_run_id, step, suite.to_yaml()
        )
    results: dict[str, float] = {}
    ok = False
    try:
        for dataset in suite.datasets:
            for task in dataset.tasks:
                artifacts = None
                if task == "zeroshot_classification":
                    values, artifacts = evaluator.classification(dataset)
                elif task == "zeroshot_retrieval":
                    values = evaluator.retrieval(dataset)
                else:
                    values = evaluator.linear_probe(dataset)
                named = {metric_name(task, dataset.name, k): v for k, v in values.items()}
                results.update(named)
                print(
                    "[evaluate] " + ", ".join(f"{k} {v:.4f}" for k, v in named.items() if not math.isnan(v)),
                    flush=True,
                )
                if run_id:
                    tracking.log_metrics(run_id, named, step)
                    if parent_run_id and step is not None:
                        tracking.log_metrics(parent_run_id, named, step)
                    if artifacts:
                        tracking.log_classification_artifacts(
                            run_id,
                            dataset.name,
                            artifacts["classnames"],
                            artifacts["result"],
                            artifacts["examples"],
                        )
        ok = True
    finally:
        if run_id:
            tracking.end_run(run_id, ok)
    evaluation = Evaluation(results, run_id, parent_run_id, step, cfg.results)
    if cfg.results:
        write_results(cfg, evaluation)
    return evaluation


def write_results(cfg: EvaluateConfig, evaluation: Evaluation) -> None:
    results = {
        "checkpoint": cfg.checkpoint,
        "model": cfg.model,
        "step": evaluation.step,
        "mlflow_run_id": evaluation.run_id,
        "training_run_id": evaluation.parent_run_id,
        "datasets": results_by_dataset(evaluation.metrics),
    }
    storage.write_bytes(cfg.results, json.dumps(results, indent=2).encode())


def results_by_dataset(results: dict[str, float]) -> dict[str, dict[str, float | None]]:
    """{"zeroshot/cifar10/acc1": v, "linearprobe/cifar10/acc1": w} -> {"cifar10": {"acc1": v,
    "linear_probe/acc1": w}}, NaN as None (JSON has no NaN)."""
    by_dataset: dict[str, dict[str, float | None]] = {}
    for name, value in results.items():
        family, dataset, metric = name.split("/", 2)
        key = metric if family == "zeroshot" else f"linear_probe/{metric}"
        by_dataset.setdefault(dataset, {})[key] = None if math.isnan(value) else value
    return by_dataset
