"""If, as the legacy exporter writes it for control flow on sizes (timm's SAM2 Hiera pads its
window position embedding `if pad > 0`): the branch bodies read the enclosing graph's values
(activations and parameters) by name. Checked against onnxruntime and torch autograd on both
branches; onnx's own If cases run in test_onnx_ops."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import zoo
from onnx import TensorProto, helper
from torch import nn

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.loaders.onnx_loader import load_onnx
from gradprobe.diagnostics.options import DiagnoseOptions


@torch.jit.script
def _pad_to_multiple_of_4(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    pad = (4 - x.shape[-1] % 4) % 4
    if pad > 0:  # noqa: SIM108  (the statement the exporter turns into an If)
        x = torch.nn.functional.pad(x, [0, pad]) * scale
    else:
        x = x + scale
    return x


class _PadsWhenNeeded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.scale = nn.Parameter(torch.tensor([1.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # width 6 pads to 8: the then branch reads the activation and `scale` from outside
        return torch.relu(_pad_to_multiple_of_4(self.proj(x), self.scale))


@pytest.fixture(scope="module")
def if_file(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    net = _PadsWhenNeeded().eval()
    path = zoo.export_onnx(net, (torch.randn(2, 3, 6),),
                           tmp_path_factory.mktemp("control") / "if.onnx")
    return net, path


def test_the_legacy_export_holds_an_if_reading_outer_values(if_file) -> None:
    _, path = if_file
    ifs = [n for n in onnx.load(str(path)).graph.node if n.op_type == "If"]
    assert len(ifs) == 1 and len(ifs[0].input) == 1  # the branches read the rest by name


def test_if_matches_onnxruntime_and_torch_gradients(if_file) -> None:
    net, path = if_file
    model = load_onnx(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 6)
    out = model.run([x])[0]
    expected = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert out.shape == (2, 3, 8)  # the padding branch
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-5, atol=1e-6)

    cotangent = torch.randn_like(out)
    (out * cotangent).sum().backward()
    net.zero_grad()
    (net(x) * cotangent).sum().backward()
    torch.testing.assert_close(model.parameters["scale"].grad, net.scale.grad)
    torch.testing.assert_close(model.parameters["proj.bias"].grad, net.proj.bias.grad)


def test_if_takes_the_other_branch_when_the_condition_changes() -> None:
    # y = x * 2 if sum(x) > 0 else x - w: the else branch reads the outer initializer w
    then_graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t"])], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    else_graph = helper.make_graph(
        [helper.make_node("Sub", ["x", "w"], ["e"])], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_graph,
                              else_branch=else_graph, name="choose")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
         helper.make_tensor("w", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])])
    model = load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                      .SerializeToString())
    positive = torch.ones(2, 3)
    torch.testing.assert_close(model.run([positive])[0], positive * 2)
    negative = -torch.ones(2, 3)
    out = model.run([negative])[0]
    torch.testing.assert_close(out, negative - torch.tensor([1.0, 2.0, 3.0]))
    out.sum().backward()
    torch.testing.assert_close(model.parameters["w"].grad, torch.full((3,), -2.0))


def test_a_model_with_an_if_lints(if_file) -> None:
    _, path = if_file
    report = diagnose(path, options=DiagnoseOptions(device="cpu", batch_size=2))
    assert report.layers and all(f.severity.value != "error" for f in report.findings)
