"""Load-time fast paths of the ONNX interpreter: the fused BatchNorm kernel when nothing reads
the running statistics, and shape arithmetic folded for the concrete input shapes. Each is
checked against onnxruntime on a real export."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from gradprobe.diagnostics.loaders.onnx_loader import load_onnx


def _export(module: nn.Module, example: torch.Tensor, path: Path, *, train_bn: bool = False,
            dynamic_batch: bool = True) -> Path:
    module.eval()
    mode = torch.onnx.TrainingMode.TRAINING if train_bn else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, training=mode,
                          do_constant_folding=not train_bn, input_names=["x"],
                          output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}} if dynamic_batch else None)
    return path


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})[0]


def _ctx_of(model, op_type: str) -> list:
    return [step[1] for step in model._plan.steps if step[1].op_type == op_type]


def test_training_batchnorm_takes_the_fused_kernel_and_matches_onnxruntime(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                        nn.BatchNorm2d(4))
    x = torch.randn(4, 3, 9, 9)
    path = _export(net, x, tmp_path / "bn.onnx", train_bn=True)
    declared = [len(n.output) for n in onnx.load(str(path)).graph.node
                if n.op_type == "BatchNormalization"]
    assert declared and all(n == 3 for n in declared)  # running mean and var declared
    model = load_onnx(path)
    assert [c.num_outputs for c in _ctx_of(model, "BatchNormalization")] == [1, 1]
    (ours,) = model.run([x])
    np.testing.assert_allclose(ours.detach().numpy(), _ort(path, x), rtol=1e-4, atol=1e-5)


def test_batchnorm_whose_running_mean_is_read_keeps_every_output(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 2, 3])
    outs = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
            for n in ("y", "rm")]
    inits = [onnx.numpy_helper.from_array(np.full(2, v, np.float32), name)
             for name, v in (("s", 1.0), ("b", 0.0), ("m", 0.0), ("v", 1.0))]
    node = onnx.helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"],
                                 ["y", "rm", "rv"], training_mode=1)
    graph = onnx.helper.make_graph([node], "g", [x], outs, inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 15)])
    loaded = load_onnx(model.SerializeToString())
    assert [c.num_outputs for c in _ctx_of(loaded, "BatchNormalization")] == [2]
    data = torch.randn(4, 2, 3)
    y, running_mean = loaded.run([data])
    assert torch.allclose(running_mean, data.mean(dim=(0, 2)) * 0.1, atol=1e-6)
    assert y.shape == data.shape
