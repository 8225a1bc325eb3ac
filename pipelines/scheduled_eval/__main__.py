"""`python -m pipelines.scheduled_eval --config FILE.yaml [--watch SECONDS]`: one pass (cron, `ray job submit`,
a RayCronJob), or a pass every SECONDS until interrupted."""

from pipelines.entrypoint import main
from pipelines.scheduled_eval.config import ScheduledEvalConfig

if __name__ == "__main__":
    main("scheduled-eval", ScheduledEvalConfig.load, "pipelines.scheduled_eval.scheduler")
