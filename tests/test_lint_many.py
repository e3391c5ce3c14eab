"""Linting many files: worker processes, input order, bad files as error entries, a crashed
worker blamed on its own file only, and terminal-only progress."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from zoo import MLP, example_inputs, export_torchscript

from gradprobe.client import lint_many
from gradprobe.client.lint_many import LintOutcome, lint_files, worker_count
from gradprobe.client.progress import Progress, wanted
from gradprobe.diagnostics.options import DiagnoseOptions


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("many")
    args = example_inputs("mlp")
    good_a = export_torchscript(MLP(), args, root / "a.pt")
    bad = root / "broken.pt"
    bad.write_bytes(b"PK\x03\x04 truncated, not a model")
    good_b = export_torchscript(MLP(), args, root / "b.pt", scripted=True)
    return [good_a, bad, good_b]


def cpu_options(path: Path) -> DiagnoseOptions:
    return DiagnoseOptions(device="cpu", input_shapes=[[4, 16]])


def check_outcomes(outcomes: list[LintOutcome], models: list[Path]) -> None:
    assert [o.path for o in outcomes] == models  # input order, whatever finished first
    good_a, bad, good_b = outcomes
    assert good_a.ok and good_b.ok and not bad.ok
    assert good_a.report.model.path == str(models[0])
    assert good_b.report.model.format == "torchscript"
    assert bad.error and "\n" not in bad.error and not bad.internal


def test_in_process(models):
    events = []

    class Recorder(Progress):
        def stage(self, model, stage, fraction):
            events.append((model, stage, fraction))

    outcomes = lint_files(models, cpu_options, jobs=1, progress=Recorder(3, enabled=False))
    check_outcomes(outcomes, models)
    stages = [(stage, fraction) for model, stage, fraction in events if model == str(models[0])]
    assert ("load", 0.0) in stages and ("rules", 1.0) in stages


@pytest.mark.slow
def test_parallel_workers_same_reports(models):
    stream = io.StringIO()
    progress = Progress(3, stream=stream, enabled=True)
    outcomes = lint_many._lint_parallel(models, [cpu_options(p) for p in models], 2, progress)
    check_outcomes(outcomes, models)
    serial = lint_files(models, cpu_options, jobs=1)
    assert outcomes[0].report.findings == serial[0].report.findings
    assert outcomes[0].report.layers == serial[0].report.layers
    assert progress.done == 3
    drawn = stream.getvalue()
    assert "[3/3]" in drawn and "probe" in drawn  # stages crossed the process boundary


def die_on_crash_file(index: int, path: str, options: dict) -> tuple[str, str, str]:
    """A worker task that kills its process for one file, as a segfaulting loader would."""
    if path.endswith("crash.onnx"):
        os._exit(1)
    return "error", f"pretend failure of {Path(path).name}", ""


@pytest.mark.slow
def test_crashed_worker_blames_only_its_file(tmp_path):
    paths = [tmp_path / "one.onnx", tmp_path / "crash.onnx", tmp_path / "two.onnx"]
    options = [DiagnoseOptions(device="cpu")] * 3
    outcomes = lint_many._lint_parallel(paths, options, 2, None, task=die_on_crash_file)
    assert [o.path for o in outcomes] == paths
    assert outcomes[1].internal and "worker process died" in outcomes[1].error
    assert outcomes[0].error == "pretend failure of one.onnx" and not outcomes[0].internal
    assert outcomes[2].error == "pretend failure of two.onnx" and not outcomes[2].internal


def test_worker_count_respects_files_jobs_cpus_and_memory(models, monkeypatch):
    options = [cpu_options(p) for p in models]
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(lint_many, "available_memory", lambda: 64 * 2**30)
    # Three small files: starting workers would cost more than it saves, unless asked for.
    assert worker_count(models, options, None) == 1
    assert worker_count(models, options, 8) == 3  # no more workers than files
    assert worker_count(models, options, 2) == 2
    assert worker_count(models, options, 1) == 1
    assert worker_count(models[:1], options[:1], 4) == 1
    monkeypatch.setattr(lint_many, "PARALLEL_MIN_FILES", 2)
    assert worker_count(models, options, None) == 3
    monkeypatch.setattr(lint_many, "available_memory",
                        lambda: lint_many.WORKER_BASE_BYTES * 3 // 2)
    assert worker_count(models, options, None) == 1  # memory for ~one worker with its model
    monkeypatch.setattr(lint_many, "available_memory", lambda: 3 * 2**30)
    assert worker_count(models, options, None) == 3


def test_progress_only_on_a_terminal(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert not wanted(io.StringIO())
    primary, secondary = os.openpty()
    with os.fdopen(secondary, "w") as tty:
        assert wanted(tty)
        monkeypatch.setenv("CI", "true")
        assert not wanted(tty)
    os.close(primary)

    quiet = io.StringIO()
    progress = Progress(2, stream=quiet)  # not a TTY: decides by itself to stay silent
    progress.stage("m.onnx", "probe", 0.5)
    progress.finished("m.onnx", "ok")
    progress.close()
    assert quiet.getvalue() == "" and progress.done == 1

    shown = io.StringIO()
    progress = Progress(2, stream=shown, enabled=True)
    progress.hook("m.onnx")("probe", 0.5)
    progress.close()
    text = shown.getvalue()
    assert "[0/2] m.onnx: probe 50%" in text and text.endswith("\r\x1b[2K")

    long_name = "/very/deep/" * 20 + "model.onnx"
    shown = io.StringIO()
    monkeypatch.setattr("gradprobe.client.progress._terminal_width", lambda: 60)
    Progress(1, stream=shown, enabled=True).stage(long_name, "rules", 1.0)
    line = shown.getvalue().removeprefix("\r\x1b[2K")
    assert len(line) <= 59 and line.startswith("[0/1] …") and "model.onnx: rules 100%" in line
