"""What reaches the output decides: the verdicts issue 10 changed, on models built here.

- A zero that leaves no path around it (a zeroed LayerNorm scale under BERT's embeddings, a gate
  stuck at 0 in a block without a skip) is an error at the first point where the across-batch
  variance collapses — not info, and not a dead-gradients finding on the layers before it.
- vanishing-gradients does not depend on the probe's resolution (the global pool's 1/HxW).
- Folded eval-mode BatchNorm (legacy ONNX export) is re-normalised on batch statistics: a
  healthy torchvision ResNet-18 stays silent and a stage planted at 10x is found at that stage.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from zoo import export_onnx, export_torchscript

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.loaders.onnx_loader import load_onnx
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.report import Report


def serious(report: Report) -> list[str]:
    return [f"{f.severity.value} {f.rule} {f.layer}" for f in report.findings
            if f.severity.value != "info"]


def lint_traced(model: nn.Module, example: torch.Tensor, path: Path) -> Report:
    with torch.no_grad():
        export_torchscript(model, (example,), path)
    return diagnose(str(path), DiagnoseOptions(input_shapes=[list(example.shape)]))


class GatedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        self.gate = nn.Parameter(torch.zeros(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)) * self.gate)))


def test_a_gate_stuck_at_zero_is_one_error_where_the_signal_stops(tmp_path):
    torch.manual_seed(0)
    report = lint_traced(GatedMLP(), torch.randn(4, 32), tmp_path / "gate.pt")
    assert serious(report) == ["error zero-weights b"]
    finding = report.findings[0]
    assert finding.parameters == ["gate"] and "no longer depends on its input" in finding.message
    assert "nn.init.ones_(model.gate)" in finding.fix.code


def test_the_same_gate_open_is_clean(tmp_path):
    torch.manual_seed(0)
    model = GatedMLP()
    with torch.no_grad():
        model.gate.fill_(1.0)
    assert serious(lint_traced(model, torch.randn(4, 32), tmp_path / "open.pt")) == []


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, vocab_size=1000)
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def lint_bert(model: nn.Module, ids: torch.Tensor, path: Path) -> Report:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, (ids,), strict=False).save(str(path))
    return diagnose(str(path), DiagnoseOptions(input_shapes=[list(ids.shape)],
                                               input_dtypes=["int64"]))


def test_bert_with_a_zeroed_embedding_layernorm_is_an_error_there(tmp_path):
    model = tiny_bert()
    ids = torch.randint(0, 1000, (2, 16))
    assert serious(lint_bert(model, ids, tmp_path / "bert.pt")) == []
    with torch.no_grad():
        model.embeddings.LayerNorm.weight.zero_()
    report = lint_bert(model, ids, tmp_path / "bert0.pt")
    assert serious(report) == ["error zero-weights embeddings.LayerNorm"]
    assert report.findings[0].parameters == ["embeddings.LayerNorm.weight"]


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def test_vanishing_gradients_does_not_depend_on_the_probe_resolution(tmp_path):
    model = small_cnn()
    verdicts = {size: serious(lint_traced(model, torch.randn(2, 3, size, size),
                                          tmp_path / f"cnn{size}.pt"))
                for size in (8, 16, 64)}
    # Before: nothing at 8x8, "0.000434x" at 16x16, "2.78e-05x" at 64x64.
    assert verdicts == {8: [], 16: [], 64: []}


def test_a_sigmoid_cnn_still_vanishes_at_any_resolution(tmp_path):
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1), nn.Sigmoid()]
    for _ in range(9):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    for size in (8, 32):
        report = lint_traced(model, torch.randn(2, 3, size, size), tmp_path / f"s{size}.pt")
        assert any(f.rule == "vanishing-gradients" for f in report.findings), size


def export_legacy_eval(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(2, 3, 64, 64),), str(path), dynamo=False)
    return path


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs a CUDA device"))])
def test_a_folded_conv_output_is_normalised_per_channel_then_shifted(tmp_path, device):
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)  # the shift is beta alone
    with torch.no_grad():
        conv.weight.mul_(7.0)  # a scale the normalisation must remove
        norm.bias.copy_(torch.linspace(-1.0, 1.0, 8))
    path = export_legacy_eval(nn.Sequential(conv, norm, nn.ReLU()), tmp_path / "cbr.onnx")
    model = load_onnx(path).to(torch.device(device))
    conv_point = next(p for p in model.probe_points if p.role == "linear")
    seen: dict[str, torch.Tensor] = {}

    def conv_output(x: torch.Tensor) -> torch.Tensor:
        seen.clear()
        model.run([x.to(device)], tap=lambda p, v: seen.setdefault(p.node, v.detach()))
        return seen[conv_point.node].double().cpu()

    var, mean = torch.var_mean(conv_output(torch.randn(4, 3, 16, 16)), dim=(0, 2, 3),
                               correction=0)
    assert torch.allclose(mean, norm.bias.double(), atol=1e-5)
    assert torch.allclose(var, torch.ones(8, dtype=torch.float64), atol=1e-3)
    # One value per channel (batch 1, 1x1 output): normalised to 0, the shift alone remains.
    assert torch.allclose(conv_output(torch.randn(1, 3, 3, 3)).flatten(), norm.bias.double(),
                          atol=1e-3)


@pytest.mark.slow
def test_folded_batchnorm_is_renormalised_like_training(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    healthy = diagnose(str(export_legacy_eval(torchvision.models.resnet18(), tmp_path / "r.onnx")))
    assert serious(healthy) == []
    assert any("re-normalises" in note for note in healthy.model.notes)
    planted = torchvision.models.resnet18()
    with torch.no_grad():
        for module in planted.layer3.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.mul_(10)
    report = diagnose(str(export_legacy_eval(planted, tmp_path / "r10.onnx")))
    layers = {f.layer for f in report.findings if f.rule == "init-scale"}
    assert layers and all(layer.startswith("layer3.") for layer in layers), serious(report)
    assert not [f for f in report.findings if f.rule.startswith("exploding")]


def test_a_zero_folded_into_a_conv_names_the_batchnorm_it_may_be(tmp_path):
    # The eval export folds bn1 into conv1 and keeps no trace of bn1's name: a zero folded
    # weight is a zero conv weight or a zero BatchNorm scale, and the finding must say both
    # (before: "initialise conv1 with he_normal", a fix that does nothing to a zeroed bn1).
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    nn.init.zeros_(model.bn1.weight)
    folded = diagnose(str(export_legacy_eval(model, tmp_path / "bn.onnx")))
    errors = [f for f in folded.findings if f.severity.value == "error"]
    assert [(f.rule, f.layer) for f in errors] == [("zero-weights", "conv1")], serious(folded)
    assert "BatchNorm is folded into conv1" in errors[0].message
    assert "scale (its weight; initialise it with ones)" in errors[0].message
    # The dynamo exporter keeps the BatchNorm's scope on the fused conv: name it, with its line.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(2, 3, 64, 64),), str(tmp_path / "d.onnx"),
                          dynamo=True)
    dynamo = diagnose(str(tmp_path / "d.onnx"))
    errors = [f for f in dynamo.findings if f.severity.value == "error"]
    assert [(f.rule, f.layer, f.evidence.get("folded_norm")) for f in errors] == [
        ("zero-weights", "conv1", "bn1")], serious(dynamo)
    assert "nn.init.ones_(model.bn1.weight)" in errors[0].message
    # Unfolded, the BatchNorm is its own layer: named, and no word about a fold.
    traced = lint_traced(model.eval(), torch.randn(2, 3, 64, 64), tmp_path / "bn.pt")
    zero = [f for f in traced.findings if f.rule == "zero-weights" and f.severity.value != "info"]
    assert [f.layer for f in zero] == ["bn1"] and "folded" not in zero[0].message


class AudioStem(nn.Module):
    """wav2vec2's first feature-extractor layer: conv, GroupNorm over every channel, GELU."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(1, 16, 10, stride=5, bias=False)
        self.layer_norm = nn.GroupNorm(16, 16)
        self.conv2 = nn.Conv1d(16, 16, 3, stride=2, bias=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.layer_norm(self.conv(x)))
        return self.head(torch.nn.functional.gelu(self.conv2(h)).mean(dim=-1))


