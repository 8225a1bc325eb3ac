"""The one way every job's `python -m pipelines.X` runs: the typed config loaded from argv, the job's `run(cfg)`,
its summary printed; a config or job error ends it with one sentence on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipelines.config import ConfigError

EXIT_JOB_ERROR = 2  # argparse's own code for a bad command line


class JobError(Exception):
    """The job cannot run with these inputs (missing data, an output it may not write, ...); the message is one
    sentence saying what to fix."""


def main(name: str, load: Callable[[Sequence[str]], Any], job: str) -> None:
    """Run job module `job`'s `run` on the config `load` builds from this process's argv, and print the summary
    it returns. The job module is imported only after the config has loaded, so a bad command line stops before
    whatever only the job module imports. Anything but a ConfigError or JobError is a bug: it keeps its traceback."""
    try:
        cfg = load(sys.argv[1:])
        summary = importlib.import_module(job).run(cfg)
    except (ConfigError, JobError) as error:
        print(f"{name}: {error}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_JOB_ERROR) from None
    print(summary, flush=True)
