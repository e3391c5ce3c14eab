"""Each rule against a model that must fire it and one that must not, in both file formats.

The models are real torch modules exported by the test (legacy ONNX exporter and traced
TorchScript); the assertions name the rule, the severity and the layer the user wrote.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from defects import DEFECTS
from zoo import export_onnx, export_torchscript

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.report import Report

FORMATS = ("onnx", "torchscript")


@pytest.fixture(scope="module")
def lint(tmp_path_factory: pytest.TempPathFactory):
    """lint(defect, fmt) -> Report, exporting each (defect, format) once per module."""
    cache: dict[tuple[str, str], Report] = {}
    root = tmp_path_factory.mktemp("rules")

    def run(name: str, fmt: str) -> Report:
        if (name, fmt) not in cache:
            model, args = DEFECTS[name]()
            if fmt == "onnx":
                path = export_onnx(model, args, root / f"{name}.onnx")
                options = DiagnoseOptions(device="cpu")
            else:
                path = export_torchscript(model, args, root / f"{name}.pt")
                options = DiagnoseOptions(device="cpu",
                                          input_shapes=[list(a.shape) for a in args])
            cache[(name, fmt)] = diagnose(path, options)
        return cache[(name, fmt)]

    return run


def fired(report: Report, rule: str, severity: str | None = None) -> list:
    return [f for f in report.findings if f.rule == rule and (severity is None or f.severity.value == severity)]


def serious(report: Report) -> list:
    return [f for f in report.findings if f.severity.value in ("error", "warning")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_healthy_mlp_is_clean(lint, fmt):
    assert serious(lint("healthy_mlp", fmt)) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_hidden_layer_is_an_error_naming_the_layer(lint, fmt):
    report = lint("zero_hidden", fmt)
    found = fired(report, "zero-weights", "error")
    assert [f.layer for f in found] == ["net.2"]
    fix = found[0].fix
    assert fix.init == "he_normal" and fix.fan_in == 64
    assert fix.std == pytest.approx((2 / 64) ** 0.5)
    assert "kaiming_normal_(model.net[2].weight" in fix.code


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_head_is_deliberate_and_gradient_flow_is_still_measured(lint, fmt):
    report = lint("zero_head", fmt)
    assert serious(report) == []
    assert [f.layer for f in fired(report, "zero-weights", "info")] == ["net.6"]
    # The zero head blocks every upstream gradient at step 0; the flow pass sees past it.
    assert any("textbook init" in note for note in report.model.notes)
    first = next(p for p in report.parameters if p.name.endswith("net.0.weight") or p.layer == "net.0")
    assert first.grad_norm > 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_constant_weights_with_identical_unit_gradients(lint, fmt):
    report = lint("constant_hidden", fmt)
    errors = fired(report, "constant-weights", "error")
    assert [f.layer for f in errors] == ["net.0"]
    assert errors[0].evidence["unit_grad_spread"] <= 1e-6
    # net.2 is constant too: its units get distinct gradients from the random net.4, but the
    # matrix starts rank-1 (every unit the same function), so it is still a warning.
    assert [f.layer for f in fired(report, "constant-weights", "warning")] == ["net.2"]
    assert "rank-1" in fired(report, "constant-weights", "warning")[0].message


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_weight_names_the_parameter_and_only_that(lint, fmt):
    report = lint("nan_weight", fmt)
    found = fired(report, "nonfinite-weights")
    assert len(found) == 1 and found[0].layer == "net.2"
    assert found[0].evidence["nonfinite"] == 1
    assert fired(report, "nonfinite-values") == []  # explained by the weight
    assert {f.rule for f in serious(report)} == {"nonfinite-weights"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_from_an_operation_is_located(lint, fmt):
    report = lint("nan_from_sqrt", fmt)
    found = fired(report, "nonfinite-values", "error")
    assert len(found) == 1
    assert found[0].layer == "fc2" and "fc1" in found[0].message
    assert fired(report, "nonfinite-weights") == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_init_scale_fires_on_the_oversized_layer_only(lint, fmt):
    report = lint("large_init", fmt)
    found = fired(report, "init-scale")
    assert [f.layer for f in found] == ["net.2"]
    assert found[0].evidence["variance_ratio"] == pytest.approx(100, rel=0.5)
    assert found[0].fix.init == "he_normal"


@pytest.mark.parametrize("fmt", FORMATS)
def test_init_scale_fires_on_an_undersized_layer(lint, fmt):
    report = lint("small_init", fmt)
    found = fired(report, "init-scale")
    assert [f.layer for f in found] == ["net.2"]
    assert found[0].evidence["variance_ratio"] == pytest.approx(0.0025, rel=0.5)
    assert found[0].evidence["carried"] < 0.2


@pytest.mark.parametrize("fmt", FORMATS)
def test_dead_relu_after_negative_bias(lint, fmt):
    report = lint("dead_relu", fmt)
    found = fired(report, "dead-relu", "error")
    assert len(found) == 1
    f = found[0]
    assert f.evidence["dead_units"] == 1.0 and f.evidence["bias_mean"] == pytest.approx(-10)
    assert "net.2" in f.message and "net.2.bias" in f.parameters
    assert f.fix.bias == "zeros" and "zeros_(model.net[2].bias)" in f.fix.code


@pytest.mark.parametrize("fmt", FORMATS)
def test_saturated_tanh_and_its_xavier_twin(lint, fmt):
    report = lint("saturated_tanh", fmt)
    found = fired(report, "saturated-activation")
    assert [f.layer for f in found] == ["net.1", "net.3", "net.5"]
    assert all(f.evidence["saturation"] > 0.5 for f in found)
    assert found[0].fix.init == "xavier_uniform" and found[0].fix.gain == pytest.approx(5 / 3)
    # The linear head after the last tanh is 8x Xavier's std: no saturation to show it, but the
    # output variance does.
    head = [f for f in fired(report, "init-scale") if f.layer == "net.6"]
    assert head and head[0].fix.init == "xavier_uniform" and head[0].fix.gain == 1.0
    assert serious(lint("healthy_tanh", fmt)) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_sigmoid_stack_vanishes_gradients(lint, fmt):
    found = fired(lint("sigmoid_stack", fmt), "vanishing-gradients")
    assert len(found) == 1 and found[0].layer == "net.0"
    assert found[0].severity.value == "warning"
    assert found[0].evidence["early_to_late"] < 1e-3
    # A Xavier re-init keeps the sigmoids and trains no better: the fix is architectural.
    assert found[0].fix.init is None and "ReLU" in found[0].fix.advice


@pytest.mark.parametrize("fmt", FORMATS)
def test_masked_branch_has_dead_gradients(lint, fmt):
    report = lint("masked_branch", fmt)
    dead = {p for f in fired(report, "dead-gradients") for p in f.parameters}
    assert {"fc3.weight", "fc3.bias"} <= dead
    assert not dead & {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_seed_example_40_layer_identity_chain(lint, fmt):
    """The seed example: W = 1.5 I explodes, W = 0.5 I vanishes, W = I is healthy."""
    up = lint("chain_1.5", fmt)
    assert fired(up, "exploding-activations", "error")
    assert fired(up, "exploding-gradients", "error")
    assert not fired(up, "vanishing-activations")
    down = lint("chain_0.5", fmt)
    assert fired(down, "vanishing-activations", "error")
    # Never an error: a re-init cannot promise to fix every vanishing gradient (training check).
    assert fired(down, "vanishing-gradients", "warning")
    per_layer = fired(down, "vanishing-activations")[0].evidence["per_layer_factor"]
    assert per_layer == pytest.approx(0.25, rel=0.05)
    assert serious(lint("chain_1.0", fmt)) == []


def test_report_is_deterministic_for_a_seed(lint, tmp_path: Path):
    from defects import zero_hidden

    model, args = zero_hidden()
    path = export_onnx(model, args, tmp_path / "m.onnx")
    a = diagnose(path, DiagnoseOptions(device="cpu", seed=3))
    b = diagnose(path, DiagnoseOptions(device="cpu", seed=3))
    assert [f.model_dump() for f in a.findings] == [f.model_dump() for f in b.findings]
    assert a.layers == b.layers
