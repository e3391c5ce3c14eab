"""A rise in activation variance that ends below unit scale is a recovery, not an explosion.

transformers' MobileViT draws its BatchNorm scales from N(0, 0.02): the signal reaching its
first transformer block has variance ~1e-10, its LayerNorm's eps dominates, and the variance
then climbs back, 3.8e-8 at the first query projection to 0.08 at the last block's MLP.
exploding-activations called that "x1.84 per layer over 24 layers" (TorchScript). The same
climb from unit scale upwards still fires.
"""

from __future__ import annotations

import pytest
import torch
import zoo
from torch import nn

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions


class DoublingStack(nn.Module):
    """Twelve linear layers, each doubling the variance (sqrt(2) x orthogonal); the first one
    scaled by `start`."""

    def __init__(self, start: float, width: int = 32, depth: int = 12) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))
        for layer in self.layers:
            nn.init.orthogonal_(layer.weight, gain=2 ** 0.5)
        with torch.no_grad():
            self.layers[0].weight.mul_(start)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize(("start", "fires"), [(1e-5, False), (1.0, True)],
                         ids=["from-a-dip", "from-unit-scale"])
def test_growth_that_ends_below_unit_scale_is_not_exploding(tmp_path, start, fires):
    torch.manual_seed(0)
    x = torch.randn(16, 32)
    path = zoo.export_torchscript(DoublingStack(start).eval(), (x,), tmp_path / "s.pt")
    report = diagnose(path, DiagnoseOptions(device="cpu", input_shapes=[[16, 32]]))
    found = [f for f in report.findings if f.rule == "exploding-activations"]
    assert bool(found) is fires, report.findings
    if fires:
        assert found[0].evidence["last_var"] > 1.0
