"""`python -m pipelines.ingest --input URI --output URI [--config FILE.yaml] [options]`, also as
`ray job submit -- python -m pipelines.ingest ...`. See `--help` for every option."""

import sys

from pipelines.config import ConfigError
from pipelines.ingest.config import load_config
from pipelines.ingest.reader import InputError


def main() -> None:
    try:
        cfg = load_config(sys.argv[1:])
        from pipelines.ingest import job  # Ray and the stages load only for a valid config

        manifest = job.run(cfg)
    except (ConfigError, InputError) as error:
        raise SystemExit(f"ingest: {error}") from None
    job.print_summary(cfg, manifest)
    if cfg.mlflow_experiment:
        job.log_to_mlflow(cfg, manifest)


if __name__ == "__main__":
    main()
