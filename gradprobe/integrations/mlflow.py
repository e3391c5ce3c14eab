"""Log a gradprobe report to MLflow: the JSON and HTML reports as artifacts, the counts per
severity and per rule as metrics, the verdict as tags.

    report = gradprobe.diagnose(model, batch)
    gradprobe.integrations.mlflow.log_report(report)          # the active run, or a new one

`gradprobe lint ... --mlflow` does the same for every linted model (MLFLOW_TRACKING_URI,
MLFLOW_EXPERIMENT_NAME and MLFLOW_RUN_ID choose the server, experiment and run as usual).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

from gradprobe.diagnostics.errors import ConfigError
from gradprobe.diagnostics.report import Report
from gradprobe.integrations._verdict import check_fail_on, failing, summary_metrics


def log_report(report: Report, run_id: str | None = None, *, fail_on: str = "error",
               artifact_path: str = "gradprobe", metric_prefix: str = "gradprobe") -> str:
    """Log `report` to run `run_id` (default: the active run; without one, a new run in the
    current experiment, ended afterwards). Returns the run id. Metrics are
    `<prefix>/error|warning|info` and `<prefix>/rule/<rule>`; tags `gradprobe.verdict`
    (pass/fail at `fail_on`) and `gradprobe.worst` (the worst severity, or none)."""
    check_fail_on(fail_on)
    try:
        if run_id is None and mlflow.active_run() is None:
            with mlflow.start_run() as run:  # honours MLFLOW_RUN_ID and MLFLOW_EXPERIMENT_NAME
                return _log(report, run.info.run_id, fail_on, artifact_path, metric_prefix)
        run_id = run_id or mlflow.active_run().info.run_id  # type: ignore[union-attr]
        return _log(report, run_id, fail_on, artifact_path, metric_prefix)
    except MlflowException as exc:
        raise ConfigError(f"MLflow: {_first_line(exc)}") from None
    except OSError as exc:  # requests' connection errors are OSErrors
        raise ConfigError(f"MLflow tracking server unreachable: {_first_line(exc)}") from None


def log_reports(reports: list[Report], run_id: str | None = None, *,
                fail_on: str = "error") -> str:
    """Several models' reports into one run (`gradprobe lint ... --mlflow`): each under
    `gradprobe/<model file name>` (artifacts and metrics) when there is more than one; the
    run's verdict tags are those of the whole set."""
    check_fail_on(fail_on)
    if len(reports) == 1:
        return log_report(reports[0], run_id, fail_on=fail_on)
    try:
        if run_id is None and mlflow.active_run() is None:
            with mlflow.start_run() as run:
                return _log_many(reports, run.info.run_id, fail_on)
        return _log_many(reports, run_id or mlflow.active_run().info.run_id,  # type: ignore[union-attr]
                         fail_on)
    except MlflowException as exc:
        raise ConfigError(f"MLflow: {_first_line(exc)}") from None
    except OSError as exc:
        raise ConfigError(f"MLflow tracking server unreachable: {_first_line(exc)}") from None


def _log_many(reports: list[Report], run_id: str, fail_on: str) -> str:
    for index, report in enumerate(reports):
        name = Path(report.model.path).name if report.model.path else f"model{index}"
        _log(report, run_id, fail_on, f"gradprobe/{name}", f"gradprobe/{name}")
    worst = max((r.worst() for r in reports if r.worst()), key=lambda s: s.rank, default=None)
    verdict = "fail" if any(failing(r, fail_on) for r in reports) else "pass"
    mlflow.MlflowClient().log_batch(run_id, tags=[
        RunTag("gradprobe.verdict", verdict),
        RunTag("gradprobe.worst", worst.value if worst else "none")])
    return run_id


def _log(report: Report, run_id: str, fail_on: str, artifact_path: str, prefix: str) -> str:
    from gradprobe.client.formats.html import render_html

    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    metrics = [Metric(prefix + key.removeprefix("gradprobe"), value, now, 0)
               for key, value in summary_metrics(report).items()]
    worst = report.worst()
    tags = [RunTag("gradprobe.verdict", "fail" if failing(report, fail_on) else "pass"),
            RunTag("gradprobe.fail_on", fail_on),
            RunTag("gradprobe.worst", worst.value if worst else "none")]
    client.log_batch(run_id, metrics=metrics, tags=tags)
    with tempfile.TemporaryDirectory(prefix="gradprobe-mlflow-") as folder:
        Path(folder, "report.json").write_text(report.to_json())
        Path(folder, "report.html").write_text(render_html([report]))
        client.log_artifacts(run_id, folder, artifact_path)
    return run_id


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
