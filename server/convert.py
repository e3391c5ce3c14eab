"""Report, options and rule docs <-> their proto messages.

Both directions are exact: `report_from_proto(report_to_proto(r))` dumps the same JSON as `r`.
The pydantic models stay the one schema; the proto messages only carry them. Client and server
both use this module (it imports no server machinery).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError

from gradprobe.diagnostics import errors as domain_errors
from gradprobe.diagnostics.errors import ConfigError, GradprobeError
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.report import (
    ActivationStats,
    EvidenceValue,
    Finding,
    GradientStats,
    ParameterStats,
    Report,
    Severity,
    Summary,
    Timing,
)
from gradprobe.v1 import report_pb2 as pb
from gradprobe.v1 import service_pb2 as spb

if TYPE_CHECKING:  # importing the rules package imports every rule, and torch with them
    from gradprobe.diagnostics.rules.base import RuleDoc

_SEVERITY_TO_PB = {
    Severity.INFO: pb.SEVERITY_INFO,
    Severity.WARNING: pb.SEVERITY_WARNING,
    Severity.ERROR: pb.SEVERITY_ERROR,
}
_SEVERITY_FROM_PB = {v: k for k, v in _SEVERITY_TO_PB.items()}
_FORMAT_TO_PB = {
    None: pb.MODEL_FORMAT_UNSPECIFIED,
    "onnx": pb.MODEL_FORMAT_ONNX,
    "torchscript": pb.MODEL_FORMAT_TORCHSCRIPT,
    "pt2": pb.MODEL_FORMAT_PT2,
    "pytorch": pb.MODEL_FORMAT_PYTORCH,
}
_FORMAT_FROM_PB = {v: k for k, v in _FORMAT_TO_PB.items()}


def severity_from_proto(value: int) -> Severity:
    try:
        return _SEVERITY_FROM_PB[value]
    except KeyError:
        raise ConfigError(f"unknown severity {value} in request") from None


def format_to_proto(fmt: str | None) -> int:
    return _FORMAT_TO_PB[fmt]


def format_from_proto(value: int) -> str | None:
    fmt = _FORMAT_FROM_PB.get(value)
    if fmt is None and value != pb.MODEL_FORMAT_UNSPECIFIED or fmt == "pytorch":
        raise ConfigError(f"unknown model format {value} in request")  # pytorch: no file
    return fmt


def rebuild_error(class_name: str, message: str) -> GradprobeError:
    """A GradprobeError that crossed a process or network boundary as (class name, message),
    as the same class again (the base class when the name is not one of ours)."""
    cls = getattr(domain_errors, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, GradprobeError)):
        cls = GradprobeError
    exc = cls.__new__(cls)
    GradprobeError.__init__(exc, message)  # subclasses' own __init__ take other arguments
    return exc


# --- evidence ---------------------------------------------------------------------------------

def _evidence_to_proto(value: EvidenceValue) -> pb.EvidenceValue:
    msg = pb.EvidenceValue()
    # bool before int: bool is an int subclass, and the JSON tells them apart.
    if value is None:
        pass
    elif isinstance(value, bool):
        msg.flag = value
    elif isinstance(value, int):
        msg.integer = value
    elif isinstance(value, float):
        msg.number = value
    elif isinstance(value, str):
        msg.text = value
    elif isinstance(value, list):
        if value and all(isinstance(v, str) for v in value):
            msg.texts.values.extend(value)
        elif value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            msg.integers.values.extend(value)
        else:
            msg.numbers.SetInParent()
            msg.numbers.values.extend(float(v) for v in value)
    else:
        raise TypeError(f"evidence value of type {type(value).__name__} has no proto form")
    return msg


def _evidence_from_proto(msg: pb.EvidenceValue) -> EvidenceValue:
    kind = msg.WhichOneof("kind")
    if kind is None:
        return None
    if kind in ("numbers", "integers", "texts"):
        return list(getattr(msg, kind).values)
    return getattr(msg, kind)


# --- findings and report ----------------------------------------------------------------------

def _optional(msg, field: str):
    return getattr(msg, field) if msg.HasField(field) else None


def finding_to_proto(finding: Finding) -> pb.Finding:
    msg = pb.Finding(
        rule=finding.rule,
        severity=_SEVERITY_TO_PB[finding.severity],
        layer=finding.layer,
        nodes=finding.nodes,
        parameters=finding.parameters,
        message=finding.message,
        evidence=[pb.EvidenceEntry(key=k, value=_evidence_to_proto(v))
                  for k, v in finding.evidence.items()],
    )
    if finding.fix is not None:
        fix = finding.fix
        msg.fix.SetInParent()
        for name in ("init", "gain", "std", "bound", "fan_in", "fan_out", "bias"):
            value = getattr(fix, name)
            if value is not None:
                setattr(msg.fix, name, value)
        msg.fix.code = fix.code
        msg.fix.advice = fix.advice
    return msg


def finding_from_proto(msg: pb.Finding) -> Finding:
    return Finding.model_validate(_finding_dict(msg))


def _finding_dict(msg: pb.Finding) -> dict:
    fix = None
    if msg.HasField("fix"):
        f = msg.fix
        fix = {name: _optional(f, name)
               for name in ("init", "gain", "std", "bound", "fan_in", "fan_out", "bias")}
        fix.update(code=f.code, advice=f.advice)
    return {
        "rule": msg.rule,
        "severity": severity_from_proto(msg.severity),
        "layer": msg.layer,
        "nodes": list(msg.nodes),
        "parameters": list(msg.parameters),
        "message": msg.message,
        "evidence": {e.key: _evidence_from_proto(e.value) for e in msg.evidence},
        "fix": fix,
    }


def _fields(msg, model: type[BaseModel]) -> dict:
    """The flat fields of a statistics message, by the pydantic model's field names (the proto
    mirrors them one to one; tests/test_server_convert.py checks that it does)."""
    return {n: (list(v) if not isinstance(v := getattr(msg, n), int | float | str) else v)
            for n in model.model_fields}


def report_to_proto(report: Report, *, with_findings: bool = True) -> pb.Report:
    """The whole report; `with_findings=False` leaves the findings out (a Diagnose stream sends
    them as events of their own before the report)."""
    model = report.model
    msg = pb.Report(
        schema=report.schema_,
        version=report.version,
        device=report.device,
        seed=report.seed,
        model=pb.ModelInfo(
            format=_FORMAT_TO_PB[model.format],
            sha256=model.sha256,
            size_bytes=model.size_bytes,
            inputs=[pb.InputInfo(name=i.name, shape=i.shape, dtype=i.dtype, source=i.source)
                    for i in model.inputs],
            notes=model.notes,
            shared_parameters=[pb.SharedParameter(name=k, aliases=v)
                               for k, v in model.shared_parameters.items()],
        ),
        findings=[finding_to_proto(f) for f in report.findings] if with_findings else [],
        parameters=[pb.ParameterStats(**p.model_dump()) for p in report.parameters],
        timing=pb.Timing(**report.timing.model_dump()),
        summary=pb.Summary(**report.summary.model_dump()),
    )
    if model.path is not None:
        msg.model.path = model.path
    for layer in report.layers:
        out = msg.layers.add(name=layer.name, op=layer.op, node=layer.node, role=layer.role,
                             parameters=layer.parameters)
        if layer.nonlinearity is not None:
            out.nonlinearity = layer.nonlinearity
        if layer.activation is not None:
            out.activation.CopyFrom(pb.ActivationStats(**layer.activation.model_dump()))
        if layer.gradient is not None:
            out.gradient.CopyFrom(pb.GradientStats(**layer.gradient.model_dump()))
    return msg


def report_from_proto(msg: pb.Report, findings: Iterable[pb.Finding] | None = None) -> Report:
    """Rebuild the pydantic report; `findings` replaces the message's own (stream events)."""
    found = msg.findings if findings is None else findings
    model = msg.model
    data = {
        "schema": msg.schema,
        "version": msg.version,
        "device": msg.device,
        "seed": msg.seed,
        "model": {
            "path": _optional(model, "path"),
            "format": _FORMAT_FROM_PB.get(model.format),
            "sha256": model.sha256,
            "size_bytes": model.size_bytes,
            "inputs": [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype,
                        "source": i.source} for i in model.inputs],
            "notes": list(model.notes),
            "shared_parameters": {s.name: list(s.aliases) for s in model.shared_parameters},
        },
        "findings": [_finding_dict(f) for f in found],
        "layers": [
            {
                "name": layer.name, "op": layer.op, "node": layer.node, "role": layer.role,
                "nonlinearity": _optional(layer, "nonlinearity"),
                "parameters": list(layer.parameters),
                "activation": (_fields(layer.activation, ActivationStats)
                               if layer.HasField("activation") else None),
                "gradient": (_fields(layer.gradient, GradientStats)
                             if layer.HasField("gradient") else None),
            }
            for layer in msg.layers
        ],
        "parameters": [_fields(p, ParameterStats) for p in msg.parameters],
        "timing": _fields(msg.timing, Timing),
        "summary": _fields(msg.summary, Summary),
    }
    return Report.model_validate(data)


