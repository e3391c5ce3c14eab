"""Issue 13, reports and `gradprobe fix`: module paths in ONNX fix lines, a short fix summary
with details under --verbose, --select/--ignore, --emit-code, one line for shared tensors, and
an op column that does not cut names."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from defects import zero_hidden
from torch import nn
from zoo import export_onnx

from gradprobe.client.cli import main
from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions


class ZeroQuery(nn.Module):
    """A bias-free projection on (batch, seq, features): the legacy exporter writes it as a
    MatMul on an initializer it names `onnx::MatMul_<n>` (the transposed weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(16, 16, bias=False)
        self.out = nn.Linear(16, 4)
        nn.init.zeros_(self.query.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.query(x)))


def test_onnx_fix_line_uses_the_module_path_not_the_exporter_name(tmp_path) -> None:
    path = tmp_path / "query.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ZeroQuery().eval(), (torch.randn(2, 5, 16),), str(path), dynamo=False)
    report = diagnose(path, DiagnoseOptions(device="cpu"))
    finding = next(f for f in report.findings if f.rule == "zero-weights")
    assert any("::" in p for p in finding.parameters)  # the file's name is an exporter's
    assert "model.query.weight" in finding.fix.code
    assert "get_parameter" not in finding.fix.code


@pytest.fixture(scope="module")
def zero_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, args = zero_hidden()
    return export_onnx(model, args, tmp_path_factory.mktemp("fix") / "zero.onnx")


def _fix(capsys, *argv: object) -> tuple[int, str]:
    code = main(["fix", *map(str, argv), "--device", "cpu"])
    return code, capsys.readouterr().out


def test_fix_prints_a_short_summary_and_the_table_under_verbose(zero_model, tmp_path,
                                                                capsys) -> None:
    code, out = _fix(capsys, zero_model, "-o", tmp_path / "a.onnx")
    assert code == 0
    assert "act var before" not in out  # no layer table by default
    assert "re-initialised (1 tensor(s)):" in out and "net.2.weight" in out
    assert len(out.splitlines()) < 15, out
    _, verbose = _fix(capsys, zero_model, "-o", tmp_path / "b.onnx", "--verbose")
    assert "act var before" in verbose and "net.4" in verbose


def test_fix_select_and_ignore_choose_what_is_repaired(zero_model, tmp_path, capsys) -> None:
    _, ignored = _fix(capsys, zero_model, "-o", tmp_path / "c.onnx", "--ignore",
                      "zero-weights,dead-gradients,vanishing-gradients")
    assert "re-initialised: nothing" in ignored
    _, selected = _fix(capsys, zero_model, "-o", tmp_path / "d.onnx", "--select", "zero-weights")
    assert "net.2.weight" in selected


def test_fix_emit_code_writes_init_lines_that_repair_the_torch_module(zero_model, tmp_path,
                                                                      capsys) -> None:
    script = tmp_path / "fix_init.py"
    assert _fix(capsys, zero_model, "-o", tmp_path / "e.onnx", "--emit-code", script)[0] == 0
    source = script.read_text()
    assert "nn.init.normal_(model.net[2].weight" in source
    namespace: dict = {}
    exec(compile(source, str(script), "exec"), namespace)  # the file runs as written
    model, _ = zero_hidden()
    namespace["apply_gradprobe_fix"](model)
    weight = model.net[2].weight
    assert weight.abs().sum() > 0
    assert weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.15)  # He for 64 in


def test_fix_reports_only_what_the_repair_uncovered_as_new(zero_model, tmp_path, capsys) -> None:
    _, out = _fix(capsys, zero_model, "-o", tmp_path / "f.onnx")
    # Nothing appears after the fix that was not measured before it, unless labelled as such.
    assert "new after the fix" not in out


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(torch.relu(self.conv(x))))  # one conv, applied twice
        return self.fc(self.fc(y.mean((2, 3))))


def test_shared_tensors_are_one_note_and_ops_are_not_cut(tmp_path, capsys) -> None:
    path = tmp_path / "tied.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(Tied(), (torch.randn(2, 3, 8, 8),)).save(str(path))
    assert main(["lint", str(path), "--input-shape", "2x3x8x8", "--device", "cpu",
                 "--fail-on", "never"]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "read by several layers" in line]
    assert len(notes) == 1 and "2 tensor(s)" in notes[0]
    assert "were one tensor in the file" not in out
    assert "aten::_convolution" in out  # the whole op name, not 'aten::_convo'


def test_an_info_trend_does_not_make_its_layers_deliberate(tmp_path) -> None:
    """Why `fix` once listed 50 tensors as "deliberate (vanishing-activations, info)" and then
    called the dead ReLUs among them unfixable: every tensor of every info finding was
    protected. Only an info about one weight (a deliberate zero or constant start) is."""
    from defects import zero_head

    from gradprobe.diagnostics.loaders import load_model
    from gradprobe.diagnostics.repair import _Plan
    from gradprobe.diagnostics.report import Finding, Severity

    model, args = zero_head()
    path = export_onnx(model, args, tmp_path / "zero_head.onnx")
    report = diagnose(path, DiagnoseOptions(device="cpu"))
    assert any(f.rule == "zero-weights" and f.severity is Severity.INFO for f in report.findings)
    report.findings.append(Finding(rule="vanishing-activations", severity=Severity.INFO,
                                   layer="net.0", parameters=["net.0.weight", "net.2.weight"],
                                   message="a mild drift, judged harmless"))
    plan = _Plan(load_model(path))
    plan.protect(report)
    assert "net.6.weight" in plan.protected  # the deliberate zero head
    assert "net.0.weight" not in plan.protected and "net.2.weight" not in plan.protected
