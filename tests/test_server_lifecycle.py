"""`gradprobe serve` as a real subprocess: `gradprobe lint --server` gives the local run's JSON
and exit codes, each request leaves one log line without model bytes, and SIGTERM drains the
in-flight probe and exits 0."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from server_harness import shared_models

from gradprobe.client.api import Client
from gradprobe.client.cli import main as cli_main
from gradprobe.diagnostics.errors import ModelLoadError
from gradprobe.diagnostics.options import DiagnoseOptions

MARKER = b"GRADPROBE-MODEL-BYTES-MUST-NOT-BE-LOGGED"
ACCESS = "gradprobe.server.access: "


@pytest.fixture(scope="module")
def models():
    return shared_models()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A `gradprobe serve` subprocess: (process, address, log path)."""
    tmp = tmp_path_factory.mktemp("serve")
    log_path = tmp / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gradprobe.client.cli", "serve", "--port", "0",
             "--workers", "1", "--store-dir", str(tmp / "store"), "--grace-s", "120"],
            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    address = None
    while address is None:
        text = log_path.read_text(errors="replace")
        found = re.search(r"listening on (127\.0\.0\.1:\d+)", text)
        if found:
            address = found.group(1)
        elif process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"gradprobe serve did not start:\n{text}")
        else:
            time.sleep(0.2)
    yield process, address, log_path
    if process.poll() is None:
        process.kill()
        process.wait()


def _lint(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main(["lint", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_lint_with_server_matches_the_local_run(served, models, capsys):
    _, address, _ = served
    for model, extra in ((models.defect, []), (models.torchscript, ["--input-shape", "8x16"])):
        local_code, local_out, _ = _lint(capsys, str(model), "--format", "json", *extra)
        remote_code, remote_out, _ = _lint(capsys, str(model), "--format", "json",
                                           "--server", address, *extra)
        assert remote_code == local_code and local_code in (0, 1)
        local, remote = json.loads(local_out), json.loads(remote_out)
        local_reports = local if isinstance(local, list) else [local]
        remote_reports = remote if isinstance(remote, list) else [remote]
        for lr, rr in zip(local_reports, remote_reports, strict=True):
            # findings byte for byte, in the CLI's own JSON
            assert json.dumps(rr["findings"]) == json.dumps(lr["findings"])
            lr.pop("timing"), rr.pop("timing")
            assert rr == lr
    assert local_reports[0]["model"]["path"] == str(models.torchscript)


def test_lint_with_server_bad_model_exit_code_and_message(served, models, capsys):
    _, address, _ = served
    local = _lint(capsys, str(models.random))
    remote = _lint(capsys, str(models.random), "--server", address)
    assert local[0] == remote[0] == 2
    assert remote[2] == local[2] and remote[2].count("\n") == 1  # the same one line


def test_sigterm_drains_the_in_flight_probe_then_exits_0(served, models):
    process, address, log_path = served
    before = _access_lines(log_path)
    with Client(address, timeout_s=120) as c:
        with pytest.raises(ModelLoadError):
            c.diagnose(MARKER * 100)
        report = c.diagnose(models.defect)
        c.upload(models.slow)
        probing = threading.Event()
        outcome: dict = {}

        def slow_probe() -> None:
            try:
                outcome["report"] = c.diagnose(
                    models.slow, DiagnoseOptions(batch_size=512),
                    progress=lambda stage, _: stage == "probe" and probing.set())
            except Exception as exc:  # reported by the assertion below
                outcome["error"] = exc

        thread = threading.Thread(target=slow_probe)
        thread.start()
        assert probing.wait(120), "the slow probe never began"
        process.send_signal(signal.SIGTERM)
        thread.join(180)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["report"].model.path == str(models.slow)
    assert process.wait(120) == 0

    log = log_path.read_text(errors="replace")
    assert MARKER.decode() not in log
    assert "shutting down" in log and "stopped" in log
    # one line per request, with sha, status, duration and the rules that fired
    lines = _access_lines(log_path)[len(before):]
    ours = {hashlib.sha256(MARKER * 100).hexdigest(), report.model.sha256,
            outcome["report"].model.sha256}
    # (the previous test's last line may land just after `before` was read)
    diagnoses = [line for line in lines if line.startswith("rpc=Lint ")
                 and re.search(r"sha=(\w+)", line).group(1) in ours]
    assert len(diagnoses) == 3, diagnoses
    marker, defect, slow = diagnoses
    assert "status=INVALID_ARGUMENT" in marker and "cached=False" in marker
    fired = sorted({f.rule for f in report.findings})
    assert f"sha={report.model.sha256}" in defect and "status=OK" in defect
    assert f"rules={','.join(fired) or '-'}" in defect and fired
    assert re.search(r"duration_ms=\d+", defect)
    assert f"sha={outcome['report'].model.sha256}" in slow and "status=OK" in slow
    assert "cached=True" in slow  # uploaded before, through the deprecated UploadModel
    uploads = [line for line in lines if line.startswith("rpc=UploadModel ")]
    assert len(uploads) == 1 and "status=OK" in uploads[0]


def _access_lines(log_path) -> list[str]:
    log = log_path.read_text(errors="replace")
    return [line.split(ACCESS, 1)[1] for line in log.splitlines() if ACCESS in line]
