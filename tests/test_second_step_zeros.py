"""A zero tensor whose gradient another zero tensor after it blocks at init is judged at the
second step.

timm's GlobalContext (gcresnet33ts, gcresnet50t, gcresnext50ts) zero-initialises `mlp_add.fc2`,
whose output is added to the block's signal, and ByobNet puts that block before `conv3_1x1`,
whose BatchNorm scale it zero-initialises too. At step 0 fc2's gradient is exactly zero (the
zero scale after it blocks it), and the linter said "it can never move" on every block, in
every export. After one step the BatchNorm scale has moved and fc2 gets its own gradient per
unit: a deliberate zero start. A zeroed first layer in front of a ReLU still gets no gradient
at the second step, and stays an error.
"""

from __future__ import annotations

import pytest
import torch
import zoo
from timm.layers import GlobalContext
from torch import nn

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions


class ContextBlock(nn.Module):
    """ByobNet's bottleneck with its attention before the last conv: x + bn3(conv3(gc(...)))."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                   nn.ReLU())
        self.attn = GlobalContext(c, fuse_add=True, fuse_scale=False, init_last_zero=True)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        nn.init.zeros_(self.bn3.weight)  # ByobNet's zero_init_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn3(self.conv3(self.attn(self.conv1(x)))))


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), ContextBlock(), ContextBlock(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def lint(model: nn.Module, how: str, tmp_path) -> list:  # noqa: ANN001
    x = torch.randn(4, 3, 16, 16)
    path = (zoo.export_torchscript(model, (x,), tmp_path / "net.pt") if how == "torchscript"
            else zoo.export_onnx(model, (x,), tmp_path / "net.onnx", train_bn=True))
    return diagnose(path, DiagnoseOptions(device="cpu", input_shapes=[[4, 3, 16, 16]])).findings


@pytest.mark.parametrize("how", ["torchscript", "onnx"])
def test_zero_behind_a_zero_scale_trains_from_the_second_step(tmp_path, how):
    findings = lint(net(), how, tmp_path)
    assert [f for f in findings if f.severity.value != "info"] == []
    fc2 = [f for f in findings if f.rule == "zero-weights" and "mlp_add.fc2" in f.layer]
    assert len(fc2) == 2 and all("second step" in f.message for f in fc2), fc2


@pytest.mark.parametrize("how", ["torchscript", "onnx"])
def test_zero_in_front_of_a_relu_behind_a_zero_scale_is_still_an_error(tmp_path, how):
    model = net()
    nn.init.zeros_(model[3].conv1[0].weight)
    errors = [(f.rule, f.layer) for f in lint(model, how, tmp_path) if f.severity.value == "error"]
    assert ("zero-weights", "3.conv1.0") in errors, errors


def units_moved_in_training(model: nn.Module, weights: list[str], steps: int) -> list[dict]:
    """SGD on a fixed batch; after each step, how many output units of each weight are no
    longer all zero."""
    torch.manual_seed(1)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    moved = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        moved.append({w: int((params[w].detach().flatten(1).abs().sum(1) > 0).sum())
                      for w in weights})
    return moved


def test_training_agrees_with_both_verdicts():
    """What the linter says, measured: the deliberate zero is still zero after step 1 and every
    unit has moved after step 2; the zeroed conv in front of the ReLU never moves."""
    fc2 = ["2.attn.mlp_add.fc2.weight", "3.attn.mlp_add.fc2.weight"]
    stock = units_moved_in_training(net(), fc2, steps=2)
    assert stock == [{fc2[0]: 0, fc2[1]: 0}, {fc2[0]: 32, fc2[1]: 32}]
    model = net()
    nn.init.zeros_(model[3].conv1[0].weight)
    dead = units_moved_in_training(model, ["3.conv1.0.weight"], steps=5)
    assert [m["3.conv1.0.weight"] for m in dead] == [0] * 5


class ZeroGate(nn.Module):
    """x + g * w(x) with the gate g zero-initialised: w's gradient is g times something, zero
    at step 0; g's own gradient is not, so g moves and w trains from the second step. With
    `dead`, the gate reads relu(g - 1): at zero it passes neither its gradient nor w's."""

    def __init__(self, dead: bool = False) -> None:
        super().__init__()
        self.w = nn.Linear(16, 16)
        self.g = nn.Parameter(torch.zeros(16))
        self.out = nn.Linear(16, 4)
        self.dead = dead

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.relu(self.g - 1.0) if self.dead else self.g
        return self.out(x + gate * self.w(x))


