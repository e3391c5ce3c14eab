"""Baselines: record findings once, then see only new ones — stable across runs, machines
(working directories) and re-worded or re-measured findings."""

from __future__ import annotations

import json
import os

import pytest
from sample_reports import report

from gradprobe.client.baseline import (
    BASELINE_SCHEMA,
    filter_new,
    read_baseline,
    suppressed_count,
    write_baseline,
)
from gradprobe.diagnostics.errors import ConfigError
from gradprobe.diagnostics.report import Finding, Severity


def zoo(root, name="models/mlp.onnx", **kwargs):
    return report(str(root / name), **kwargs)


def test_written_baseline_suppresses_everything_it_recorded(tmp_path):
    reports = [zoo(tmp_path), zoo(tmp_path, "models/b.onnx")]
    path = tmp_path / "gradprobe-baseline.json"
    write_baseline(path, reports)
    data = json.loads(path.read_text())
    assert data["schema"] == BASELINE_SCHEMA
    assert len(data["entries"]) == 6
    entry = data["entries"][0]
    assert set(entry) == {"fingerprint", "model", "rule", "layer", "severity", "message",
                          "model_sha256"}
    assert {e["model"] for e in data["entries"]} == {"models/mlp.onnx", "models/b.onnx"}
    assert data["entries"] == sorted(data["entries"], key=lambda e: (e["model"], e["rule"],
                                                                     e["layer"], e["fingerprint"]))

    filtered = filter_new(reports, read_baseline(path))
    assert [r.findings for r in filtered] == [[], []]
    assert all(r.summary.error == r.summary.warning == r.summary.info == 0 for r in filtered)
    assert suppressed_count(reports, filtered) == 6
    assert not any(r.fails("info") for r in filtered)


def test_only_new_findings_survive_and_numbers_do_not_matter(tmp_path):
    path = tmp_path / "baseline.json"
    write_baseline(path, [zoo(tmp_path)])
    later = zoo(tmp_path)
    for finding in later.findings:  # same problems, measured again with other numbers
        finding.message = "reworded: " + finding.message
        finding.evidence = {"dead_units": 0.51}
    new = Finding(rule="exploding-gradients", severity=Severity.WARNING, layer="net.0",
                  parameters=["net.0.weight"], message="grows 80x")
    twin = later.findings[1].model_copy()  # a second dead-relu at the same place is new too
    later.findings += [new, twin]
    [filtered] = filter_new([later], read_baseline(path))
    assert filtered.findings == [new, twin]
    assert (filtered.summary.error, filtered.summary.warning) == (1, 1)
    assert filtered.fails("error")


def test_same_layer_in_another_model_is_new(tmp_path):
    path = tmp_path / "baseline.json"
    write_baseline(path, [zoo(tmp_path)])
    [filtered] = filter_new([zoo(tmp_path, "models/copy.onnx")], read_baseline(path))
    assert len(filtered.findings) == 3


def test_stable_across_machines_and_working_directories(tmp_path, monkeypatch):
    # Machine A: checkout in a/, run from inside models/ with relative paths.
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "models").mkdir(parents=True)
    (b / "tools").mkdir(parents=True)
    monkeypatch.chdir(a / "models")
    write_baseline(a / "baseline.json", [report("mlp.onnx")])
    text = (a / "baseline.json").read_text()
    assert str(tmp_path) not in text  # nothing machine-specific in the file
    # Machine B: the same repository checked out elsewhere, run from another directory.
    (b / "baseline.json").write_text(text)
    monkeypatch.chdir(b / "tools")
    rel = os.path.relpath(b / "models" / "mlp.onnx")
    [filtered] = filter_new([report(rel)], read_baseline(b / "baseline.json"))
    assert filtered.findings == []


def test_bad_baseline_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="baseline file not found .*--write-baseline"):
        read_baseline(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable baseline"):
        read_baseline(broken)
    other = tmp_path / "report.json"
    other.write_text(json.dumps({"schema": "gradprobe.report/v1"}))
    with pytest.raises(ConfigError, match="not a gradprobe baseline"):
        read_baseline(other)
    bad_entry = tmp_path / "bad.json"
    bad_entry.write_text(json.dumps({"schema": BASELINE_SCHEMA, "entries": [{"rule": "x"}]}))
    with pytest.raises(ConfigError, match=r"bad baseline entry at entries\.0\."):
        read_baseline(bad_entry)
