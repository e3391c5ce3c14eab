"""Realistic `Report` objects built by hand, for output-format tests that must not depend on the
engine: a 12-layer ReLU MLP whose activations fade with depth (a vanishing-activations warning,
a dead ReLU and a zero bias note), and a healthy model with no findings."""

from __future__ import annotations

import math

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


def _layers(depth: int, decay: float, prefix: str = "net") -> list[LayerReport]:
    layers = []
    for i in range(depth):
        var = decay ** i
        layers.append(LayerReport(
            name=f"{prefix}.{2 * i}", op="Gemm", node=f"/{prefix}/{prefix}.{2 * i}/Gemm",
            role="linear", nonlinearity="relu", parameters=[f"{prefix}.{2 * i}.weight"],
            activation=ActivationStats(
                mean=0.0, var=var, min=-3 * math.sqrt(var), max=3 * math.sqrt(var),
                zero_fraction=0.0, dead_units=0.0, saturation=0.0, nonfinite=0, units=32,
                numel=256, sample_var=var),
            gradient=GradientStats(norm=1e-3 * (1.6 ** i), rms=1e-4 * (1.6 ** i), nonfinite=0),
        ))
    # A layer the probe could not measure (no activation): the plots must skip it, not crash.
    layers.append(LayerReport(name=f"{prefix}.head", op="Identity", node="/head/Identity",
                              role="other"))
    return layers


def _parameters(layers: list[LayerReport]) -> list[ParameterStats]:
    return [ParameterStats(
        name=layer.parameters[0], layer=layer.name, shape=[32, 32], mean=0.0, std=0.05,
        abs_max=0.2, nonfinite=0, grad_norm=0.01, grad_rms=0.001, grad_to_weight=0.01,
        zero_grad_fraction=0.0, nonfinite_grad=0, constant=False) for layer in layers if layer.parameters]


def _summary(findings: list[Finding]) -> Summary:
    counts = {s.value: 0 for s in Severity}
    for f in findings:
        counts[f.severity.value] += 1
    return Summary(**counts)


def report(path: str = "models/mlp.onnx", *, findings: list[Finding] | None = None,
           decay: float = 0.3, depth: int = 12) -> Report:
    layers = _layers(depth, decay)
    if findings is None:
        findings = sample_findings()
    return Report(
        version="0.1.0",
        model=ModelInfo(path=path, format="onnx", sha256="ab" * 32, size_bytes=12345,
                        inputs=[InputInfo(name="input0", shape=[8, 32], dtype="float32",
                                          source="declared")],
                        notes=["legacy exporter folded BatchNorm into Conv"]),
        device="cpu", seed=0, findings=findings, layers=layers,
        parameters=_parameters(layers),
        timing=Timing(load_s=0.05, probe_s=0.2, rules_s=0.01, total_s=0.26),
        summary=_summary(findings),
    )


def sample_findings() -> list[Finding]:
    return [
        Finding(rule="vanishing-activations", severity=Severity.WARNING, layer="net.8",
                nodes=["/net/net.8/Gemm"], parameters=["net.8.weight"],
                message="activation variance falls 0.3x per layer: 1.9e-05 at net.8",
                evidence={"ratio_per_layer": 0.3, "variance": 1.9e-05},
                fix=Fix(init="he_normal", std=0.25, fan_in=32, fan_out=32,
                        code="nn.init.kaiming_normal_(net[8].weight, nonlinearity='relu')")),
        Finding(rule="dead-relu", severity=Severity.ERROR, layer="net.4",
                nodes=["/net/net.4/Gemm", "/net/net.5/Relu"],
                parameters=["net.4.weight", "net.4.bias"],
                message="97% of units are never active",
                evidence={"dead_units": 0.97},
                fix=Fix(bias="zeros", advice="reset the bias to 0 or use LeakyReLU",
                        code="nn.init.zeros_(net[4].bias)")),
        Finding(rule="zero-weights", severity=Severity.INFO, layer="net.head",
                parameters=["net.head.weight"],
                message="zero-initialised head: deliberate, gradients still flow"),
    ]


def hostile_report() -> Report:
    """Model-provided strings with markup, quotes, commas, colons, percent signs and newlines."""
    nasty = 'blk<script>alert("x")</script>,a:b%25\r\n&amp;'
    finding = Finding(rule="dead-relu", severity=Severity.ERROR, layer=nasty, nodes=[nasty],
                      parameters=[nasty + ".weight"], message=f"layer {nasty} is dead: 100%",
                      fix=Fix(code=f"nn.init.zeros_({nasty})", advice="<b>reset</b>"))
    rep = report(path="weird dir/m,o:d%el<1>.onnx", findings=[finding], depth=3)
    rep.layers[0].name = nasty
    return rep



def rule_catalogue() -> list:
    """The documentation of every registered rule, as the formats list it."""
    from gradprobe.diagnostics.rules import all_rules

    return [rule.doc() for rule in all_rules()]
