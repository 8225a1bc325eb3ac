"""`python -m pipelines.train --data URI [URI...] --model NAME --steps N --batch-size B --workers W --output URI
--experiment NAME [--config FILE.yaml] [options]`, also as `ray job submit -- python -m pipelines.train ...`.
See `--help` for every option."""

from pipelines.entrypoint import main
from pipelines.train.config import TrainConfig

if __name__ == "__main__":
    main("train", TrainConfig.load, "pipelines.train.job")
