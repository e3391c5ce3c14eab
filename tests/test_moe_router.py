"""A zero-initialised MoE router is a deliberate zero, judged by data flow, not graph order.

AFMoE (transformers) starts its router at zero: sigmoid(0) = 0.5 for every expert, uniform
routing, and the output still depends on the input through the experts. The router is computed
just before the experts' projections, so in graph order its uniform scores (the same for every
sample) sit between the router and the next layer; they are not what that layer reads. And the
block's RMSNorm, written out by hand as in LLaMA, is no probe point: what a later layer reads
shows only in its own output.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import export_onnx, export_torchscript

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions


class RMSNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Expert(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    """x + sum_e sigmoid(router(n))_e * expert_e(n), n = RMSNorm(x); transformers' std 0.02."""

    def __init__(self, width: int = 32, experts: int = 4) -> None:
        super().__init__()
        self.norm = RMSNorm(width)
        self.router = nn.Linear(width, experts, bias=False)
        self.experts = nn.ModuleList(Expert(width, 2 * width) for _ in range(experts))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.router.weight)  # AFMoE's router starts at zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm(x)
        scores = torch.sigmoid(self.router(n))
        out = sum(scores[..., e:e + 1] * expert(n) for e, expert in enumerate(self.experts))
        return x + out


class MoEModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.block = MoEBlock()
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)))


def _lint(model: nn.Module, tmp_path):
    example = torch.randn(2, 16, 16)
    with torch.no_grad():
        export_torchscript(model, (example,), tmp_path / "moe.pt")
    return diagnose(str(tmp_path / "moe.pt"), DiagnoseOptions(input_shapes=[[2, 16, 16]]))


def test_a_zero_initialised_router_is_info_and_its_experts_are_not_judged_small(tmp_path):
    torch.manual_seed(0)
    report = _lint(MoEModel(), tmp_path)
    serious = [f"{f.severity.value} {f.rule} {f.layer}: {f.message}" for f in report.findings
               if f.severity.value != "info"]
    assert serious == []
    router = [f for f in report.findings if f.rule == "zero-weights"]
    assert [(f.layer, f.severity.value) for f in router] == [("block.router", "info")]


def test_an_expert_whose_gate_is_zeroed_still_starves_its_down_projection(tmp_path):
    torch.manual_seed(0)
    model = MoEModel()
    with torch.no_grad():
        model.block.experts[1].gate_proj.weight.zero_()  # silu(0) = 0: the product is zero
    report = _lint(model, tmp_path)
    errors = [(f.rule, f.layer) for f in report.findings if f.severity.value == "error"]
    assert errors == [("zero-weights", "block.experts.1.gate_proj")], report.findings


class TopKRouter(nn.Module):
    """Llama 4's router: keep the top-k logits per token, -inf for the rest, then a sigmoid.
    The unselected experts score exactly 0: on the sigmoid's tail by design."""

    def __init__(self, width: int = 32, experts: int = 8, top_k: int = 1, std: float = 0.02
                 ) -> None:
        super().__init__()
        self.embed = nn.Linear(16, width)
        self.router = nn.Linear(width, experts, bias=False)
        nn.init.normal_(self.router.weight, std=std)
        self.experts = nn.Linear(width, experts * width)
        self.head = nn.Linear(width, 8)
        self.top_k, self.count = top_k, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).reshape(-1, self.embed.out_features)
        logits = self.router(h)
        top_value, top_index = torch.topk(logits, self.top_k, dim=1)
        scores = torch.full_like(logits, float("-inf")).scatter_(1, top_index, top_value)
        scores = torch.sigmoid(scores.float())
        routed = self.experts(h).reshape(h.shape[0], self.count, -1)
        out = (scores.unsqueeze(-1) * routed).sum(1)
        return self.head(out).reshape(x.shape[0], x.shape[1], -1)


@pytest.mark.parametrize("how", ["torchscript", "onnx_legacy", "onnx_dynamo"])
@pytest.mark.parametrize("std", [0.02, 20.0], ids=["library", "saturating"])
def test_a_top_k_routers_minus_infinity_is_not_saturation(tmp_path, how, std):
    """Llama 4 (transformers, TorchScript): 94% of the router's sigmoid outputs counted as
    saturated, a warning per block; they are the 7 of 8 experts top-k left at -inf. The share
    is now of the selected ones; a router whose selected logits are huge still saturates."""
    torch.manual_seed(0)
    model, example = TopKRouter(std=std).eval(), torch.randn(2, 16, 16)
    if how == "torchscript":
        path = export_torchscript(model, (example,), tmp_path / "r.pt")
        options = DiagnoseOptions(device="cpu", input_shapes=[[2, 16, 16]])
    else:
        path = export_onnx(model, (example,), tmp_path / "r.onnx", dynamo=how == "onnx_dynamo")
        options = DiagnoseOptions(device="cpu", batch_size=2)
    findings = diagnose(path, options).findings
    found = [f for f in findings if f.rule == "saturated-activation"]
    if std == 0.02:
        # a dynamo file stores full_like(logits, -inf) as an initializer: a mask, not a weight
        assert [f for f in findings if f.severity.value != "info"] == [], findings
    else:
        assert [f.severity.value for f in found] in (["warning"], ["error"]), found
        assert "a mask did not set to -inf" in found[0].message