def test_a_zeroed_groupnorm_scale_is_named_in_a_legacy_onnx_file(tmp_path):
    # The legacy exporter writes GroupNorm as InstanceNormalization then a Mul by its weight, so
    # the zeroed scale is no layer's weight; the finding used to name the GELU after it, where
    # the variance collapses, instead of the GroupNorm that holds the zero.
    model = AudioStem()
    nn.init.zeros_(model.layer_norm.weight)
    path = tmp_path / "stem.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(2, 1, 400),), str(path), dynamo=False)
    report = diagnose(str(path))
    errors = [f for f in report.findings if f.severity.value == "error"]
    assert [(f.rule, f.layer) for f in errors] == [("zero-weights", "layer_norm")], serious(report)
    assert "from layer_norm on" in errors[0].message


def test_a_zeroed_first_layer_of_a_gelu_branch_is_an_error_and_the_last_is_deliberate(tmp_path):
    model = tiny_bert()
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight.zero_()  # the FFN's last layer: deliberate
    report = lint_bert(model, ids, tmp_path / "last.pt")
    assert serious(report) == []
    assert [f.layer for f in report.findings if f.rule == "zero-weights"] == [
        "encoder.layer.0.output.dense"]
    model = tiny_bert()
    with torch.no_grad():
        model.encoder.layer[0].intermediate.dense.weight.zero_()  # its first layer
    report = lint_bert(model, ids, tmp_path / "first.pt")
    assert serious(report) == ["error zero-weights encoder.layer.0.intermediate.dense"]
    assert "fed nothing" in report.findings[0].message


