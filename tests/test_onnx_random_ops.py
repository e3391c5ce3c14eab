"""Random draws run, reproducibly, inside the interpreter (a masked-autoencoder ViT's patch mask
comes from RandomUniformLike)."""

from __future__ import annotations

import onnx
import torch
from onnx import TensorProto, helper

from gradprobe.diagnostics.loaders.onnx_loader import load_onnx


def _model(op: str, **attrs) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 256])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 256])
    nodes = [helper.make_node(op, ["x"], ["r"], **attrs), helper.make_node("Add", ["x", "r"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]).SerializeToString()


def test_random_uniform_like_draws_in_its_range_reproducibly():
    model = load_onnx(_model("RandomUniformLike", low=2.0, high=3.0, seed=5.0))
    x = torch.zeros(4, 256)
    first, second = model.run([x])[0], model.run([x])[0]
    assert torch.equal(first, second)
    assert 2.0 <= first.min().item() and first.max().item() < 3.0 and first.std().item() > 0.1


def test_random_normal_like_has_its_mean_and_scale():
    model = load_onnx(_model("RandomNormalLike", mean=1.0, scale=2.0))
    value = model.run([torch.zeros(4, 256)])[0]
    assert abs(value.mean().item() - 1.0) < 0.3 and abs(value.std().item() - 2.0) < 0.3


def test_the_checked_model_is_valid_onnx():
    onnx.checker.check_model(onnx.load_from_string(_model("RandomUniformLike")))