# --- options ----------------------------------------------------------------------------------

def options_to_proto(options: DiagnoseOptions) -> spb.DiagnoseOptions:
    if options.input_file is not None:
        raise ConfigError(
            f"input file {options.input_file} cannot be used with a server: "
            "the server probes with its synthetic batch only"
        )
    msg = spb.DiagnoseOptions(
        batch_size=options.batch_size,
        device=options.device,
        seed=options.seed,
        ignore=options.ignore,
        severities={k: _SEVERITY_TO_PB[v] for k, v in options.severities.items()},
        thresholds={k: spb.Thresholds(values=v) for k, v in options.thresholds.items()},
        format=_FORMAT_TO_PB[options.format],
    )
    if options.input_shapes is not None:
        msg.input_shapes.SetInParent()
        msg.input_shapes.shapes.extend(spb.Shape(dims=s) for s in options.input_shapes)
    if options.input_dtypes is not None:
        msg.input_dtypes.SetInParent()
        msg.input_dtypes.values.extend(options.input_dtypes)
    if options.select is not None:
        msg.select.SetInParent()
        msg.select.values.extend(options.select)
    return msg


def options_from_proto(msg: spb.DiagnoseOptions, *, default_device: str = "auto"
                       ) -> DiagnoseOptions:
    """Request options -> DiagnoseOptions; an unset or "auto" device becomes the server's
    default. Bad values raise ConfigError naming the field."""
    data: dict = {
        "device": default_device if msg.device in ("", "auto") else msg.device,
        "seed": msg.seed,
        "ignore": list(msg.ignore),
        "severities": {k: severity_from_proto(v) for k, v in msg.severities.items()},
        "thresholds": {k: dict(v.values) for k, v in msg.thresholds.items()},
        "format": format_from_proto(msg.format),
    }
    if msg.HasField("batch_size"):
        data["batch_size"] = msg.batch_size
    if msg.HasField("input_shapes"):
        data["input_shapes"] = [list(s.dims) for s in msg.input_shapes.shapes]
    if msg.HasField("input_dtypes"):
        data["input_dtypes"] = list(msg.input_dtypes.values)
    if msg.HasField("select"):
        data["select"] = list(msg.select.values)
    try:
        return DiagnoseOptions.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "options"
        raise ConfigError(f"bad option {where}: {err['msg']}") from None


# --- rule docs --------------------------------------------------------------------------------

def rule_doc_to_proto(doc: RuleDoc) -> spb.RuleDoc:
    return spb.RuleDoc(
        name=doc.name, severity=_SEVERITY_TO_PB[doc.severity], summary=doc.summary, why=doc.why,
        example=doc.example, fix=doc.fix, thresholds=doc.thresholds,
        defaults=[spb.ThresholdDefault(name=k, value=v) for k, v in doc.defaults.items()],
    )


def rule_doc_from_proto(msg: spb.RuleDoc) -> RuleDoc:
    from gradprobe.diagnostics.rules.base import RuleDoc

    return RuleDoc(
        name=msg.name, severity=severity_from_proto(msg.severity), summary=msg.summary,
        why=msg.why, example=msg.example, fix=msg.fix, thresholds=msg.thresholds,
        defaults={d.name: d.value for d in msg.defaults},
    )

