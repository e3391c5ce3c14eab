"""A value the same for every sample is no signal cut while the output still varies.

transformers' inkling2_loop mixes its block states with attention from a zero-initialised query
(`Inkling2LoopBlockAttentionResidual`, the model's last step): the softmax over q.k is uniform,
the same for every sample, and no point is probed after it, but the weights average
input-dependent states into the output. zero-weights reported "the output no longer depends on
its input" there (an error on a healthy model)."""

from __future__ import annotations

import pytest
import torch
import zoo
from torch import nn

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions


class _ZeroQueryPool(nn.Module):
    """Attention pooling over positions with a query that starts at zero (or a zero gate)."""

    def __init__(self, gate: float = 1.0) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.query = nn.Parameter(torch.zeros(8))
        self.gate = nn.Parameter(torch.full((8,), gate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states = torch.relu(self.proj(x))
        weights = torch.softmax(states @ self.query, dim=-1)  # 1/positions for every sample
        return (weights.unsqueeze(-1) * states).sum(1) * self.gate


def _lint(tmp_path, module: nn.Module, how: str):
    torch.manual_seed(0)
    x = torch.randn(4, 5, 8)
    if how == "onnx":
        path = zoo.export_onnx(module, (x,), tmp_path / "pool.onnx")
        options = DiagnoseOptions(device="cpu", batch_size=4)
    else:
        path = zoo.export_torchscript(module, (x,), tmp_path / "pool.pt")
        options = DiagnoseOptions(device="cpu", input_shapes=[[4, 5, 8]])
    return diagnose(path, options=options)


@pytest.mark.parametrize("how", ["onnx", "torchscript"])
def test_uniform_attention_from_a_zero_query_is_not_a_cut(tmp_path, how: str) -> None:
    torch.manual_seed(0)
    report = _lint(tmp_path, _ZeroQueryPool(), how)
    serious = [f for f in report.findings if f.severity.value in ("warning", "error")]
    assert not serious, [f.message for f in serious]


def test_a_zero_gate_after_the_pool_still_cuts_the_signal(tmp_path) -> None:
    torch.manual_seed(0)
    report = _lint(tmp_path, _ZeroQueryPool(gate=0.0), "onnx")
    cut = [f for f in report.findings if f.rule == "zero-weights" and f.severity.value == "error"]
    assert cut and "gate" in cut[0].parameters
