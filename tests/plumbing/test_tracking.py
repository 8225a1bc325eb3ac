"""pipelines.tracking: every job talks to MLflow through a tracking URI without credentials, whichever way the
credentials came (in the URI, in the process's own MLFLOW_TRACKING_URI, or in MLFLOW_TRACKING_USERNAME/PASSWORD).
"""

import os

import mlflow
import mlflow.tracking._tracking_service.utils as mlflow_tracking_utils
import pytest

from pipelines.tracking import use_tracking_server

SERVER = "http://127.0.0.1:5050"


@pytest.fixture(autouse=True)
def fresh_tracking_uri(monkeypatch):
    # MLflow keeps the URI in a global and in os.environ; both come back after each test.
    monkeypatch.setattr(mlflow_tracking_utils, "_tracking_uri", None)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("uri", "own_env", "expected_bare", "expected_credentials"),
    [
        # The driver: credentials in the URI it was given.
        ("http://jobs:s3cret@127.0.0.1:5050", {}, SERVER, ("jobs", "s3cret")),
        ("https://jobs:s3cret@mlflow.example.com/prefix/", {}, "https://mlflow.example.com/prefix/",
         ("jobs", "s3cret")),
        ("http://jobs:p%40ss%3Aw0rd@127.0.0.1:5050", {}, SERVER, ("jobs", "p@ss:w0rd")),  # percent-encoded
        # A worker: handed the bare URI, its own environment names the same server with credentials.
        (SERVER, {"MLFLOW_TRACKING_URI": "http://jobs:s3cret@127.0.0.1:5050/"}, SERVER, ("jobs", "s3cret")),
        # Its own environment points elsewhere: those credentials are not for this server.
        (SERVER, {"MLFLOW_TRACKING_URI": "http://jobs:s3cret@127.0.0.1:6060"}, SERVER, (None, None)),
        # Variables set already win over a URI, as in MLflow's own client.
        ("http://jobs:s3cret@127.0.0.1:5050",
         {"MLFLOW_TRACKING_USERNAME": "ops", "MLFLOW_TRACKING_PASSWORD": "other"}, SERVER, ("ops", "other")),
        (SERVER, {}, SERVER, (None, None)),
    ],
    ids=["driver-uri", "https-with-path", "percent-encoded", "worker-own-env", "other-server",
         "variables-win", "no-credentials"],
)  # fmt: skip
def test_use_tracking_server_strips_the_uri_and_moves_its_credentials_to_the_environment(
    uri, own_env, expected_bare, expected_credentials
):
    environ = dict(own_env)
    assert use_tracking_server(uri, environ) == expected_bare
    assert mlflow.get_tracking_uri() == expected_bare
    assert (environ.get("MLFLOW_TRACKING_USERNAME"), environ.get("MLFLOW_TRACKING_PASSWORD")) == (
        expected_credentials
    )


def test_the_current_tracking_uri_is_the_default_and_child_processes_inherit_the_bare_one(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://jobs:s3cret@127.0.0.1:5050")
    assert use_tracking_server() == SERVER
    assert os.environ["MLFLOW_TRACKING_URI"] == SERVER
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == (
        "jobs",
        "s3cret",
    )
