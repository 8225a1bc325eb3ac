"""Command line of the local stack: python -m infra.local start|stop|status [--state-dir DIR] [--s3-port N ...]
[--ray-auth token] [--mlflow-auth]."""

import argparse
import dataclasses
import sys
from pathlib import Path

from infra.local.services import AUTH_SETTINGS, RAY_AUTH_MODES, StackConfig
from infra.local.stack import load_config, start, status, stop
from infra.local.state import DEFAULT_STATE_DIR, StackError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local", description=__doc__)
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="default: %(default)s")
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait for each service")
    ports = parser.add_argument_group("start settings (default: as recorded in the state dir, else these)")
    for field in dataclasses.fields(StackConfig):
        if field.name in AUTH_SETTINGS:
            continue
        default = "Ray's own choice" if field.default is None else field.default
        ports.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=int,
            default=None,
            metavar="N",
            help=f"default: {default}",
        )
    auth = parser.add_argument_group("authentication (default: as recorded in the state dir, else off)")
    auth.add_argument(
        "--ray-auth",
        choices=RAY_AUTH_MODES,
        default=None,
        help="token: Ray's dashboard, job API and GCS require the token generated into "
        "<state-dir>/secrets/ray_auth_token (the env file points clients at it)",
    )
    auth.add_argument(
        "--mlflow-auth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="MLflow's basic-auth app; the admin password is generated into <state-dir>/secrets/ and the env "
        "file exports MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
    )
    args = parser.parse_args(argv)

    try:
        if args.command == "start":
            overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(StackConfig)}
            overrides = {k: v for k, v in overrides.items() if v is not None}
            config = dataclasses.replace(load_config(args.state_dir), **overrides)
            start(args.state_dir, config, timeout_s=args.timeout)
        elif args.command == "stop":
            stop(args.state_dir)
        else:
            report = status(args.state_dir)
            for s in report:
                health = "healthy" if s.healthy else "DOWN"
                pid = f"pid {s.pid}" if s.pid else "no pid"
                print(f"{s.name:<10} {health:<8} {pid:<11} {s.url}  [{s.detail}]")
            return 0 if all(s.healthy for s in report) else 1
    except StackError as e:
        print(f"[stack] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
