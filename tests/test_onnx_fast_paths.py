"""Load-time fast paths of the ONNX interpreter: the fused BatchNorm kernel when nothing reads
the running statistics, and shape arithmetic folded for the concrete input shapes. Each is
checked against onnxruntime on a real export."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import zoo
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


class _Flatten(nn.Module):
    """`x.reshape(x.shape[0], -1)`: the legacy exporter writes Shape -> Gather -> Unsqueeze
    -> Concat -> Reshape, recomputed every run unless folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 5 * 5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(h.reshape(h.shape[0], -1))


def test_shape_arithmetic_is_folded_per_input_shape_and_matches_onnxruntime(tmp_path):
    torch.manual_seed(0)
    path = _export(_Flatten(), torch.randn(2, 3, 7, 7), tmp_path / "flatten.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Shape" in ops and "Concat" in ops
    model = load_onnx(path)
    plan = model._plan
    folded_ops = {plan.steps[k][1].op_type for k in plan.static}
    assert {"Shape", "Concat"} <= folded_ops and "Conv" not in folded_ops
    assert len(plan.dynamic_steps) == len(plan.steps) - len(plan.static)
    for batch in (2, 3, 2):  # a new batch size folds again; the old one folds back
        x = torch.randn(batch, 3, 7, 7)
        first = model.run([x])[0]
        again = model.run([x])[0]  # from the folded plan
        assert model._folded_for[0][0] == (batch, 3, 7, 7)
        np.testing.assert_allclose(first.detach().numpy(), _ort(path, x), rtol=1e-4, atol=1e-5)
        assert torch.equal(first, again)


def test_folded_plan_keeps_gradients_and_taps(tmp_path):
    path = _export(_Flatten(), torch.randn(2, 3, 7, 7), tmp_path / "flatten.onnx")
    model = load_onnx(path)
    x = torch.randn(2, 3, 7, 7)
    grads, seen = [], []
    for _ in range(2):  # recording run, then the folded plan
        for p in model.parameters.values():
            p.grad = None
        taps: list[str] = []
        (out,) = model.run([x], tap=lambda point, value: taps.append(point.layer))
        out.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.parameters.items()})
        seen.append(taps)
    assert seen[0] == seen[1] and seen[0]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(zoo.BUILDERS))
def test_zoo_models_run_the_same_from_the_folded_plan(tmp_path, name):
    """Every zoo architecture (transformers included, where the legacy exporter writes the most
    shape arithmetic): the folded plan computes what the full plan computes, forward and
    backward, and a second batch size folds afresh."""
    args = zoo.example_inputs(name)
    path = zoo.export_onnx(zoo.build(name), args, tmp_path / f"{name}.onnx")
    model = load_onnx(path)
    for batch in (4, 3):
        inputs = list(zoo.example_inputs(name, batch))
        runs = []
        for _ in range(2):  # the full plan (recording), then the folded one
            for p in model.parameters.values():
                p.grad = None
            out = model.run(inputs)[0]
            out.float().sum().backward()
            runs.append((out.detach(), {n: p.grad for n, p in model.parameters.items()}))
        assert torch.equal(runs[0][0], runs[1][0])
        for n, g in runs[0][1].items():
            assert (g is None) == (runs[1][1][n] is None), n
            assert g is None or torch.equal(g, runs[1][1][n]), n