@pytest.mark.parametrize("dead", [False, True])
def test_weight_behind_a_zero_gate_is_judged_at_the_second_step(tmp_path, dead):
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    path = zoo.export_torchscript(ZeroGate(dead).eval(), (x,), tmp_path / "gate.pt")
    findings = diagnose(path, DiagnoseOptions(device="cpu", input_shapes=[[8, 16]])).findings
    on_w = [f for f in findings if f.rule == "dead-gradients" and "w.weight" in f.parameters]
    assert len(on_w) == 1, findings
    if dead:
        assert on_w[0].severity.value == "error"
    else:
        assert on_w[0].severity.value == "info" and "first step only" in on_w[0].message
        assert [f for f in findings if f.severity.value != "info"] == []


def test_zero_bias_behind_a_zero_gate_is_judged_at_the_second_step(tmp_path):
    """transformers' ZAYA scales its keys by `temp`, zero-initialised, and its q/k convolutions
    start with zero biases (the library's init): the biases' gradient is zero at the first step
    only, like the weights', but zero tensors stuck so were never asked at the second."""
    torch.manual_seed(0)
    model = ZeroGate().eval()
    nn.init.zeros_(model.w.bias)
    x = torch.randn(8, 16)
    path = zoo.export_torchscript(model, (x,), tmp_path / "gate.pt")
    findings = diagnose(path, DiagnoseOptions(device="cpu", input_shapes=[[8, 16]])).findings
    assert [f for f in findings if f.severity.value != "info"] == [], findings
    on_bias = [f for f in findings if f.rule == "dead-gradients" and "w.bias" in f.parameters]
    assert len(on_bias) == 1 and "first step only" in on_bias[0].message, findings


@pytest.mark.parametrize("how", ["torchscript", "onnx_legacy"])
def test_doge_dynamic_mask_is_a_zero_start(tmp_path, how):
    """transformers' Doge: `dt_proj` is read through exp(A * softplus(.)) with A zero-initialised.
    The linter says it trains from the second step, in a legacy ONNX file too, where nothing
    says `A` is a parameter (tests/test_exponent_rate_zero_start.py)."""
    import library_zoo

    built = library_zoo.build("transformers", "doge")
    path = library_zoo.export(built, how, tmp_path)
    findings = diagnose(path, library_zoo.lint_options(built, how)).findings
    assert [(f.rule, f.layer) for f in findings if f.severity.value != "info"] == []
    dt = [f for f in findings if f.rule == "dead-gradients" and "dt_proj" in f.layer]
    assert len(dt) == 2 and all("first step only" in f.message for f in dt), dt


def test_doge_dt_proj_trains_from_the_second_step():
    """What that verdict says, measured: Adam's first gradient on `dt_proj` is exactly zero,
    its second is not (~1e-11 under this toy loss, which Adam's normalised step turns into a
    real move)."""
    import library_zoo

    built = library_zoo.build("transformers", "doge")
    model = built.module.train()
    weights = {n: p for n, p in model.named_parameters() if n.endswith("dt_proj.weight")}
    start = {n: p.detach().clone() for n, p in weights.items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    moved = []
    for _ in range(2):
        out = model(*built.inputs)
        loss = sum(o.float().square().mean() for o in (out if isinstance(out, (list, tuple))
                                                        else [out]) if torch.is_tensor(o))
        opt.zero_grad()
        loss.backward()
        opt.step()
        moved.append(all(not torch.equal(p, start[n]) for n, p in weights.items()))
    assert moved == [False, True]
