"""`python -m pipelines.evaluate --checkpoint URI --model NAME --dataset [NAME=]URI --task TASK [--config
suite.yaml] [--experiment NAME] [--results FILE.json]`, also as `ray job submit -- python -m ...`."""

from __future__ import annotations

import json
import math
import sys

from pipelines import storage
from pipelines.config import ConfigError
from pipelines.evaluate.config import parse_args
from pipelines.evaluate.datasets import DatasetError
from pipelines.evaluate.job import EvaluationError, results_by_dataset, run_evaluation


def main() -> None:
    try:
        args, suite = parse_args(sys.argv[1:])
        evaluation = run_evaluation(
            args.checkpoint, args.model, suite, args.experiment, log_mlflow=not args.no_mlflow
        )
    except (ConfigError, DatasetError, EvaluationError) as error:
        raise SystemExit(f"evaluate: {error}") from None

    print("\n| metric | value |\n|---|---:|")
    for name, value in evaluation.metrics.items():
        print(f"| {name} | {'n/a' if math.isnan(value) else f'{value:.4f}'} |")
    if evaluation.run_id:
        print(f"MLflow run: {evaluation.run_id}")
    if args.results:
        results = {
            "checkpoint": args.checkpoint,
            "model": args.model,
            "step": evaluation.step,
            "mlflow_run_id": evaluation.run_id,
            "training_run_id": evaluation.parent_run_id,
            "datasets": results_by_dataset(evaluation.metrics),
        }
        storage.write_bytes(args.results, json.dumps(results, indent=2).encode())
        print(f"results: {args.results}")


if __name__ == "__main__":
    main()
