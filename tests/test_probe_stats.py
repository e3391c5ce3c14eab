"""Per-tensor statistics of the probe, on tensors whose answers are known by hand."""

from __future__ import annotations

import math

import torch

from gradprobe.diagnostics.probe import _param_row

FIELDS = ("mean", "std", "abs_max", "nonfinite", "grad_norm", "grad_rms", "grad_to_weight",
          "zero_grad_fraction", "nonfinite_grad", "unit_spread", "constant")


def row(weight: torch.Tensor, grad: torch.Tensor | None) -> dict[str, float]:
    return dict(zip(FIELDS, _param_row(weight, grad, None).tolist(), strict=True))


def test_nonfinite_entries_are_counted_exactly():
    w = torch.tensor([1.0, math.nan, math.inf, -2.0])
    g = torch.tensor([0.0, 1.0, math.nan, 0.0])
    r = row(w, g)
    assert r["nonfinite"] == 2 and r["nonfinite_grad"] == 1
    assert r["zero_grad_fraction"] == 0.5


def test_an_empty_parameter_has_no_nonfinite_entries():
    r = row(torch.empty(0), torch.empty(0))
    assert r["nonfinite"] == 0 and r["nonfinite_grad"] == 0
    assert r["grad_norm"] == 0


def test_a_missing_gradient_counts_as_zero():
    r = row(torch.full((3, 4), 0.5), None)
    assert r["grad_norm"] == 0 and r["zero_grad_fraction"] == 1 and r["constant"] == 1
    assert r["grad_to_weight"] == 0
