"""`python -m pipelines.train --data URI [URI...] --model NAME --steps N --batch-size B --workers W --output URI
--experiment NAME [--config FILE.yaml] [options]`, also as `ray job submit -- python -m pipelines.train ...`.
See `--help` for every option."""

import json
import sys

from pipelines.config import ConfigError
from pipelines.train.config import load_config


def main() -> None:
    try:
        cfg = load_config(sys.argv[1:])
    except ConfigError as error:
        raise SystemExit(f"train: {error}") from None
    from pipelines.train import job  # Ray, MLflow and torch load only for a valid config

    try:
        summary = job.run(cfg)
    except job.JobError as error:
        raise SystemExit(f"train: {error}") from None
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
