"""`python -m pipelines.scheduled_eval --config FILE.yaml [--watch SECONDS]`: one pass (cron, `ray job submit`,
a RayCronJob), or a pass every SECONDS until interrupted."""

from __future__ import annotations

import sys
import time
import traceback

from pipelines.config import ConfigError
from pipelines.scheduled_eval.config import build_arg_parser, load_config
from pipelines.scheduled_eval.scheduler import run_pass


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    if args.watch is not None and args.watch <= 0:
        print("--watch takes a positive number of seconds between passes.", file=sys.stderr)
        return 2
    while True:
        try:
            # Read every pass, so that a watcher follows edits to the config and the suite.
            report = run_pass(load_config(args.config, args.overrides))
        except ConfigError as e:  # the suite's errors too: one class for every config
            print(e, file=sys.stderr)
            return 2
        except Exception:
            if args.watch is None:
                raise
            # A watcher outlives a store or tracking server that is briefly down.
            traceback.print_exc()
            print(f"[scheduled-eval] pass failed; next pass in {args.watch:g}s", file=sys.stderr, flush=True)
        else:
            if args.watch is None:
                return 1 if report.failed else 0
        time.sleep(args.watch)


if __name__ == "__main__":
    sys.exit(main())
