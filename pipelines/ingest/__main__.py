"""`python -m pipelines.ingest --input URI --output URI [--config FILE.yaml] [options]`, also as
`ray job submit -- python -m pipelines.ingest ...`. See `--help` for every option."""

from pipelines.entrypoint import main
from pipelines.ingest.config import IngestConfig

if __name__ == "__main__":
    main("ingest", IngestConfig.load, "pipelines.ingest.job")
