"""What an export writes around the layers, read as what it is.

- timm's "same" padding (`Conv2dSame`, EfficientNet-X's space-to-depth conv) computes its pads
  from the input's size with `clamp(..., min=0)`. Traced, that is a clamp over a 0-d value: shape
  arithmetic, not a ReLU over units (it made `efficientnet_x_b3` fail to lint, then report "100% of
  the 1 units ... never active").
- GroupNorm as both ONNX exporters write it: InstanceNormalization over the groups with a constant
  unit scale, a Reshape back, then `* weight + bias`. A zero-init last GroupNorm of a residual
  branch (timm's ResNetV2 hybrids, `vit_small_r26_s32_224`) is the norm's zero scale, and the dynamo
  exporter stores that zero scale and the zero shift as one tensor.
- A parameter that reaches the output only through `where(input_ids == token, ...)` (pocket_tts's
  BOS latent) gets a zero gradient from a probe batch without that token: info, not an error.
"""

from __future__ import annotations

import pytest
import torch
import zoo
from timm.layers import Conv2dSame
from torch import nn

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.loaders import load_model
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.selection_gates import FlowNode, selection_gate

EXPORTS = ["torchscript", "onnx_legacy", pytest.param("onnx_dynamo", marks=pytest.mark.slow)]


def _export(net: nn.Module, args: tuple[torch.Tensor, ...], how: str, tmp_path):  # noqa: ANN001
    if how == "torchscript":
        return zoo.export_torchscript(net, args, tmp_path / "net.pt")
    return zoo.export_onnx(net, args, tmp_path / f"{how}.onnx", dynamo=how == "onnx_dynamo")


def _serious(report) -> list[tuple[str, str, str]]:  # noqa: ANN001
    return [(f.rule, f.layer, f.message) for f in report.findings if f.severity.value != "info"]


# --- "same" padding ------------------------------------------------------------------------

