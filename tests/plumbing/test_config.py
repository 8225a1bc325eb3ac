"""pipelines.config's URI rules for every job: a URI in a config may not embed credentials (configs are logged
to MLflow and handed to Ray tasks), errors never echo a password, and recorded URIs lose their userinfo."""

import pytest

from pipelines.config import ConfigError, redacted, validate, without_credentials
from pipelines.evaluate.config import EvaluateConfig, validate_suite
from pipelines.ingest.config import validate_config as validate_ingest
from pipelines.scheduled_eval.config import ScheduledEvalConfig
from pipelines.train.config import validate_config as validate_train

SECRET_URI = "s3://AKIAEXAMPLE:hunter2@bucket/prefix"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://user:secret@127.0.0.1:5050", "http://127.0.0.1:5050"),
        ("https://user:secret@mlflow.example.com/a/b?x=1", "https://mlflow.example.com/a/b?x=1"),
        ("http://token@127.0.0.1:5050", "http://127.0.0.1:5050"),  # a token as the user name
        ("http://user:p%40ss@host", "http://host"),
        ("http://127.0.0.1:5050", "http://127.0.0.1:5050"),
        ("s3://bucket/key@2x.jpg", "s3://bucket/key@2x.jpg"),  # an '@' in the path is not userinfo
        ("/local/path", "/local/path"),
    ],
)
def test_without_credentials_drops_the_userinfo_and_keeps_the_rest(uri, expected):
    assert without_credentials(uri) == expected
    assert redacted(uri).count("secret") == 0


def _ingest(**fields):
    return validate_ingest({"input": "s3://b/in.parquet", "output": "s3://b/out", **fields})


def _suite(**dataset):
    return validate_suite({"datasets": [{"name": "set", "uri": "s3://b/set", **dataset}]})


def _scheduled(**fields):
    data = {"suite": "suite.yaml", "champion_model": "m", "metric": "zeroshot/set/acc1", "claims": "s3://b/c"}
    return validate(ScheduledEvalConfig, data | fields, "scheduled-eval config")


@pytest.mark.parametrize(
    "build",
    [
        lambda: _ingest(input=SECRET_URI),
        lambda: _ingest(filters={"clip_score": {"checkpoint": SECRET_URI}}),
        lambda: _suite(uri=SECRET_URI),
        lambda: _suite(train_uri=SECRET_URI, tasks=["linear_probe"]),
        lambda: _scheduled(training_outputs=["s3://b/run", SECRET_URI]),
        lambda: _scheduled(claims=SECRET_URI),
        lambda: validate_train({"data": ["s3://b/shards", SECRET_URI], "model": "ViT-Tiny-16", "steps": 1,
                                "batch_size": 1, "output": "s3://b/run"}),
        lambda: EvaluateConfig.load(["--checkpoint", SECRET_URI, "--model", "ViT-Tiny-16", "--dataset", "s3://b/x"]),
        lambda: EvaluateConfig.load(["--checkpoint", "s3://b/c", "--model", "ViT-Tiny-16", "--dataset", SECRET_URI]),
        lambda: EvaluateConfig.load(["--checkpoint", "s3://b/c", "--model", "ViT-Tiny-16", "--dataset", "s3://b/x",
                                     "--results", SECRET_URI]),
    ],
    ids=["ingest-input", "clip-score-checkpoint", "eval-dataset", "eval-train-uri", "scheduled-training-output",
         "scheduled-claims", "train-data-list", "evaluate-checkpoint-flag", "evaluate-dataset-flag", "evaluate-results-flag"],
)  # fmt: skip
def test_every_job_refuses_uris_with_credentials_without_echoing_them(build):
    with pytest.raises(ConfigError) as error:
        build()
    assert "must not embed credentials" in str(error.value)
    assert "hunter2" not in str(error.value)
