"""Report, options and rule docs survive the trip through their proto messages exactly."""

from __future__ import annotations

import dataclasses
import math

import pytest
from pydantic import BaseModel

from gradprobe.diagnostics.errors import ConfigError
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.report import (
    ActivationStats,
    Finding,
    Fix,
    GradientStats,
    InputInfo,
    LayerReport,
    ModelInfo,
    ParameterStats,
    Report,
    Severity,
    Summary,
    Timing,
)
from gradprobe.diagnostics.rules.base import RuleDoc
from gradprobe.server import convert
from gradprobe.v1 import report_pb2, service_pb2


def _json_names(model: type[BaseModel]) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


@pytest.mark.parametrize("model, message", [
    (Report, report_pb2.Report), (ModelInfo, report_pb2.ModelInfo),
    (InputInfo, report_pb2.InputInfo), (Finding, report_pb2.Finding), (Fix, report_pb2.Fix),
    (LayerReport, report_pb2.LayerReport), (ActivationStats, report_pb2.ActivationStats),
    (GradientStats, report_pb2.GradientStats), (ParameterStats, report_pb2.ParameterStats),
    (Timing, report_pb2.Timing), (Summary, report_pb2.Summary),
], ids=lambda x: x.__name__)
def test_proto_mirrors_the_report_schema(model, message):
    """A field added to report.py must be added to report.proto (and regenerated) too."""
    assert _json_names(model) == set(message.DESCRIPTOR.fields_by_name)


def test_proto_mirrors_options_and_rule_docs():
    # input_file names a file on the caller's machine: it has no meaning on a server.
    assert _json_names(DiagnoseOptions) - {"input_file"} == set(
        service_pb2.DiagnoseOptions.DESCRIPTOR.fields_by_name)
    assert {f.name for f in dataclasses.fields(RuleDoc)} == set(
        service_pb2.RuleDoc.DESCRIPTOR.fields_by_name)


def _report() -> Report:
    findings = [
        Finding(rule="dead-relu", severity=Severity.ERROR, layer="net.2", nodes=["/net/net.2/Gemm"],
                parameters=["net.2.weight", "net.2.bias"], message="97% of units are never active",
                # key order is deliberately not sorted: the JSON must keep it
                evidence={"dead_units": 0.97, "units": 32, "flag": True, "none": None,
                          "label": "relu", "ratios": [0.5, 1.0, 2.0], "counts": [1, 2, 3],
                          "names": ["a", "b"], "empty": [], "inf": math.inf},
                fix=Fix(init="he_normal", std=0.088, fan_in=256, fan_out=32, bias="zeros",
                        code="nn.init.kaiming_normal_(m.weight, nonlinearity='relu')")),
        Finding(rule="zero-weights", severity=Severity.INFO, layer="head", message="deliberate",
                fix=Fix(advice="nothing to do")),
        Finding(rule="init-scale", severity=Severity.WARNING, layer="a", message="m"),
    ]
    return Report(
        version="0.1.0",
        model=ModelInfo(path="models/m.onnx", format="onnx", sha256="ab" * 32, size_bytes=1234,
                        inputs=[InputInfo(name="x", shape=[8, 16], dtype="float32",
                                          source="declared")],
                        notes=["folded BatchNorm"],
                        shared_parameters={"w": ["net.0.weight", "net.2.weight"], "a": ["b"]}),
        device="cpu", seed=7, findings=findings,
        layers=[
            LayerReport(name="net.0", op="Gemm", node="/net/net.0/Gemm", role="linear",
                        nonlinearity="relu", parameters=["net.0.weight"],
                        activation=ActivationStats(mean=0.1, var=1e-30, min=-3.0, max=math.inf,
                                                   zero_fraction=0.0, dead_units=0.5,
                                                   saturation=0.0, nonfinite=2, units=32,
                                                   numel=256, sample_var=0.25),
                        gradient=GradientStats(norm=1.5, rms=math.nan, nonfinite=0)),
            LayerReport(name="relu", op="Relu", node="n", role="activation"),
        ],
        parameters=[ParameterStats(name="net.0.weight", layer="net.0", shape=[32, 16], mean=0.0,
                                   std=0.1, abs_max=0.3, nonfinite=0, grad_norm=0.0,
                                   grad_rms=0.0, grad_to_weight=math.inf,
                                   zero_grad_fraction=1.0, nonfinite_grad=0, constant=True)],
        timing=Timing(load_s=0.1, probe_s=0.2, rules_s=0.01, total_s=0.31),
        summary=Summary(error=1, warning=1, info=1),
    )


def _comparable(report: Report) -> str:
    # JSON writes NaN/inf as null; the dict form tells them apart too.
    return report.to_json() + repr(report.model_dump())


def test_report_round_trips_exactly():
    report = _report()
    back = convert.report_from_proto(convert.report_to_proto(report))
    assert back.to_json() == report.to_json()
    assert repr(back.model_dump()) == repr(report.model_dump())  # inf/nan, int vs float kept
    assert list(back.findings[0].evidence) == list(report.findings[0].evidence)
    assert back.findings[1].fix is not None and back.findings[2].fix is None
    assert back.model.path == "models/m.onnx"


def test_report_round_trips_through_bytes_and_streamed_findings():
    report = _report()
    wire = report_pb2.Report.FromString(
        convert.report_to_proto(report, with_findings=False).SerializeToString())
    assert len(wire.findings) == 0
    findings = [report_pb2.Finding.FromString(convert.finding_to_proto(f).SerializeToString())
                for f in report.findings]
    assert _comparable(convert.report_from_proto(wire, findings)) == _comparable(report)


def test_null_path_stays_null():
    report = _report()
    report.model.path = None
    assert convert.report_from_proto(convert.report_to_proto(report)).model.path is None


@pytest.mark.parametrize("options", [
    DiagnoseOptions(),
    DiagnoseOptions(input_shapes=[[4, 16], [4, 3]], input_dtypes=["float32", "int64"],
                    batch_size=3, device="cpu", seed=11, select=["dead-relu"],
                    ignore=["init-scale"], severities={"dead-relu": Severity.WARNING},
                    thresholds={"dead-relu": {"share": 0.9}}, format="torchscript"),
    DiagnoseOptions(select=[]),  # selecting no rule is not the same as selecting all
])
def test_options_round_trip(options):
    wire = service_pb2.DiagnoseOptions.FromString(
        convert.options_to_proto(options).SerializeToString())
    assert convert.options_from_proto(wire) == options


def test_auto_device_becomes_server_default():
    wire = convert.options_to_proto(DiagnoseOptions(device="auto"))
    assert convert.options_from_proto(wire, default_device="cpu").device == "cpu"
    assert convert.options_from_proto(service_pb2.DiagnoseOptions()).batch_size == 8


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError, match="batch_size"):
        convert.options_from_proto(service_pb2.DiagnoseOptions(batch_size=0))
    with pytest.raises(ConfigError, match="device"):
        convert.options_from_proto(service_pb2.DiagnoseOptions(device="tpu"))
    with pytest.raises(ConfigError, match="input file"):
        convert.options_to_proto(DiagnoseOptions(input_file="x.npy"))


def test_rule_doc_round_trip():
    doc = RuleDoc(name="dead-relu", severity=Severity.ERROR, summary="s", why="w", example="e",
                  fix="f", thresholds="t", defaults={"share": 0.5, "min_units": 4.0})
    back = convert.rule_doc_from_proto(convert.rule_doc_to_proto(doc))
    assert back == doc and list(back.defaults) == ["share", "min_units"]
