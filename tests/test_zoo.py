"""Real architectures: never a false alarm on healthy ones, the right rule and layer on planted
defects — across TorchScript (traced, scripted) and ONNX (legacy eval export with folded
BatchNorm, legacy training-mode export with BatchNorm nodes, dynamo export).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import zoo
from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.report import Report

pytestmark = pytest.mark.slow

EXPORTS = ("traced", "scripted", "onnx_folded", "onnx_bn", "onnx_dynamo")


def export(model: nn.Module, args: tuple[torch.Tensor, ...], root: Path, stem: str, how: str) -> tuple[Path, DiagnoseOptions]:
    if how in ("traced", "scripted"):
        path = zoo.export_torchscript(model, args, root / f"{stem}.{how}.pt", scripted=how == "scripted")
        dtypes = [str(a.dtype).removeprefix("torch.") for a in args]
        return path, DiagnoseOptions(device="cpu", input_shapes=[list(a.shape) for a in args],
                                     input_dtypes=dtypes)
    path = root / f"{stem}.{how}.onnx"
    zoo.export_onnx(model, args, path, dynamo=how == "onnx_dynamo", train_bn=how == "onnx_bn")
    return path, DiagnoseOptions(device="cpu", batch_size=args[0].shape[0])


@pytest.fixture(scope="module")
def lint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Report]:
    cache: dict[tuple[str, str], Report] = {}
    root = tmp_path_factory.mktemp("zoo")

    def run(name: str, how: str, build: Callable[[], nn.Module] | None = None) -> Report:
        if (name, how) not in cache:
            model = build() if build else zoo.build(name)
            # Planted defects are named `<architecture>_<defect>` and take its inputs.
            args = zoo.example_inputs(name.split("_")[0] if build else name, batch=8)
            try:
                path, options = export(model, args, root, name, how)
            except Exception as exc:  # an exporter limitation, not ours
                pytest.skip(f"{how} export of {name} is not possible here: {type(exc).__name__}")
            cache[(name, how)] = diagnose(path, options)
        return cache[(name, how)]

    return run


def serious(report: Report) -> list[str]:
    return [f"{f.severity.value} {f.rule} {f.layer}: {f.message}" for f in report.findings
            if f.severity.value != "info"]


HEALTHY = [(name, how) for name in ("mlp", "resnet", "mobilenet", "vit", "text_encoder", "lstm", "gru",
                                    "vit_timm", "text_encoder_bert")
           for how in EXPORTS
           if how in ("traced", "onnx_folded") or not name.endswith(("_timm", "_bert"))
           # scripting needs the module's code, and the dynamo exporter takes ~10 s a model on two
           # slow cores: one real case per family is enough there.
           if how != "scripted" or name in ("mlp", "resnet", "lstm")
           if how != "onnx_dynamo" or name in ("resnet", "vit", "text_encoder", "lstm")]


@pytest.mark.parametrize(("name", "how"), HEALTHY)
def test_healthy_architecture_has_no_warning_or_error(lint, name, how):
    report = lint(name, how)
    assert serious(report) == []
    assert report.layers and all(lp.activation is not None for lp in report.layers
                                 if lp.role == "linear")


@pytest.mark.parametrize("how", ["traced", "onnx_folded", "onnx_bn", "onnx_dynamo"])
def test_layer_names_are_the_module_paths(lint, how):
    names = {layer.name for layer in lint("resnet", how).layers}
    assert {"conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.downsample.0", "fc"} <= names
    names = {layer.name for layer in lint("text_encoder", how if how != "onnx_bn" else "onnx_folded").layers}
    assert {"embed", "encoder.layers.1.linear1", "encoder.layers.1.linear2", "out"} <= names


@pytest.mark.parametrize("how", ["traced", "onnx_folded", "onnx_bn", "onnx_dynamo"])
def test_zero_init_residual_is_deliberate(lint, how):
    report = lint("resnet_zero_residual", how)
    assert serious(report) == []
    zeros = [f for f in report.findings if f.rule == "zero-weights"]
    # Four blocks: the zero BN gamma, or (folded at export) the all-zero conv2 it became.
    assert len(zeros) == 4 and {f.severity.value for f in zeros} == {"info"}
    assert all(f.layer.endswith(("bn2", "conv2")) for f in zeros)


@pytest.mark.parametrize("how", ["traced", "onnx_folded", "onnx_dynamo"])
def test_zero_classification_head_is_deliberate(lint, how):
    report = lint("vit_zero_head", how)
    assert serious(report) == []
    assert [(f.rule, f.layer, f.severity.value) for f in report.findings] == [
        ("zero-weights", "head", "info")]
    # Gradient flow past the zero head is still measured: the patch embedding trains.
    patch = next(p for p in report.parameters if p.name.startswith("patch_embed") and p.shape[0] == 32
                 and len(p.shape) == 4)
    assert patch.grad_norm > 0


# --- planted defects in a real ResNet -------------------------------------------------------

def resnet_with(edit: Callable[[zoo.ResNet], None]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = zoo.build("resnet")
        with torch.no_grad():
            edit(model)
        return model
    return build


PLANTED: dict[str, Callable[[zoo.ResNet], None]] = {
    "zero_branch_conv": lambda m: m.layer1[0].conv1.weight.zero_(),
    "nan_conv": lambda m: m.layer2[0].conv1.weight.view(-1)[7].fill_(math.nan),
    "dead_bn_shift": lambda m: m.layer1[1].bn1.bias.fill_(-10.0),
    "large_conv": lambda m: m.layer2[1].conv1.weight.mul_(10.0),
}


@pytest.mark.parametrize("how", ["traced", "onnx_folded", "onnx_bn", "onnx_dynamo"])
def test_zeroed_conv_inside_a_residual_branch_is_an_error(lint, how):
    report = lint("resnet_zero_branch_conv", how, resnet_with(PLANTED["zero_branch_conv"]))
    errors = [f for f in report.findings if f.severity.value == "error"]
    assert [(f.rule, f.layer) for f in errors] == [("zero-weights", "layer1.0.conv1")]
    assert errors[0].fix.init == "he_normal" and errors[0].fix.fan_in == 8 * 9


@pytest.mark.parametrize("how", ["traced", "onnx_folded", "onnx_bn"])
def test_nan_in_one_conv(lint, how):
    report = lint("resnet_nan_conv", how, resnet_with(PLANTED["nan_conv"]))
    found = [(f.rule, f.layer) for f in report.findings if f.severity.value == "error"]
    assert found == [("nonfinite-weights", "layer2.0.conv1")]


@pytest.mark.parametrize("how", ["traced", "onnx_folded", "onnx_bn"])
def test_dead_relu_from_a_negative_batchnorm_shift(lint, how):
    report = lint("resnet_dead_bn_shift", how, resnet_with(PLANTED["dead_bn_shift"]))
    dead = [f for f in report.findings if f.rule == "dead-relu" and f.severity.value == "error"]
    assert len(dead) == 1 and dead[0].evidence["dead_units"] == 1.0
    assert dead[0].layer.startswith("layer1.1.relu") and "layer1.1.conv1" in dead[0].message
    assert dead[0].evidence["bias_mean"] == pytest.approx(-10, rel=0.01)
    if how != "onnx_folded":  # folded at export, the shift became the conv's own bias
        assert "layer1.1.bn1.bias" in dead[0].parameters
        assert "zeros_(model.layer1[1].bn1.bias)" in dead[0].fix.code
    assert [f for f in serious(report) if "dead-relu" not in f] == []


@pytest.mark.parametrize("how", ["traced", "onnx_bn"])
def test_oversized_conv_behind_batchnorm_trains_slower(lint, how):
    """Behind BatchNorm 10x He std leaves the forward unchanged; |g|/|w| shows ~100x slower."""
    report = lint("resnet_large_conv", how, resnet_with(PLANTED["large_conv"]))
    found = [f for f in report.findings if f.rule == "init-scale"]
    assert [f.layer for f in found] == ["layer2.1.conv1"]
    assert found[0].evidence["relative_update"] < 1 / 30
    assert [f for f in serious(report) if "init-scale" not in f] == []
