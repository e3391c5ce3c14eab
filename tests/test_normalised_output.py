"""A network whose output rows all share one RMS ends in a norm: no shrink before it reaches the
output.

transformers' Dory normalises its last hidden state to unit L2 norm (each row's RMS is
1/sqrt(d)); its small std-0.02 projections read a gate probed just before them, and init-scale
called the last block's `o_proj` a shrink that "no later layer's input" recovers. The output,
normalised, shows it does. The same stack without the final normalisation still fires.
"""

from __future__ import annotations

import pytest
import torch
import zoo
from torch import nn
from torch.nn import functional as F

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions


class ShrinkingStack(nn.Module):
    def __init__(self, normalise: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))
        for layer in self.layers:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.layers[2].weight, std=0.002)  # ~1e-4x He: a shrink
        self.normalise = normalise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        x = self.layers[-1](x)
        return F.normalize(x, dim=-1) if self.normalise else x


@pytest.mark.parametrize("normalise", [True, False])
def test_shrink_before_a_normalised_output(tmp_path, normalise):
    torch.manual_seed(0)
    x = torch.randn(16, 64)
    path = zoo.export_torchscript(ShrinkingStack(normalise).eval(), (x,), tmp_path / "s.pt")
    report = diagnose(path, DiagnoseOptions(device="cpu", input_shapes=[[16, 64]]))
    layers = [f.layer for f in report.findings if f.rule == "init-scale"]
    assert layers == ([] if normalise else ["layers.2"]), report.findings
