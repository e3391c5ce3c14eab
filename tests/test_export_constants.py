"""A float tensor the exporter computed and named is no parameter that fails to train.

The dynamo export of torchvision's swin3d_s stores its shifted-window region ids (a tensor
filled with one count per region) as `val_1748`, reads it through
`masked_fill(mask != 0, -100).masked_fill(mask == 0, 0)`, which overwrites every value, so its
gradient is exactly zero; dead-gradients called it an error. The graph below is that pattern in
miniature, as the exporter writes it."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions


def _region_masked_model(ids_name: str) -> bytes:
    ids = numpy_helper.from_array(np.full((4,), 18.0, np.float32), ids_name)
    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32) / 2, "proj.weight")
    scalars = [numpy_helper.from_array(np.array(v, np.float32), n)
               for n, v in (("zero", 0.0), ("blocked", -100.0))]
    axes = [numpy_helper.from_array(np.array([a], np.int64), f"axis{a}") for a in (0, 1)]
    nodes = [
        helper.make_node("Unsqueeze", [ids_name, "axis1"], ["rows"]),
        helper.make_node("Unsqueeze", [ids_name, "axis0"], ["cols"]),
        helper.make_node("Sub", ["rows", "cols"], ["mask"]),
        helper.make_node("Equal", ["mask", "zero"], ["same"]),
        helper.make_node("Not", ["same"], ["other"]),
        helper.make_node("Where", ["other", "blocked", "mask"], ["filled"]),
        helper.make_node("Equal", ["filled", "zero"], ["open"]),
        helper.make_node("Where", ["open", "zero", "filled"], ["bias"]),
        helper.make_node("MatMul", ["x", "proj.weight"], ["h"], name="proj"),
        helper.make_node("Add", ["h", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [ids, weight, *scalars, *axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]) \
        .SerializeToString()


def _dead(ids_name: str) -> list:
    report = diagnose(_region_masked_model(ids_name),
                      options=DiagnoseOptions(device="cpu", batch_size=4))
    return [f for f in report.findings if f.rule == "dead-gradients"
            and ids_name in f.parameters]


def test_an_exporter_constant_with_zero_gradient_is_info() -> None:
    dead = _dead("val_1748")
    assert dead and all(f.severity.value == "info" for f in dead)
    assert "constant the export computed" in dead[0].message


def test_a_named_parameter_with_zero_gradient_is_still_an_error() -> None:
    dead = _dead("region_ids")
    assert dead and dead[0].severity.value == "error"
