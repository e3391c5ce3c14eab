"""NaN that a masked fill overwrites before the output is not "the loss will be NaN".

transformers' CPM-Ant treats token 0 as padding: a padded query's attention row is masked out
entirely, its softmax is NaN, and a second `masked_fill` sets that row to 0. The output and
every gradient stay finite (measured in eager PyTorch), yet nonfinite-values reported an error
whenever the probe batch drew a 0. The same attention without the refill does put NaN into the
output, and stays an error.
"""

from __future__ import annotations

import pytest
import torch
import zoo
from torch import nn

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions


class PaddedAttention(nn.Module):
    """One attention over token embeddings, token 0 masked out as padding."""

    def __init__(self, refill: bool) -> None:
        super().__init__()
        self.refill = refill
        self.embed = nn.Embedding(8, 16)
        self.q, self.k, self.v, self.out = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        valid = ids != 0
        mask = valid[:, :, None] & valid[:, None, :]
        score = self.q(x) @ self.k(x).transpose(1, 2) / 4
        attn = torch.softmax(score.masked_fill(~mask, float("-inf")), -1)
        if self.refill:
            attn = attn.masked_fill(~mask, 0.0)
        return self.out(attn @ self.v(x))


def _lint(tmp_path, refill: bool, fmt: str):
    torch.manual_seed(0)
    ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]])
    model = PaddedAttention(refill).eval()
    if fmt == "torchscript":
        path = zoo.export_torchscript(model, (ids,), tmp_path / "m.pt")
        options = DiagnoseOptions(device="cpu", input_shapes=[[8, 16]], input_dtypes=["int64"])
    else:
        path = zoo.export_onnx(model, (ids,), tmp_path / "m.onnx", dynamo=fmt == "onnx_dynamo")
        # A dynamo file fixes the batch of the example: probe at that size.
        options = DiagnoseOptions(device="cpu", batch_size=2 if fmt == "onnx_dynamo" else 8)
    return diagnose(path, options)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx_legacy", "onnx_dynamo"])
def test_nan_overwritten_before_the_output_is_info(tmp_path, fmt):
    report = _lint(tmp_path, refill=True, fmt=fmt)
    found = [f for f in report.findings if f.rule == "nonfinite-values"]
    # The probe draws token ids over the whole table, so some rows are padding.
    assert [f.severity.value for f in found] == ["info"], report.findings
    assert found[0].evidence["reaches_output"] is False
    assert not [f for f in report.findings if f.severity.value == "error"], report.findings


@pytest.mark.parametrize("fmt", ["torchscript", "onnx_legacy"])
def test_nan_that_reaches_the_output_stays_an_error(tmp_path, fmt):
    report = _lint(tmp_path, refill=False, fmt=fmt)
    found = [f for f in report.findings if f.rule == "nonfinite-values"]
    assert [f.severity.value for f in found] == ["error"], report.findings
    assert "the loss will be NaN" in found[0].message
