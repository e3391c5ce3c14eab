"""Two false alarms from the hub sweep, on models built here.

- csatv2 (timm): a fixed DCT stem (a matrix no init sets), then a 0.02-init residual branch,
  then an attention branch over one channel whose LayerNorm makes it the same for every sample.
  The activation-variance line ran from the stem to the first branch and stopped at that flat
  side path: "vanishing". A fixed transform is no depth step, and a side path gone flat while
  the output still varies is skipped, not the end of the axis. A real decay is still found.
- VITS (transformers): the waveform tanh is the network's output and 76% saturated at init; the
  loss acts on it directly and training pulls it into range (0% after 50 steps), so it is info.
  The same tanh with a layer after it still blocks that layer's gradient: a warning.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from zoo import export_torchscript

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions


def _lint(model: nn.Module, example: torch.Tensor, tmp_path):
    with torch.no_grad():
        export_torchscript(model, (example,), tmp_path / "m.pt")
    return diagnose(str(tmp_path / "m.pt"), DiagnoseOptions(input_shapes=[list(example.shape)]))


def _rules(report, severity: str | None = None) -> list[str]:
    return [f.rule for f in report.findings
            if (f.severity.value == severity if severity else f.severity.value != "info")]


class FixedStemThenBranch(nn.Module):
    """x @ (30 * DCT-like fixed matrix) -> linear -> LayerNorm -> fc1 (0.02) -> GELU -> fc2
    (0.02), optionally followed by a plain stack that does decay."""

    def __init__(self, decaying_tail: bool = False) -> None:
        super().__init__()
        self.register_buffer("transform", 30.0 * torch.linalg.qr(torch.randn(32, 32))[0])
        self.proj = nn.Linear(32, 32)
        self.norm = nn.LayerNorm(32)
        self.fc1, self.fc2 = nn.Linear(32, 128), nn.Linear(128, 32)
        for m in (self.fc1, self.fc2):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        self.tail = nn.Sequential(*[nn.Linear(32, 32) for _ in range(8)]) if decaying_tail \
            else nn.Identity()
        if decaying_tail:
            for m in self.tail:
                nn.init.normal_(m.weight, std=0.05)  # 0.4x Xavier's std: x0.08 per layer
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.proj(nn.functional.linear(x, self.transform)))
        return self.tail(self.fc2(nn.functional.gelu(self.fc1(h))))


def test_a_fixed_transform_is_no_depth_step(tmp_path):
    torch.manual_seed(0)
    report = _lint(FixedStemThenBranch(), torch.randn(4, 32), tmp_path)
    assert "vanishing-activations" not in _rules(report) + _rules(report, "info")


@pytest.mark.slow
def test_a_fixed_matrix_in_a_dynamo_export_is_no_weight(tmp_path):
    """The dynamo exporter stores the buffer as an initializer like any weight; its FX metadata
    says it is a buffer (`%b_transform`), so the layer has no weight, as in TorchScript."""
    from gradprobe.diagnostics.loaders import load_model

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(FixedStemThenBranch(), (torch.randn(4, 32),), str(tmp_path / "m.onnx"),
                          dynamo=True, verbose=False)
    points = [p for p in load_model(tmp_path / "m.onnx", None, name="").probe_points
              if p.role == "linear"]
    assert points[0].weight is None and points[0].parameters, points[0]
    assert all(p.weight for p in points[1:]), points
    report = diagnose(str(tmp_path / "m.onnx"), DiagnoseOptions(batch_size=4))
    assert "vanishing-activations" not in _rules(report) + _rules(report, "info")


def test_a_real_decay_after_the_fixed_stem_is_still_found(tmp_path):
    torch.manual_seed(0)
    report = _lint(FixedStemThenBranch(decaying_tail=True), torch.randn(4, 32), tmp_path)
    found = [f for f in report.findings if f.rule == "vanishing-activations"]
    assert found and found[0].severity.value in ("warning", "error")
    assert all(not n.startswith("proj") for n in found[0].parameters), found[0].parameters


class FlatSidePath(nn.Module):
    """A large stem, then pre-norm residual blocks with 0.02-init branches; after the first
    block a side path through a one-channel LayerNorm (the same for every sample) is added."""

    def __init__(self, blocks: int = 6) -> None:
        super().__init__()
        self.stem1, self.stem2 = nn.Linear(16, 32), nn.Linear(32, 32)
        nn.init.normal_(self.stem1.weight, std=1.4)  # output variance ~30
        self.norm0 = nn.LayerNorm(32)
        self.norms = nn.ModuleList(nn.LayerNorm(32) for _ in range(blocks))
        self.fc1 = nn.ModuleList(nn.Linear(32, 128) for _ in range(blocks))
        self.fc2 = nn.ModuleList(nn.Linear(128, 32) for _ in range(blocks))
        for m in (*self.fc1, *self.fc2):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        self.side_proj, self.side_norm = nn.Linear(32, 1), nn.LayerNorm(1)  # always its shift, 0
        self.side_mid, self.side_out = nn.Linear(1, 4), nn.Linear(4, 32)
        nn.init.zeros_(self.side_mid.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm0(self.stem2(self.stem1(x)))
        for i, (norm, fc1, fc2) in enumerate(zip(self.norms, self.fc1, self.fc2, strict=True)):
            x = x + fc2(nn.functional.gelu(fc1(norm(x))))
            if i == 0:
                x = x + self.side_out(self.side_mid(self.side_norm(self.side_proj(x))))
        return x


def test_a_side_path_gone_flat_does_not_end_the_depth_axis(tmp_path):
    torch.manual_seed(0)
    report = _lint(FlatSidePath(), torch.randn(8, 16), tmp_path)
    assert "vanishing-activations" not in _rules(report), [f.message for f in report.findings]


class TanhOut(nn.Module):
    """A linear layer too large for the tanh after it (pre-activations of std ~5)."""

    def __init__(self, head: bool) -> None:
        super().__init__()
        self.body = nn.Linear(32, 32)
        nn.init.normal_(self.body.weight, std=5.0 / 32**0.5)
        self.head = nn.Linear(32, 4) if head else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def test_a_saturated_output_tanh_is_info_and_inside_the_network_a_warning(tmp_path):
    torch.manual_seed(0)
    out = _lint(TanhOut(head=False), torch.randn(64, 32), tmp_path)
    assert "saturated-activation" not in _rules(out)
    info = [f for f in out.findings if f.rule == "saturated-activation"]
    assert info and "network's output" in info[0].message and info[0].evidence["saturation"] > 0.5
    torch.manual_seed(0)
    inner = _lint(TanhOut(head=True), torch.randn(64, 32), tmp_path)
    assert "saturated-activation" in _rules(inner, "warning")
