"""`python -m pipelines.evaluate --checkpoint URI --model NAME --dataset [NAME=]URI --task TASK [--config
suite.yaml] [--experiment NAME] [--results FILE.json]`, also as `ray job submit -- python -m ...`."""

from pipelines.entrypoint import main
from pipelines.evaluate.config import EvaluateConfig

if __name__ == "__main__":
    main("evaluate", EvaluateConfig.load, "pipelines.evaluate.job")
