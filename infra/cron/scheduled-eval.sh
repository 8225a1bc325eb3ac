#!/usr/bin/env bash
# Submit one scheduled-evaluation pass to the Ray cluster and return at once (for cron).
# Usage: scheduled-eval.sh CONFIG_URI [ENV_FILE]
#   CONFIG_URI  the scheduled-eval YAML, an s3:// URI or a path the Ray head can read
#   ENV_FILE    optional file of `export NAME=value` lines giving RAY_API_SERVER_ADDRESS (the dashboard URL),
#               for a cluster with token authentication RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or
#               RAY_AUTH_TOKEN_PATH), and, if the head lacks them, AWS_* and MLFLOW_TRACKING_URI; e.g. the local
#               stack's .stack/env (keep such a file 0600: it holds the token)
# Passes that overlap (a slow pass still running when cron fires again) are safe: each checkpoint is claimed
# atomically before it is evaluated, so the second pass skips what the first is doing.
set -euo pipefail
config="${1:?usage: scheduled-eval.sh CONFIG_URI [ENV_FILE]}"
if [[ -n "${2:-}" ]]; then
  # shellcheck disable=SC1090
  source "$2"
fi
: "${RAY_API_SERVER_ADDRESS:?set RAY_API_SERVER_ADDRESS to the Ray dashboard URL, e.g. http://head:8265}"
repo="$(cd "$(dirname "$0")/../.." && pwd)"
python="${CLIP_RAY_PYTHON:-$repo/.venv/bin/python}"
exec "$(dirname "$python")/ray" job submit --no-wait --address "$RAY_API_SERVER_ADDRESS" \
  --submission-id "scheduled-eval-$(date -u +%Y%m%dT%H%M%S)-$$" \
  -- "$python" -m pipelines.scheduled_eval --config "$config"
