"""torch.export archives (.pt2): CLI, library and service, shapes from the program itself, and
the operator allowlist on every node of the exported graph."""

from __future__ import annotations

import json

import pytest
import torch
from defects import DEFECTS
from server_harness import shared_server
from zoo import build, example_inputs

import gradprobe
from gradprobe.client.cli import main
from gradprobe.client.remote import diagnose_remote
from gradprobe.diagnostics.errors import ModelLoadError, UnsupportedOperator


def _save(model: torch.nn.Module, args: tuple, path) -> str:
    torch.export.save(torch.export.export(model.eval(), args), str(path))
    return str(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    model, x = DEFECTS["zero_hidden"]()
    return _save(model, x, tmp_path_factory.mktemp("pt2") / "zero_hidden.pt2"), model, x


def test_cli_lints_a_pt2_without_input_shapes(planted, capsys):
    path, _, _ = planted
    code = main(["lint", path, "--format", "json"])
    report = json.loads(capsys.readouterr().out)
    report = report[0] if isinstance(report, list) else report
    assert code == 1 and report["model"]["format"] == "pt2"
    assert report["model"]["inputs"][0] == {"name": "x", "shape": [8, 32], "dtype": "float32",
                                            "source": "declared"}
    assert ("zero-weights", "net.2") in {(f["rule"], f["layer"]) for f in report["findings"]}


def test_library_findings_match_the_live_module(planted):
    path, model, x = planted
    keys = {(f.rule, f.layer, f.severity) for f in gradprobe.diagnose(model, x).findings}
    with open(path, "rb") as file:
        from_bytes = gradprobe.diagnose(file.read())
    assert {(f.rule, f.layer, f.severity) for f in from_bytes.findings} == keys


@pytest.mark.slow
def test_service_lints_a_pt2(planted):
    path, _, _ = planted
    server = shared_server()
    server.wait_for_workers(1)
    remote = diagnose_remote(path, None, server=server.address, token=None, tls_ca=None,
                             timeout_s=120)
    assert remote.model.format == "pt2"
    assert ("zero-weights", "net.2") in {(f.rule, f.layer) for f in remote.findings}


@torch.library.custom_op("gradprobe_test::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_double.register_fake
def _(x):
    return torch.empty_like(x)


class WithCustomOp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _double(self.fc(x))


def test_custom_operator_is_refused_by_name(tmp_path):
    path = _save(WithCustomOp(), (torch.randn(2, 4),), tmp_path / "custom.pt2")
    with pytest.raises(UnsupportedOperator, match="gradprobe_test::double"):
        gradprobe.diagnose(path)
    program = torch.export.export(WithCustomOp(), (torch.randn(2, 4),))
    with pytest.raises(UnsupportedOperator, match="gradprobe_test::double"):
        gradprobe.diagnose(program)


def test_exported_program_takes_its_own_example_inputs():
    program = torch.export.export(build("mlp").eval(), example_inputs("mlp"))
    report = gradprobe.diagnose(program)
    assert report.model.format == "pt2"
    assert [lr.name for lr in report.layers] == ["net.0", "net.1", "net.2", "net.3", "net.4"]


def test_broken_archive_is_a_load_error(tmp_path, planted):
    path, _, _ = planted
    data = open(path, "rb").read()
    broken = tmp_path / "broken.pt2"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        gradprobe.diagnose(broken)
