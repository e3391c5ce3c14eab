"""A zero rate inside an exponential is a zero start, in an ONNX file too.

transformers' Doge computes its dynamic attention mask as `exp(A * softplus(dt_proj(v)))` with
the parameter `A` initialised to zero, so `dt_proj` gets exactly zero gradient until `A` has
taken its first step. The TorchScript file was clean (it keeps parameters apart from buffers, so
the probe steps `A`); the legacy ONNX file got a dead-gradients error on every `dt_proj`, the
one false alarm left in the hub sweep: in an ONNX file a zero tensor outside a layer may be a
mask buffer that never moves. A mask zeroes what it multiplies; a zero factor inside an
exponential zeroes nothing (exp(0) = 1), so it is a rate, and it trains. The same zero factor
multiplying the signal itself stays an error. Doge itself, and what training does with it:
tests/test_second_step_zeros.py.
"""

from __future__ import annotations

import torch
import zoo
from torch import nn

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions


class DecayGate(nn.Module):
    """`fc(x) * exp(rate * softplus(dt(x)))`, Doge's dynamic mask in small, with `rate` a zero
    parameter. With `masked`, a zero buffer multiplies `dt(x)` into the signal instead, no
    exponential: a mask."""

    def __init__(self, width: int = 16, masked: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.dt = nn.Linear(width, width)
        self.masked = masked
        if masked:
            self.register_buffer("rate", torch.zeros(width))
        else:
            self.rate = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.masked:
            return self.fc(x) + self.rate * self.dt(x)
        return self.fc(x) * torch.exp(self.rate * nn.functional.softplus(self.dt(x)))


def net(masked: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), DecayGate(masked=masked), nn.Tanh(),
                         nn.Linear(16, 4))


def lint(model: nn.Module, tmp_path) -> list:  # noqa: ANN001
    path = zoo.export_onnx(model, (torch.randn(4, 8),), tmp_path / "gate.onnx", dynamo=False)
    return diagnose(path, DiagnoseOptions(device="cpu", input_shapes=[[4, 8]])).findings


def test_zero_rate_inside_an_exponential_is_a_zero_start(tmp_path):
    findings = lint(net(), tmp_path)
    assert [(f.rule, f.layer) for f in findings if f.severity.value != "info"] == []
    dt = [f for f in findings if f.rule == "dead-gradients" and f.layer == "1.dt"]
    assert dt and all("first step only" in f.message for f in dt), dt


def test_zero_factor_on_the_signal_stays_an_error(tmp_path):
    errors = [(f.rule, f.layer) for f in lint(net(masked=True), tmp_path)
              if f.severity.value == "error"]
    assert ("dead-gradients", "1.dt") in errors, errors
