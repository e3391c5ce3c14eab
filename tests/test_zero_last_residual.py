"""A residual branch whose last layer starts at zero (BatchNorm scale 0, as timm's
`zero_init_last` and torchvision's `zero_init_residual` do) stays silent when an eval-mode ONNX
export folds that BatchNorm into its convolution: the folded weight is exactly zero, the branch's
activation of it is zero for every sample, and the block's output is the shortcut, with no
activation after the add for the probe to see (DarkNet/CSP blocks), or a squeeze-excite whose
projections are fed the pooled zero (SE-ResNet), or an ECA gate whose Conv1d slides across the
pooled zero channels (timm's ECA-ResNets). A zeroed FIRST layer of the branch is still an
error: the layer after it is fed nothing."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.loaders import load_model
from gradprobe.diagnostics.options import DiagnoseOptions


def conv_bn_act(c_in: int, c_out: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(pooled))))


class EfficientChannelAttention(nn.Module):
    """timm's EcaModule: a Conv1d across the pooled channels, one kernel for all of them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean((2, 3)).view(x.shape[0], 1, -1)
        return x * torch.sigmoid(self.conv(pooled)).view(x.shape[0], -1, 1, 1)


GATES = {"plain": lambda c: nn.Identity(), "squeeze-excite": SqueezeExcite,
         "eca": lambda c: EfficientChannelAttention()}


class Block(nn.Module):
    """DarkNet's residual block: x + conv2(conv1(x)), nothing after the add; with a gate, the
    branch ends in a squeeze-excite (SE-ResNet) or ECA (ECA-ResNet), which sees the pooled
    zero."""

    def __init__(self, c: int, gate: str = "plain") -> None:
        super().__init__()
        self.conv1 = conv_bn_act(c, c // 2, 1)
        self.conv2 = conv_bn_act(c // 2, c)
        nn.init.zeros_(self.conv2[1].weight)  # zero-init last
        self.se = GATES[gate](c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.se(self.conv2(self.conv1(x)))


def darknet_like(gate: str = "plain") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(conv_bn_act(3, 16), Block(16, gate), conv_bn_act(16, 32), Block(32, gate),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def export(net: nn.Module, how: str, path) -> None:  # noqa: ANN001
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "onnx":
            torch.onnx.export(net, (x,), str(path), dynamo=False, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "batch"}})
        elif how == "onnx_dynamo":
            torch.onnx.export(net, (x,), str(path), dynamo=True, input_names=["x"],
                              output_names=["y"], dynamic_shapes=({0: torch.export.Dim("batch")},))
        else:
            torch.jit.save(torch.jit.trace(net, (x,)), str(path))


def serious(report) -> set[tuple[str, str]]:  # noqa: ANN001
    return {(f.rule, f.layer) for f in report.findings if f.severity.value != "info"}


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("how", ["onnx", "torchscript"])
def test_zero_init_last_in_a_folded_block_is_silent(tmp_path, how, gate):
    path = tmp_path / ("net.onnx" if how == "onnx" else "net.pt")
    export(darknet_like(gate), how, path)
    options = DiagnoseOptions(input_shapes=[[4, 3, 32, 32]])
    assert serious(diagnose(path, options)) == set()


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("how", ["onnx", "torchscript"])
def test_zeroed_first_layer_of_the_block_is_an_error(tmp_path, how, gate):
    net = darknet_like(gate)
    nn.init.zeros_(net[3].conv1[0].weight)
    path = tmp_path / ("net.onnx" if how == "onnx" else "net.pt")
    export(net, how, path)
    report = diagnose(path, DiagnoseOptions(input_shapes=[[4, 3, 32, 32]]))
    errors = {(f.rule, f.layer) for f in report.findings if f.severity.value == "error"}
    assert any(rule == "zero-weights" and "3.conv1" in layer for rule, layer in errors), errors


@pytest.mark.parametrize("how", ["onnx", "onnx_dynamo", "torchscript"])
def test_layers_that_read_a_global_pool_are_marked(tmp_path, how):
    """The ECA Conv1d treats the pooled channels as positions; only the data flow shows that
    it reads a pool. The squeeze-excite projection and the head read one too; no conv of the
    body does, nor fc2, which reads fc1's ReLU."""
    net = nn.Sequential(*darknet_like("eca")[:2], Block(16, "squeeze-excite"),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    path = tmp_path / ("net.pt" if how == "torchscript" else "net.onnx")
    export(net, how, path)
    linear = [p for p in load_model(path).probe_points if p.role == "linear"]
    pooled = {p.layer.split(":")[0] for p in linear if p.reads_global_pool}
    assert pooled == {"1.se.conv", "2.se.fc1", "5"}, [(p.layer, p.reads_global_pool)
                                                      for p in linear]
