"""What every job shares about MLflow: the tracking server is used through a URI without credentials, and the
credentials travel in MLFLOW_TRACKING_USERNAME/PASSWORD only. MLflow prints its tracking URI in every "View
run" line (the job's log) and Ray records what a driver hands its workers, so no URI may carry a password.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from urllib.parse import unquote, urlsplit

import mlflow

from pipelines.config import without_credentials

USERNAME_VAR, PASSWORD_VAR = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


def use_tracking_server(uri: str | None = None, environ: MutableMapping[str, str] = os.environ) -> str:
    """Point this process's MLflow at `uri` (default: its current tracking URI) without `user:password@`, and
    return that URI. Credentials found in `uri`, or in this process's own MLFLOW_TRACKING_URI when it names the
    same server, move to MLFLOW_TRACKING_USERNAME/PASSWORD (which MLflow's client sends as basic auth) unless
    those are set already; so a worker handed a bare URI still authenticates from its own environment."""
    target = uri if uri is not None else mlflow.get_tracking_uri()
    bare = without_credentials(target)
    if not environ.get(USERNAME_VAR):
        for candidate in (target, environ.get("MLFLOW_TRACKING_URI", "")):
            parts = urlsplit(candidate)
            if parts.username is not None and without_credentials(candidate).rstrip("/") == bare.rstrip("/"):
                environ[USERNAME_VAR] = unquote(parts.username)
                environ[PASSWORD_VAR] = unquote(parts.password or "")
                break
    if mlflow.get_tracking_uri() != bare:
        mlflow.set_tracking_uri(bare)  # MLflow puts it in MLFLOW_TRACKING_URI too, for child processes
    return bare
