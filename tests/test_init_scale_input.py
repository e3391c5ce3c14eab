"""init-scale judges a layer by what it reads, not by the value probed just before it.

timm's CoaT runs a depthwise position conv on the attention's values right after the keys'
softmax; the softmax is the last probed value before the conv in every export, and its entries
are ~1/positions, so the conv's output looked 221x "what it was fed" (coat_lite_medium, all
three exports: a false init-scale warning). The conv's own output says what it was fed
(`ProbeResult.fed_power`). A conv really initialised 30x too large on the same path still
fires.
"""

from __future__ import annotations

import pytest
import torch
import zoo
from torch import nn

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions


class _FactorAttentionWithPositionConv(nn.Module):
    """CoaT's factorised attention in miniature, on a (B, C, H, W) map: softmax over the keys'
    positions, then a depthwise 3x3 conv on the values (PyTorch's default init), gated by q."""

    def __init__(self, c: int = 64, oversized: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.pos = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.proj = nn.Conv2d(c, c, 1)
        self.head = nn.Linear(c, 10)
        if oversized:
            with torch.no_grad():
                self.pos.weight.mul_(30.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        q, k, v = self.qkv(x).chunk(3, dim=1)
        keys = k.flatten(2).softmax(dim=-1)  # (B, C, HW): the last probed value before `pos`
        context = torch.einsum("bcn,bdn->bcd", keys, v.flatten(2))
        mixed = torch.einsum("bcd,bdn->bcn", context, q.flatten(2)).view_as(q)
        y = x + self.proj(mixed + q * self.pos(v))
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("how", ["torchscript", "onnx"])
@pytest.mark.parametrize("oversized", [False, True], ids=["default-init", "30x-std"])
def test_position_conv_is_judged_by_what_it_reads(tmp_path, how: str, oversized: bool) -> None:
    torch.manual_seed(0)
    net = _FactorAttentionWithPositionConv(oversized=oversized).eval()
    x = torch.randn(8, 3, 8, 8)
    if how == "torchscript":
        path = zoo.export_torchscript(net, (x,), tmp_path / "net.pt")
    else:
        path = zoo.export_onnx(net, (x,), tmp_path / "net.onnx")
    report = diagnose(path, DiagnoseOptions(device="cpu", input_shapes=[[8, 3, 8, 8]]))
    found = [f.layer for f in report.findings if f.rule == "init-scale"]
    assert found == (["pos"] if oversized else [])