class _SamePadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv2dSame(3, 16, 3, stride=2, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.down = Conv2dSame(16, 32, 2, stride=2, bias=False)  # EfficientNet-X's conv_s2d
        self.bn2 = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(self.bn2(self.down(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("how", EXPORTS)
def test_same_padding_arithmetic_is_not_a_relu(tmp_path, how: str) -> None:
    torch.manual_seed(0)
    path = _export(_SamePadNet().eval(), (torch.randn(8, 3, 31, 31),), how, tmp_path)
    model = load_model(path)
    relus = [p for p in model.probe_points if p.nonlinearity == "relu" and p.role == "activation"]
    assert len(relus) == 2  # the two real ReLUs; the padding clamps are not probe points
    report = diagnose(path, options=DiagnoseOptions(device="cpu", input_shapes=[[8, 3, 31, 31]]))
    assert _serious(report) == []
    assert not [f for f in report.findings if f.rule == "dead-relu"]


# --- GroupNorm's affine after InstanceNormalization ------------------------------------------

class _GroupNormBlock(nn.Module):
    """ResNetV2's non-pre-activation bottleneck in miniature: conv-GN-ReLU, conv-GN, and the
    last GroupNorm's scale zero (`zero_init_last`), then ReLU(x + branch)."""

    def __init__(self, c: int, skip: bool) -> None:
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(4, c)
        self.conv2, self.norm2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(4, c)
        nn.init.zeros_(self.norm2.weight)
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))
        return torch.relu(x + y if self.skip else y)


def _group_norm_net(skip: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                         _GroupNormBlock(16, skip), _GroupNormBlock(16, skip),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


@pytest.mark.parametrize("how", EXPORTS)
def test_zero_init_last_group_norm_is_the_norms_zero_scale(tmp_path, how: str) -> None:
    path = _export(_group_norm_net(skip=True), (torch.randn(8, 3, 16, 16),), how, tmp_path)
    model = load_model(path)
    norms = [p for p in model.probe_points if p.role == "norm"]
    assert len(norms) == 5 and all(p.weight and p.bias for p in norms)
    zero_scales = [p for p in norms
                   if p.weight and bool(torch.all(model.parameters[p.weight] == 0))]
    assert [p.layer for p in zero_scales] == ["3.norm2", "4.norm2"]
    # the zero scale and the zero shift are separate parameters, even where the file has one
    assert all(p.weight != p.bias for p in zero_scales)

    report = diagnose(path, options=DiagnoseOptions(device="cpu", input_shapes=[[8, 3, 16, 16]]))
    assert _serious(report) == []
    infos = {(f.rule, f.layer) for f in report.findings}
    assert ("zero-weights", "3.norm2") in infos and ("zero-weights", "4.norm2") in infos


@pytest.mark.parametrize("how", EXPORTS)
def test_zero_group_norm_without_a_skip_is_an_error(tmp_path, how: str) -> None:
    path = _export(_group_norm_net(skip=False), (torch.randn(8, 3, 16, 16),), how, tmp_path)
    report = diagnose(path, options=DiagnoseOptions(device="cpu", input_shapes=[[8, 3, 16, 16]]))
    errors = [f for f in report.findings if f.severity.value == "error"]
    assert errors and errors[0].layer == "3.norm2"


# --- a select the token ids decide -----------------------------------------------------------

class _WithBos(nn.Module):
    """pocket_tts's embedding in miniature: a learnt BOS vector, projected, replaces the token
    embedding where the input holds the BOS id (the last id: random tokens may miss it).
    `gated=False`: a select on the embeddings' own values that never passes it."""

    def __init__(self, gated: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.bos = nn.Parameter(torch.zeros(8))
        self.bos_proj = nn.Linear(8, 16, bias=False)
        self.head = nn.Linear(16, 50)
        self.gated = gated

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        bos = self.bos_proj(self.bos)
        if self.gated:
            x = torch.where((ids == 49).unsqueeze(-1), bos, x)
        else:  # a select the model's own values decide, and never pass: a real dead vector
            x = torch.where((x.sum(-1, keepdim=True) > 1e9), bos, x)
        return self.head(torch.relu(x))


@pytest.mark.parametrize("how", ["torchscript", pytest.param("onnx_dynamo",
                                                              marks=pytest.mark.slow)])
@pytest.mark.parametrize("gated", [True, False], ids=["token-select", "model-select"])
def test_parameter_behind_a_token_select_is_info(tmp_path, gated: bool, how: str) -> None:
    # the legacy exporter folds `bos_proj(bos)` into a constant: nothing is left to judge
    torch.manual_seed(0)
    ids = torch.randint(0, 49, (4, 6))
    path = _export(_WithBos(gated).eval(), (ids,), how, tmp_path)
    options = DiagnoseOptions(device="cpu", input_shapes=[[4, 6]], seed=0)
    # the dynamo exporter stores bos_proj(bos) as one computed tensor (`linear`)
    found = [f for f in diagnose(path, options=options).findings if f.rule == "dead-gradients"
             and not f.parameters[0].startswith(("embed.", "head."))]
    assert len(found) == 1 and found[0].parameters[0] in ("bos", "linear")
    if gated:
        assert found[0].severity.value == "info"
        assert ("aten::where" if how == "torchscript" else "Where@") in found[0].message
    else:
        assert found[0].severity.value == "error"


class _AudioTokenMlp(nn.Module):
    """Higgs Audio's decoder layer in miniature: the positions that hold the audio token (the
    last id) go through their own MLP, written back with an index_put (a ScatterND in a dynamo
    file). A random token batch may hold none, and the MLP then gets exactly zero gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.audio_mlp = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        audio = ids == 49
        x = x.index_put((audio,), self.audio_mlp(x[audio]))
        return self.head(torch.relu(x))


@pytest.mark.parametrize("how", ["torchscript", pytest.param("onnx_dynamo",
                                                              marks=pytest.mark.slow)])
def test_layer_behind_a_token_scatter_is_info(tmp_path, how: str) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 6))
    ids[0, 0] = 49  # the export traces the audio path
    path = _export(_AudioTokenMlp().eval(), (ids,), how, tmp_path)
    # seed 4: a probe batch without the audio token (seed 0 draws one)
    options = DiagnoseOptions(device="cpu", input_shapes=[[4, 6]], seed=4)
    found = [f for f in diagnose(path, options=options).findings if f.rule == "dead-gradients"
             and f.parameters[0].startswith("audio_mlp.")]
    assert [f.severity.value for f in found] == ["info", "info"], found
    assert ("aten::index_put" if how == "torchscript" else "ScatterND@") in found[0].message


def test_selection_gate_needs_every_path_gated() -> None:
    ids_eq = FlowNode("eq", "", ("ids",), ("mask",))
    proj = FlowNode("proj", "", ("p",), ("v",))
    where = FlowNode("where", "where", ("mask", "v", "x"), ("y",))
    assert selection_gate([ids_eq, proj, where], ["p"], ["ids"], ["y"]) == "where"
    # a second path around the select: the parameter reaches the output
    also = FlowNode("add", "", ("v", "y"), ("z",))
    assert selection_gate([ids_eq, proj, where, also], ["p"], ["ids"], ["z"]) is None
    # a condition that does not come from an integer input is no gate, nor one computed
    # through a parameter (an embedding of the ids)
    assert selection_gate([ids_eq, proj, where], ["p"], [], ["y"]) is None
    embed = FlowNode("embed", "", ("ids", "table"), ("mask",))
    assert selection_gate([embed, proj, where], ["p"], ["ids"], ["y"], ["p", "table"]) is None
    # the parameter as the condition itself is not gated by it
    assert selection_gate([FlowNode("w", "where", ("p", "a", "b"), ("y",))], ["p"], ["p"],
                          ["y"]) is None
