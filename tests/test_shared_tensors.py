"""A module shared by several blocks, exported to ONNX: the file stores its weights once, the
loader gives each reading layer a copy, and torch's gradient of the shared parameter is the sum
over the copies. timm's CoaT shares one relative-position conv per scale between every block of
that scale; the last block's use never reaches the class token the head reads, so that copy's
gradient is exactly zero while the tensor trains (a dead-gradients false alarm on coat_mini)."""

from __future__ import annotations

import pytest
import torch
import zoo
from torch import nn

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.loaders.onnx_loader import load_onnx
from gradprobe.diagnostics.options import DiagnoseOptions


class _Block(nn.Module):
    """Tokens mix into the class token first, then `encoding` updates the other tokens only:
    a CoaT block in miniature."""

    def __init__(self, encoding: nn.Linear) -> None:
        super().__init__()
        self.encoding = encoding
        self.mix = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(x).mean(1, keepdim=True)
        return torch.cat([x[:, :1], x[:, 1:] + torch.relu(self.encoding(x[:, 1:]))], 1)


class _TwoBlocks(nn.Module):
    """`shared=True`: both blocks call one `encoding` (registered first at the top, as CoaT's
    `crpe2`). `shared=False`: each block has its own, and the last one really never trains."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.encoding = nn.Linear(8, 8)
        self.blocks = nn.ModuleList(
            [_Block(self.encoding if shared else nn.Linear(8, 8)) for _ in range(2)])
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, 0])


def _export(tmp_path, shared: bool, dynamo: bool = False):
    torch.manual_seed(0)
    net = _TwoBlocks(shared).eval()
    x = torch.randn(4, 5, 8)
    path = zoo.export_onnx(net, (x,), tmp_path / f"net_{shared}_{dynamo}.onnx", dynamo=dynamo)
    return net, x, path


def test_copies_of_a_shared_tensor_sum_to_torchs_gradient(tmp_path) -> None:
    net, x, path = _export(tmp_path, shared=True)
    model = load_onnx(path)
    copies = model.copies_of("encoding.bias")
    assert len(copies) == 2 and "encoding.bias" in copies  # one file tensor, one copy per block
    assert sorted(model.copies_of(copies[1])) == sorted(copies)
    assert model.copies_of("head.bias") == ["head.bias"]

    cotangent = torch.randn(4, 4)
    (net(x) * cotangent).sum().backward()
    out = model.run([x])[0]
    assert torch.allclose(out, net(x), atol=1e-5)
    (out * cotangent).sum().backward()
    grads = [model.parameters[c].grad for c in copies]
    # the last block's use never reaches the class token: exactly zero, as in torch for that use
    assert sum(bool(torch.all(g == 0)) for g in grads) == 1
    torch.testing.assert_close(sum(grads), net.encoding.bias.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_shared_module_is_not_dead_gradients(tmp_path, dynamo: bool) -> None:
    _, _, path = _export(tmp_path, shared=True, dynamo=dynamo)
    report = diagnose(path, options=DiagnoseOptions(device="cpu", batch_size=4))
    dead = [f for f in report.findings if f.rule == "dead-gradients"]
    assert dead and all(f.severity.value == "info" for f in dead)
    assert any("as stored, it trains" in f.message for f in dead)


def test_a_separate_parameter_that_never_trains_is_still_an_error(tmp_path) -> None:
    _, _, path = _export(tmp_path, shared=False)
    report = diagnose(path, options=DiagnoseOptions(device="cpu", batch_size=4))
    errors = [f for f in report.findings if f.rule == "dead-gradients"
              and f.severity.value == "error"]
    assert errors and any("blocks.1.encoding" in p for f in errors for p in f.parameters)


def test_one_node_reading_a_tensor_twice_gets_a_copy_per_slot(tmp_path) -> None:
    # The dynamo exporter stores nf_seresnet's folded zero gain and the zero shift of the same
    # weight-standardisation BatchNormalization as one tensor. Before, the probe's unblocked
    # pass reset the scale and so moved the shift too: every weight of that conv shifted by
    # the new scale, and nf_seresnet50's dynamo file got an exploding-gradients error.
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    zeros = numpy_helper.from_array(torch.zeros(4).numpy(), "shared_zero")
    ones = numpy_helper.from_array(torch.ones(4).numpy(), "unit_var")
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "shared_zero", "shared_zero",
                                                 "shared_zero", "unit_var"], ["y"])],
        "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 3, 3])],
        [zeros, ones])
    path = tmp_path / "bn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    model = load_onnx(path)
    scale_and_shift = [n for n in model.parameters if n.startswith("shared_zero")]
    assert len(scale_and_shift) == 2 and "shared_zero" in scale_and_shift
    point = next(p for p in model.probe_points if p.role == "norm")
    assert (point.weight, point.bias) == ("shared_zero", scale_and_shift[1])
    with torch.no_grad():
        model.parameters["shared_zero"].fill_(1.0)
    assert torch.all(model.parameters[scale_and_shift[1]] == 0)
