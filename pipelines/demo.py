"""`make demo`: start the local stack and run the project's jobs on it through `ray job submit`.

Today that is the quickstart job (pipelines/quickstart.py); the ingest, training and evaluation stages join
here as they land. A finished result is reused on a second run unless --rerun is given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from infra import local
from pipelines import storage


def submit(entrypoint: list[str], env: dict[str, str]) -> None:
    """Submit a Ray job to the local head and follow its logs until it ends, as a user would."""
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    command = [ray, "job", "submit", "--address", env["RAY_API_SERVER_ADDRESS"], "--", *entrypoint]
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run(command, env={**os.environ, **env})
    if result.returncode != 0:
        raise SystemExit(f"the Ray job `{' '.join(entrypoint)}` failed; its log is above")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=f"s3://{local.DATA_BUCKET}/demo/quickstart")
    parser.add_argument("--rerun", action="store_true", help="run the job again even if a result exists")
    args = parser.parse_args()

    local.start()
    env = local.stack_env()
    os.environ.update(env)
    result_uri = storage.join(args.output, "result.json")
    started = time.time()
    if args.rerun or not storage.exists(result_uri):
        submit([sys.executable, "-m", "pipelines.quickstart", "--output", args.output], env)
    else:
        print(f"reusing the finished quickstart run in {args.output} (pass --rerun to train again)")
    result = json.loads(storage.read_bytes(result_uri))

    rows = [
        (
            "zero-shot acc1, colour (8 classes)",
            result["zeroshot/scenes-color/acc1"],
            result["chance/scenes-color"],
        ),
        (
            "zero-shot acc1, shape (8 classes)",
            result["zeroshot/scenes-shape/acc1"],
            result["chance/scenes-shape"],
        ),
    ]
    print("\n| result | value | chance |\n|---|---|---|")
    for name, value, chance in rows:
        print(f"| {name} | {value:.3f} | {chance:.3f} |")
    print(f"| training samples/s ({result['model']}, 1 process) | {result['samples_per_s']} | |")
    print(f"| final contrastive loss after {result['steps']} steps | {result['final_loss']} | |")
    print(f"\ncheckpoint: {result['checkpoint']}")
    experiment = result["mlflow_experiment_id"]
    print(
        f"MLflow UI: {env['MLFLOW_TRACKING_URI']}/#/experiments/{experiment}/runs/{result['mlflow_run_id']}"
    )
    print(f"Ray dashboard: {env['RAY_API_SERVER_ADDRESS']}")
    print(f"demo finished in {time.time() - started:.0f}s; stop the stack with `make stack-stop`")


if __name__ == "__main__":
    main()
