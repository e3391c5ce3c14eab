"""A single value read only as the bound of a min/max/clamp is a threshold, not a dead weight.

Apertus's MLP activation (transformers' `XIELUActivation`) computes
`where(x > 0, ..., expm1(min(x, eps)) ...)`: min passes `eps` on only where x > eps, and there
the select takes the other branch, so eps gets exactly zero gradient. It is a buffer, but the
dynamo ONNX exporter stores buffers as initializers, like parameters, and the linter called it
"will never train" (an error) in every block of `apertus` and `apertus1p5_text`. Now it is info
that names the bound; a value read anywhere else as well is judged as before. The same holds
for a single value a select only writes where its mask says so (GPT-Neo's `finfo.min`).
"""

from __future__ import annotations

import pytest
import torch
import zoo
from torch import nn
from transformers.activations import XIELUActivation

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.selection_gates import FlowNode, GateGraph


class XieluMlp(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.up = nn.Linear(width, 4 * width)
        self.act = XIELUActivation(dtype=torch.float32)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(x)))


@pytest.mark.parametrize("how", ["onnx_dynamo", "torchscript"])
def test_xielu_eps_is_a_threshold(tmp_path, how):
    torch.manual_seed(0)
    x = torch.randn(8, 32)
    path = (zoo.export_onnx(XieluMlp().eval(), (x,), tmp_path / "m.onnx", dynamo=True)
            if how == "onnx_dynamo" else zoo.export_torchscript(XieluMlp().eval(), (x,),
                                                                 tmp_path / "m.pt"))
    findings = diagnose(path, DiagnoseOptions(device="cpu", input_shapes=[[8, 32]])).findings
    assert [f for f in findings if f.severity.value != "info"] == []
    eps = [f for f in findings if f.rule == "dead-gradients"]
    if how == "onnx_dynamo":  # TorchScript keeps eps a buffer: nothing to judge
        assert len(eps) == 1 and "act.eps" in eps[0].parameters[0], eps
        assert "bound of Min@" in eps[0].message


def graph(*nodes: FlowNode) -> GateGraph:
    return GateGraph(list(nodes), [], ["y"], {"t": ("t",)})


def test_bound_of_reads_every_reader():
    clamp_bound = FlowNode("clip", "clamp", ("x", "t"), ("y",))
    assert graph(FlowNode("min", "minmax", ("x", "t"), ("y",))).bound_of("t") == "min"
    assert graph(clamp_bound).bound_of("t") == "clip"
    # the value a clamp clamps is no bound
    assert graph(FlowNode("clip", "clamp", ("t", "lo"), ("y",))).bound_of("t") is None
    # read by a min and by a multiply: it scales the signal too
    assert graph(FlowNode("min", "minmax", ("x", "t"), ("m",)),
                 FlowNode("mul", "", ("m", "t"), ("y",))).bound_of("t") is None
    assert graph(FlowNode("mul", "", ("x", "x"), ("y",))).bound_of("t") is None


class MaskedAttention(nn.Module):
    """GPT-Neo's causal attention: `where(causal, scores, finfo.min)`, the fill a buffer."""

    def __init__(self, width: int = 16, length: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.register_buffer("causal", torch.tril(torch.ones(length, length, dtype=torch.bool)))
        self.register_buffer("fill", torch.tensor(torch.finfo(torch.float32).min))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = torch.where(self.causal, q @ k.transpose(-1, -2), self.fill)
        return x + self.out(torch.softmax(scores, -1) @ v)


def test_masked_fill_value_is_not_a_dead_weight(tmp_path):
    """GPT-Neo and ImageGPT exported with dynamo: the fill became an initializer (`clone_2`),
    called "will never train" (an error) in every block; it is a constant the mask writes."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    path = zoo.export_onnx(MaskedAttention().eval(), (x,), tmp_path / "m.onnx", dynamo=True)
    findings = diagnose(path, DiagnoseOptions(device="cpu", batch_size=2)).findings
    assert [f for f in findings if f.severity.value != "info"] == [], findings
    fill = [f for f in findings if f.rule == "dead-gradients"]
    assert len(fill) == 1 and "only writes where its mask says so" in fill[0].message, fill


def test_fill_of_reads_every_reader():
    assert graph(FlowNode("w", "where", ("c", "x", "t"), ("y",))).fill_of("t") == "w"
    assert graph(FlowNode("mf", "masked_fill", ("x", "c", "t"), ("y",))).fill_of("t") == "mf"
    # the condition of a select is no fill, nor is the tensor a masked fill writes into
    assert graph(FlowNode("w", "where", ("t", "x", "z"), ("y",))).fill_of("t") is None
    assert graph(FlowNode("mf", "masked_fill", ("t", "c", "z"), ("y",))).fill_of("t") is None
    # written by a select and also added to the signal
    assert graph(FlowNode("w", "where", ("c", "x", "t"), ("m",)),
                 FlowNode("add", "", ("m", "t"), ("y",))).fill_of("t") is None