class SqueezeExcite(nn.Module):
    """conv -> global pool -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid gate, as in MobileNetV3."""

    def __init__(self, dead_bias: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(32, 16, 1), nn.Conv2d(16, 32, 1)
        self.head = nn.Linear(32, 10)
        with torch.no_grad():
            self.fc1.bias.fill_(dead_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.head((y * s).mean((2, 3)))


def test_squeeze_excite_units_seen_twice_are_not_judged_dead_but_a_dead_layer_is(tmp_path):
    torch.manual_seed(3)
    report = lint_traced(SqueezeExcite(), torch.randn(2, 3, 16, 16), tmp_path / "se.pt")
    assert not [f for f in report.findings if f.rule == "dead-relu" and f.severity.value != "info"]
    torch.manual_seed(3)
    report = lint_traced(SqueezeExcite(dead_bias=-10.0), torch.randn(2, 3, 16, 16),
                         tmp_path / "dead.pt")
    assert [f.layer for f in report.findings if f.rule == "dead-relu"
            and f.severity.value == "error"], serious(report)


class FinalScale(nn.Module):
    """A final RMSNorm-like scale after the last layer, as in Llama's `model.norm`."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64))
        self.norm_weight = nn.Parameter(torch.zeros(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_weight


def test_a_zero_scale_after_the_last_layer_is_found_from_the_output(tmp_path):
    torch.manual_seed(0)
    report = lint_traced(FinalScale(), torch.randn(4, 32), tmp_path / "final.pt")
    assert serious(report) == ["error zero-weights norm_weight"], serious(report)
    assert report.findings[0].parameters == ["norm_weight"]


class SwiGLUBlock(nn.Module):
    """x + down(silu(gate(norm(x))) * up(norm(x))), LLaMA's MLP: nothing is probed between the
    product and `down`."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.gate, self.up, self.down = nn.Linear(32, 64), nn.Linear(32, 64), nn.Linear(64, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        n = self.norm(h)
        return self.head(h + self.down(nn.functional.silu(self.gate(n)) * self.up(n)))


def test_a_zeroed_factor_of_a_product_is_an_error_there_and_fix_repairs_it(tmp_path):
    from gradprobe.diagnostics.repair import repair

    torch.manual_seed(0)
    model = SwiGLUBlock()
    with torch.no_grad():
        model.up.weight.zero_()
        model.up.bias.zero_()
    report = lint_traced(model, torch.randn(4, 16), tmp_path / "up.pt")
    assert serious(report) == ["error zero-weights up"]
    assert "fed nothing" in report.findings[0].message
    out = repair(tmp_path / "up.pt", tmp_path / "fixed.pt",
                 DiagnoseOptions(input_shapes=[[4, 16]]))
    assert [c.name for c in out.changed] == ["up.weight"]
    assert serious(out.after) == []
    # The same block with its LAST layer zeroed is the deliberate zero-init residual branch.
    torch.manual_seed(0)
    model = SwiGLUBlock()
    with torch.no_grad():
        model.down.weight.zero_()
    report = lint_traced(model, torch.randn(4, 16), tmp_path / "down.pt")
    assert serious(report) == []


class TinyAttention(nn.Module):
    """One attention with a learned bias per pair of positions (LeViT, T5 style)."""

    def __init__(self, masked: bool) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)
        self.pos_bias = nn.Parameter(torch.randn(4, 4) * 0.02)
        self.register_buffer("mask", torch.zeros(4, 4) if masked else torch.ones(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        n = x.shape[1]
        logits = q @ k.transpose(-1, -2) / 4 + (self.pos_bias * self.mask)[:n, :n]
        return self.proj(logits.softmax(dim=-1) @ v)


class AttentionClassifier(nn.Module):
    def __init__(self, masked: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn, self.head = TinyAttention(masked), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x).mean(dim=1))


def test_a_softmax_over_one_position_explains_a_bias_that_gets_no_gradient(tmp_path):
    # One token: the softmax is 1 whatever its logits, so the bias cannot move the output.
    # The input size did that, not the weights (timm's LeViT at 64 px: one token in its last
    # stage; before, an error "will never train" on each attention bias).
    one = lint_traced(AttentionClassifier(), torch.randn(2, 1, 16), tmp_path / "one.pt")
    found = [f for f in one.findings if f.rule == "dead-gradients"]
    assert [(f.severity.value, f.parameters) for f in found] == [("info", ["attn.pos_bias"])]
    assert "one position at this input size" in found[0].message
    four = lint_traced(AttentionClassifier(), torch.randn(2, 4, 16), tmp_path / "four.pt")
    assert serious(four) == [] and not [f for f in four.findings if f.rule == "dead-gradients"]
    # A bias multiplied by a zero mask is still an error where the softmax spans positions.
    cut = lint_traced(AttentionClassifier(masked=True), torch.randn(2, 4, 16),
                      tmp_path / "cut.pt")
    assert [(f.severity.value, f.parameters) for f in cut.findings
            if f.rule == "dead-gradients"] == [("error", ["attn.pos_bias"])]


class StdConvBlocks(nn.Module):
    """NF-ResNet's residual blocks (timm's ScaledStdConv2d: weight standardisation with a
    per-channel `gain`), the last gain of each branch zeroed as timm's zero_init_last does.
    Without `skip` the branch is all there is: the first block's zero gain cuts the signal
    (the second block's gain is left at 1, so there is one cut)."""

    def __init__(self, skip: bool) -> None:
        super().__init__()
        from timm.layers import ScaledStdConv2d
        torch.manual_seed(0)
        self.skip = skip
        self.stem = ScaledStdConv2d(3, 16, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.ModuleList([ScaledStdConv2d(16, 16, 3, padding=1),
                           ScaledStdConv2d(16, 16, 3, padding=1)]) for _ in range(2))
        for _first, last in self.blocks if skip else self.blocks[:1]:
            nn.init.zeros_(last.gain)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for first, last in self.blocks:
            branch = last(torch.relu(first(x)))
            x = torch.relu(x + branch if self.skip else branch)
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("how", ["torchscript", "onnx_legacy", "onnx_dynamo"])
def test_a_zero_gain_of_a_standardised_conv_is_a_deliberate_zero_behind_a_skip(tmp_path, how):
    # timm's nf_seresnet26: the gain is the scale of a batch_norm over the conv's weight, read
    # through `(gain * c).view(-1)` (TorchScript) or a Reshape of a BatchNormalization over an
    # initializer (ONNX). Before: TorchScript gave "will never train" on every conv (the probe
    # never unblocked the gain), and legacy ONNX saw no conv at all, only the head.
    pytest.importorskip("timm")
    from gradprobe.diagnostics.repair import repair

    example = torch.randn(2, 3, 16, 16)
    options = DiagnoseOptions(input_shapes=[list(example.shape)])
    for skip in (True, False):
        model = StdConvBlocks(skip).eval()
        path = tmp_path / f"std{skip}.{'pt' if how == 'torchscript' else 'onnx'}"
        with torch.no_grad():
            if how == "torchscript":
                export_torchscript(model, (example,), path)
            else:
                export_onnx(model, (example,), path, dynamo=how == "onnx_dynamo")
        report = diagnose(str(path), options)
        zero = [f for f in report.findings if f.rule == "zero-weights"]
        if skip:
            assert serious(report) == [], how
            assert {f.severity.value for f in zero} == {"info"} and len(zero) == 2, how
        else:
            # Nothing goes around the zero: the output no longer depends on the input, from the
            # conv whose standardised weight the zero gain scales (before: "deliberate", info).
            assert serious(report) == ["error zero-weights blocks.0.1"], how
            assert "no longer depends on its input" in zero[0].message
            # ONNX stores gain * gamma / sqrt(fan_in) as one tensor: the repair restores a unit
            # gain there (ones would make the conv 12x too strong at fan_in 144)
            out = repair(path, tmp_path / f"fixed{path.suffix}", options)
            assert serious(out.after) == [], how
            if how == "onnx_legacy":
                assert [(c.scheme, c.gain) for c in out.changed] == [
                    ("ones", pytest.approx((2 / 144) ** 0.5))]
