"""A normalisation the exporter writes out as arithmetic keeps its zero-init gain a gain.

timm's EvoNorm-S0a (`regnetz_b16_evos`, `regnetz_c16_evos`, `regnetz_d8_evos`) has no ONNX
operator: both exporters write `x * sigmoid(v * x) / group_std(x) * weight + bias`, and the
`weight` of the norm closing each residual block, zero-initialised by timm, becomes one more
initializer. The linter took every conv of those blocks for dead (exactly zero gradient at
step 0) in the ONNX files while the TorchScript file was clean: in an ONNX file a zero tensor
outside a layer may be a zero mask buffer, which never moves, so only layers' biases were
stepped. A tensor that multiplies a value divided by its own standard deviation is a
normalisation's gain, and a zero one moves at the first step. A zero mask on a conv's output
stays an error.
"""

from __future__ import annotations

import pytest
import torch
import zoo
from timm.layers import EvoNorm2dS0a
from torch import nn

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions


class EvoBlock(nn.Module):
    """ByobNet's residual block with EvoNorm-S0a: x + norm2(conv2(norm1(conv1(x)))), the last
    norm's gain zero-initialised as timm's zero_init_last does. With `masked`, the branch ends
    in a zero buffer times a conv output instead: a mask, not a gain."""

    def __init__(self, c: int = 16, masked: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.norm1 = EvoNorm2dS0a(c, group_size=8)
        self.conv2 = nn.Conv2d(c, c, 1, bias=False)
        self.norm2 = EvoNorm2dS0a(c, group_size=8, apply_act=False)
        self.masked = masked
        if masked:
            self.register_buffer("mask", torch.zeros(1, c, 1, 1))
        else:
            nn.init.zeros_(self.norm2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv2(self.norm1(self.conv1(x)))
        branch = branch * self.mask if self.masked else self.norm2(branch)
        return x + branch


def net(masked: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), EvoNorm2dS0a(16, group_size=8),
                         EvoBlock(masked=masked), EvoBlock(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10))


def lint(model: nn.Module, dynamo: bool, tmp_path) -> list:  # noqa: ANN001
    x = torch.randn(4, 3, 16, 16)
    path = zoo.export_onnx(model, (x,), tmp_path / "evo.onnx", dynamo=dynamo)
    return diagnose(path, DiagnoseOptions(device="cpu", input_shapes=[[4, 3, 16, 16]])).findings


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_zero_evonorm_gain_closing_a_residual_branch_is_a_zero_start(tmp_path, dynamo):
    findings = lint(net(), dynamo, tmp_path)
    assert [(f.rule, f.layer) for f in findings if f.severity.value != "info"] == []
    conv1 = [f for f in findings if f.rule == "dead-gradients" and "2.conv1.weight" in f.message]
    assert conv1 and all("first step only" in f.message for f in conv1), conv1


def test_zero_mask_on_a_conv_output_stays_an_error(tmp_path):
    errors = [(f.rule, f.layer) for f in lint(net(masked=True), False, tmp_path)
              if f.severity.value == "error"]
    assert ("dead-gradients", "2.conv1") in errors, errors


def test_training_moves_the_branch_from_the_second_step():
    """What the verdict says, measured: SGD leaves the branch's first conv where it was at the
    first step (the zero gain blocks it) and moves it at the second."""
    model = net().train()
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = model[2].conv1.weight.detach().clone()
    moved = []
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        moved.append(float((model[2].conv1.weight.detach() - start).abs().max()))
    assert moved[0] == 0 and moved[1] > 0, moved
