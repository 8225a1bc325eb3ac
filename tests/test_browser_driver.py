"""The headless-Chromium driver against the local stack's MLflow UI: a run logged through the real MLflow
client (metrics over steps, a table, a figure) shows its name, metric keys and artifacts in the page a person
would open. Screenshots are kept under test-artifacts/browser/ (gitignored) for a person to look at.
"""

import uuid

import matplotlib

matplotlib.use("Agg")  # no display in CI

import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pytest  # noqa: E402

from tests.browser import BrowserError, HeadlessChromium  # noqa: E402
from tests.paths import BROWSER_ARTIFACTS  # noqa: E402

pytestmark = pytest.mark.browser

ARTIFACTS = BROWSER_ARTIFACTS


@pytest.fixture(scope="module")
def browser():
    with HeadlessChromium() as chromium:
        yield chromium


@pytest.fixture(scope="module")
def logged_run(local_stack) -> dict[str, str]:
    """One MLflow run with a loss curve, a zero-shot metric, a per-class table and a confusion-matrix figure.
    Artifacts go through the tracking server's proxy, so the client needs no S3 credentials."""
    tracking_uri = local_stack.env["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri)
    suffix = uuid.uuid4().hex[:8]
    experiment_id = client.create_experiment(f"browser-driver-{suffix}")
    run_name = f"browser-check-{suffix}"
    run = client.create_run(experiment_id, run_name=run_name, tags={"clip_ray.kind": "train"})
    run_id = run.info.run_id
    for step in range(10):
        client.log_metric(run_id, "train/loss", 4.0 / (step + 1), step=step)
    client.log_metric(run_id, "zeroshot/scenes-color/acc1", 0.875, step=9)
    classes = ["red", "green", "blue"]
    client.log_table(
        run_id, {"class": classes, "acc1": [0.9, 0.8, 0.95]}, artifact_file="per_class_red_green.json"
    )
    figure, axes = plt.subplots(figsize=(3, 3))
    axes.imshow([[9, 1, 0], [1, 8, 1], [0, 0, 10]])
    client.log_figure(run_id, figure, "confusion_matrix.png")
    plt.close(figure)
    client.set_terminated(run_id)
    return {
        "tracking_uri": tracking_uri,
        "experiment_id": experiment_id,
        "run_id": run_id,
        "run_name": run_name,
    }


def test_mlflow_run_page_shows_run_name_and_metric_keys(browser: HeadlessChromium, logged_run: dict) -> None:
    url = f"{logged_run['tracking_uri']}/#/experiments/{logged_run['experiment_id']}/runs/{logged_run['run_id']}"
    page = browser.open(
        url,
        ARTIFACTS / "mlflow_run_overview.png",
        wait_for=[logged_run["run_name"], "train/loss", "zeroshot/scenes-color/acc1"],
        timeout=90,
    )
    assert logged_run["run_id"] in page.url
    assert page.screenshot.stat().st_size > 10_000  # a rendered page, not a blank one


def test_mlflow_model_metrics_tab_draws_the_loss_curve(browser: HeadlessChromium, logged_run: dict) -> None:
    url = (
        f"{logged_run['tracking_uri']}/#/experiments/{logged_run['experiment_id']}"
        f"/runs/{logged_run['run_id']}/model-metrics"
    )
    # MLflow draws charts with Plotly: each logged step of a line is a marker path in the trace's points
    # group, so a 10th marker exists only once the whole 10-step loss curve is drawn.
    browser.open(
        url,
        ARTIFACTS / "mlflow_run_model_metrics.png",
        wait_for=["train/loss"],
        wait_for_selector=".js-plotly-plot .scatterlayer .trace .points path:nth-child(10)",
        timeout=90,
    )


def test_mlflow_artifacts_tab_lists_the_table_and_figure(browser: HeadlessChromium, logged_run: dict) -> None:
    url = (
        f"{logged_run['tracking_uri']}/#/experiments/{logged_run['experiment_id']}"
        f"/runs/{logged_run['run_id']}/artifacts"
    )
    browser.open(
        url,
        ARTIFACTS / "mlflow_run_artifacts.png",
        wait_for=["per_class_red_green.json", "confusion_matrix.png"],
        timeout=90,
    )


def test_driver_reports_text_that_never_appears(browser: HeadlessChromium, logged_run: dict) -> None:
    url = f"{logged_run['tracking_uri']}/#/experiments/{logged_run['experiment_id']}/runs/{logged_run['run_id']}"
    screenshot = ARTIFACTS / "mlflow_run_missing_metric.png"
    with pytest.raises(BrowserError, match="zeroshot/never-logged/acc1"):
        browser.open(url, screenshot, wait_for=["zeroshot/never-logged/acc1"], timeout=10)
    assert screenshot.exists()  # what the page showed instead is kept to look at
