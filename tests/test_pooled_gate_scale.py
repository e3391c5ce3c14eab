"""init-scale does not compare |g|/|w| behind BatchNorm for a layer whose output the gradient
reaches at a handful of positions.

timm's BAT attention (`BatNonLocalAttn`, in bat_resnext26ts) starts `ba.conv1`, a 1x1 conv to
two channels, at ByobNet's fan-out He init: 11-62x He fan-in in variance. Its output is max-pooled
to 7-cell maps that gate the block, so the gradient reaches ~1% of its entries, and its |g|/|w|
read ~170x below the convs around it: an init-scale warning on every block, in every export.
Re-initialised at He fan-in it still reads ~15x below: the pooling, not the init, sets it. A
conv of the main path at 10x He std still fires.

In the last stage (128 channels, 2x2 maps at 64 px) the pool windows cover most of the map and
the gradient reaches ~9-19% of the entries: there the layer is judged, and what clears it is
that the library starts it at He fan-out, as it starts every conv: 64x He fan-in, 1x fan-out.
"""

from __future__ import annotations

import math

import pytest
import torch
import zoo
from timm.layers.non_local_attn import BatNonLocalAttn
from torch import nn

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.probe import probe

SIZE = 32


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU())


class BatNet(nn.Module):
    """A plain conv stack with timm's BAT block in the middle, initialised as ByobNet does."""

    def __init__(self, c: int = 48) -> None:
        super().__init__()
        # ba.conv1 reads 48 channels and writes 2: fan-out He is 24x He fan-in in variance
        self.body = nn.Sequential(conv_bn_relu(3, c), conv_bn_relu(c, c), conv_bn_relu(c, c),
                                  BatNonLocalAttn(c, block_size=4, groups=2, rd_channels=c),
                                  conv_bn_relu(c, c), conv_bn_relu(c, c), conv_bn_relu(c, c))
        self.head = nn.Linear(c, 10)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # timm byobnet._init_weights: He, fan-out
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0, math.sqrt(2.0 / (fan_out // module.groups)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def export(net: nn.Module, how: str, tmp_path, size: int = SIZE) -> object:  # noqa: ANN001
    x = torch.randn(4, 3, size, size)
    if how == "torchscript":
        return zoo.export_torchscript(net, (x,), tmp_path / "net.pt")
    return zoo.export_onnx(net, (x,), tmp_path / "net.onnx", dynamo=True)


def init_scale_layers(path, size: int = SIZE) -> list[str]:  # noqa: ANN001
    options = DiagnoseOptions(device="cpu", input_shapes=[[4, 3, size, size]])
    return [f.layer for f in diagnose(path, options).findings if f.rule == "init-scale"]


@pytest.mark.parametrize("how", ["torchscript", "onnx_dynamo"])
def test_pooled_gate_at_fan_out_init_is_silent(tmp_path, how):
    torch.manual_seed(0)
    assert init_scale_layers(export(BatNet().eval(), how, tmp_path)) == []


@pytest.mark.parametrize("how", ["torchscript", "onnx_dynamo"])
def test_gate_reached_widely_is_judged_at_the_libraries_fan_mode(tmp_path, how):
    """8x8 maps: the gradient reaches ~9% of `ba.conv1`'s entries, so it is compared; 128 inputs
    to 2 outputs at fan-out init is 64x He fan-in, the library's own scale at fan-out."""
    torch.manual_seed(0)
    path = export(BatNet(128).eval(), how, tmp_path, size=8)
    assert init_scale_layers(path, size=8) == []


@pytest.mark.parametrize(("c", "size"), [(48, SIZE), (128, 8)])
@pytest.mark.parametrize("how", ["torchscript", "onnx_dynamo"])
def test_main_path_conv_at_10x_std_still_fires(tmp_path, how, c, size):
    torch.manual_seed(0)
    net = BatNet(c)
    with torch.no_grad():
        net.body[5][0].weight.mul_(10.0)
    assert [layer.removeprefix("body.") for layer in
            init_scale_layers(export(net.eval(), how, tmp_path, size), size)] == ["5.0"]


def test_gradient_reach_is_measured(tmp_path):
    """The ReLU before a max pool to 4-cell maps passes the gradient to a few entries; one read
    by the next conv at every position passes it to all of them."""
    torch.manual_seed(0)
    from gradprobe.diagnostics.loaders import load_model

    model = load_model(export(BatNet().eval(), "torchscript", tmp_path))
    result = probe(model, [torch.randn(4, 3, SIZE, SIZE)])
    reach = {lp.point.layer: lp.gradient_reach for lp in result.layers
             if lp.point.role == "activation" and lp.gradient_reach is not None}
    pooled = next(v for k, v in reach.items() if "ba.conv1" in k)
    plain = reach["body.1.2"]
    assert pooled < 0.05 and plain == 1.0, reach
