"""A traced mixture-of-experts whose routing the unblocked pass would change.

A trace freezes each expert's token count (legacy ONNX keeps them as Split sizes), so the file
runs only on inputs that route as its export input did (the linter asks for that input). The
probe's gradient pass sets deliberate zeros (zero-init expert outputs) to their textbook init,
and the next layer's router then sends other tokens to other experts: transformers'
`openai_privacy_filter` failed there with "the graph fixes sizes", even on its export input.
The gradients are now measured at the file's own values, with a note, and the lint completes.
"""

from __future__ import annotations

import torch
import zoo
from torch import nn
from torch.nn import functional as F

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions


class TokenMoE(nn.Module):
    """gpt-oss's expert loop: `for expert in hit_experts`, which a trace unrolls into one piece
    per expert the export input hit; expert tensors stacked, their biases zero at init."""

    def __init__(self, width: int = 16, experts: int = 8) -> None:
        super().__init__()
        self.router = nn.Linear(width, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, width, 2 * width) * width ** -0.5)
        self.up_bias = nn.Parameter(torch.zeros(experts, 2 * width))
        self.down = nn.Parameter(torch.randn(experts, 2 * width, width) * (2 * width) ** -0.5)
        self.down_bias = nn.Parameter(torch.zeros(experts, width))
        self.count = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.router(x).argmax(-1)
        hit = torch.greater(F.one_hot(choice, self.count).sum(0), 0).nonzero()
        out = torch.zeros_like(x)
        for expert in hit:  # unrolled by the trace: the experts the export input hit
            e = expert[0]
            tokens = torch.where(choice == e)[0]
            h = torch.relu(x[tokens] @ self.up[e] + self.up_bias[e])
            out = out.index_add(0, tokens, h @ self.down[e] + self.down_bias[e])
        return x + out


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.Sequential(TokenMoE(), TokenMoE())
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)))


def test_frozen_routing_is_probed_at_the_files_values(tmp_path):
    # seed 2: the unblocked pass sends layer 1's six tokens to another set of experts
    torch.manual_seed(2)
    x = torch.randn(6, 8)
    path = zoo.export_onnx(Stack().eval(), (x,), tmp_path / "moe.onnx")
    torch.save(x, tmp_path / "export_input.pt")
    report = diagnose(path, DiagnoseOptions(device="cpu",
                                            input_file=str(tmp_path / "export_input.pt")))
    assert any("gradients are measured at the file's values" in n for n in report.model.notes)
    assert [f.rule for f in report.findings if f.severity.value == "error"] == []
