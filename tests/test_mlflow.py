"""MLflow logging against a real tracking server (SQLite backend) started by the test, read
back with MlflowClient."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from defects import DEFECTS

import gradprobe
from gradprobe.client.cli import main

pytestmark = pytest.mark.slow  # a real server takes seconds to start

mlflow = pytest.importorskip("mlflow")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    command = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", str(folder / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL,
                              stderr=(folder / "server.log").open("w"))
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail("mlflow server did not start: " + (folder / "server.log").read_text()[-2000:])
        time.sleep(0.5)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    yield uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous
    server.terminate()
    server.wait(timeout=30)


def _read_back(run_id: str) -> tuple[dict, dict, dict]:
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    folder = client.download_artifacts(run_id, "gradprobe")
    report = json.loads(Path(folder, "report.json").read_text())
    assert "<html" in Path(folder, "report.html").read_text().lower()
    return run.data.metrics, run.data.tags, report


def test_log_report_to_the_active_run(tracking_uri):
    from gradprobe.integrations.mlflow import log_report

    healthy, x = DEFECTS["healthy_mlp"]()
    planted, y = DEFECTS["dead_relu"]()
    mlflow.set_experiment("gradprobe-test")
    with mlflow.start_run() as run:
        assert log_report(gradprobe.diagnose(planted, y)) == run.info.run_id
    metrics, tags, report = _read_back(run.info.run_id)
    assert tags["gradprobe.verdict"] == "fail" and tags["gradprobe.worst"] == "error"
    assert metrics["gradprobe/error"] >= 1 and metrics["gradprobe/rule/dead-relu"] >= 1
    assert any(f["rule"] == "dead-relu" for f in report["findings"])

    run_id = log_report(gradprobe.diagnose(healthy, x))  # no active run: a new one
    metrics, tags, _ = _read_back(run_id)
    assert run_id != run.info.run_id
    assert tags["gradprobe.verdict"] == "pass" and metrics["gradprobe/error"] == 0


def test_cli_lint_mlflow(tracking_uri, tmp_path, capsys):
    model, x = DEFECTS["zero_hidden"]()
    path = tmp_path / "zero_hidden.pt2"
    torch.export.save(torch.export.export(model.eval(), x), str(path))
    assert main(["lint", str(path), "--mlflow"]) == 1
    err = capsys.readouterr().err
    run_id = err.split("MLflow run ")[1].split()[0]
    metrics, tags, report = _read_back(run_id)
    assert tags["gradprobe.verdict"] == "fail"
    assert metrics["gradprobe/rule/zero-weights"] >= 1
    assert report["model"]["path"] == str(path)
