"""The ONNX interpreter against onnxruntime (and torch) on every zoo architecture, both exporters.

Each model is exported once per module (dynamo exports take seconds); every case then loads
the file, compares outputs with onnxruntime on the same batch, backpropagates, and checks the
names the loader recovered against the torch module they came from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import zoo

from gradprobe.diagnostics.loaders.onnx_loader import OnnxModel, load_onnx
from gradprobe.diagnostics.loaders.onnx_naming import is_anonymous

MODELS = ["mlp", "resnet", "mobilenet", "vit", "text_encoder", "lstm", "gru"]
Exported = Callable[..., tuple[Path, tuple[torch.Tensor, ...]]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    root = tmp_path_factory.mktemp("exports")
    cache: dict[tuple[str, bool, bool], tuple[Path, tuple[torch.Tensor, ...]] | str] = {}

    def get(name: str, *, dynamo: bool = False, train_bn: bool = False):
        key = (name, dynamo, train_bn)
        if key not in cache:
            args = zoo.example_inputs(name)
            kind = ("dynamo" if dynamo else "legacy") + ("_bn" if train_bn else "")
            path = root / f"{name}_{kind}.onnx"
            try:
                zoo.export_onnx(zoo.build(name), args, path, dynamo=dynamo, train_bn=train_bn)
                cache[key] = (path, args)
            except Exception as err:  # an exporter limitation, not ours
                cache[key] = f"torch.onnx.export(dynamo={dynamo}) cannot export {name}: {err}"
        found = cache[key]
        if isinstance(found, str):
            pytest.skip(found.splitlines()[0])
        return found

    return get


def _onnxruntime(path: Path, args: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
    return session.run(None, feeds)


def _backward_all(model: OnnxModel, outputs: list[torch.Tensor]) -> None:
    gen = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum()
               for o in outputs if o.is_floating_point())
    loss.backward()
    for name, param in model.parameters.items():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"


def _check_names(model: OnnxModel, torch_model: torch.nn.Module) -> None:
    state = set(torch_model.state_dict())
    modules = set(dict(torch_model.named_modules()))
    for name in model.parameters:
        if "." in name and not is_anonymous(name) and not name.endswith(".weight_bias"):
            assert name in state, f"parameter {name} is not a state-dict name"
    layers = [p.layer for p in model.probe_points]
    assert len(layers) == len(set(layers)), "duplicate layer names"
    for point in model.probe_points:
        if point.role in ("linear", "norm"):
            assert point.layer.split("#")[0] in modules, f"{point.layer} is not a module path"


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("name", MODELS)
def test_matches_onnxruntime_and_backpropagates(exported: Exported, name: str,
                                                dynamo: bool) -> None:
    path, args = exported(name, dynamo=dynamo)
    model = load_onnx(path, as_exported=True)  # folded BatchNorm as the file says
    outputs = model.run(list(args))
    expected = _onnxruntime(path, args)
    assert len(outputs) == len(expected)
    for ours, theirs in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(ours.detach().numpy(), theirs, rtol=1e-4, atol=1e-4)
    _backward_all(model, outputs)
    _check_names(model, zoo.build(name))
    assert any(p.role == "linear" for p in model.probe_points)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("name", MODELS)
def test_runs_on_another_device_without_reading_values(exported: Exported, name: str,
                                                      dynamo: bool) -> None:
    """The meta device has no data: any host read of a float value (a device sync on CUDA)
    or any mix of devices fails there, as it would on an accelerator."""
    path, args = exported(name, dynamo=dynamo)
    model = load_onnx(path).to(torch.device("meta"))
    assert all(p.device.type == "meta" for p in model.parameters.values())
    outputs = model.run([a.to("meta") for a in args], tap=lambda point, value: None)
    outputs[0].sum().backward()
    assert all(p.grad is not None for p in model.parameters.values())


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_train_mode_batchnorm_matches_torch_in_train_mode(exported: Exported, name: str) -> None:
    path, args = exported(name, train_bn=True)
    model = load_onnx(path)
    reference = zoo.build(name).train()
    with torch.no_grad():
        expected = reference(*args)
    outputs = model.run(list(args))
    np.testing.assert_allclose(outputs[0].detach().numpy(), expected.numpy(), rtol=1e-4,
                               atol=1e-4)
    _backward_all(model, outputs)
    torch_model = zoo.build(name)
    # Running statistics stay constants: the parameters are exactly the module's parameters.
    assert set(model.parameters) == {n for n, _ in torch_model.named_parameters()}
    _check_names(model, torch_model)
    norms = [p for p in model.probe_points if p.role == "norm"]
    assert norms and all(p.op == "BatchNormalization" for p in norms)
    assert not any(p.folded_batchnorm for p in model.probe_points)
    bn_convs = [p for p in model.probe_points if p.op == "Conv" and p.followed_by_norm]
    assert len(bn_convs) == len(norms)  # every BatchNorm here follows a conv


def test_batchnorm_nodes_run_on_batch_statistics(exported: Exported) -> None:
    """A batch 100x larger than the running statistics expect still comes out of BN
    normalised: the node used the batch's own statistics."""
    path, args = exported("resnet", train_bn=True)
    model = load_onnx(path)
    seen: dict[str, torch.Tensor] = {}
    model.run([args[0] * 100.0], tap=lambda p, v: seen.setdefault(p.layer, v.detach()))
    bn = seen["bn1"]
    assert math.isclose(float(bn.var()), 1.0, rel_tol=0.1)


def test_legacy_resnet_names_and_folded_batchnorm(exported: Exported) -> None:
    path, _ = exported("resnet")
    model = load_onnx(path)
    by_layer = {p.layer: p for p in model.probe_points}
    conv = by_layer["layer1.0.conv1"]
    assert conv.role == "linear" and conv.nonlinearity == "relu"
    assert conv.fan_in == 8 * 9 and conv.fan_out == 8 * 9 and conv.channel_axis == 1
    assert conv.folded_batchnorm and conv.weight.startswith("onnx::Conv_")
    assert conv.feeds == ("/layer1/layer1.0/relu/Relu",)
    # nn.ReLU applied twice in a block: the second call is a layer of its own
    assert by_layer["layer1.0.relu#2"].node == "/layer1/layer1.0/relu_1/Relu"
    assert by_layer["layer2.0.downsample.0"].nonlinearity == "relu"  # through the residual add
    assert not by_layer["fc"].folded_batchnorm and by_layer["fc"].weight == "fc.weight"
    folded = sum(p.folded_batchnorm for p in model.probe_points)
    assert folded == 10
    assert any("BatchNorm folded into 10" in note for note in model.notes)
    # the folded biases are de-duplicated in the file: every conv still has its own
    biases = [p.bias for p in model.probe_points if p.op == "Conv"]
    assert len(set(biases)) == len(biases)
    assert len(model.shared_parameters[biases[0]]) == 5


def test_dynamo_resnet_folded_batchnorm_keeps_conv_names(exported: Exported) -> None:
    path, _ = exported("resnet", dynamo=True)
    model = load_onnx(path)
    convs = [p for p in model.probe_points if p.op == "Conv"]
    assert [p.layer for p in convs][:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert all(p.folded_batchnorm for p in convs)
    assert any("BatchNorm folded into 10 Conv" in note for note in model.notes)
    relus = [p.layer for p in model.probe_points if p.role == "activation"]
    assert relus[:3] == ["relu", "layer1.0.relu", "layer1.0.relu#2"]


def test_dynamo_vit_untied_layernorms_and_attention(exported: Exported) -> None:
    """The dynamo exporter lets every LayerNorm of a fresh encoder read one initializer; each
    gets its own parameter, under the name its module had."""
    path, _ = exported("vit", dynamo=True)
    model = load_onnx(path)
    for name in ("encoder.layers.0.norm2.weight", "encoder.layers.1.norm1.weight",
                 "encoder.layers.1.norm2.bias", "norm.weight",
                 "encoder.layers.1.self_attn.out_proj.weight"):
        assert name in model.parameters
    assert set(model.shared_parameters["norm.weight"]) >= {"encoder.layers.0.norm1", "norm"}
    points = {p.layer: p for p in model.probe_points}
    in_proj = points["encoder.layers.0.self_attn"]
    assert in_proj.op == "MatMul" and in_proj.weight_layout == "in_out"
    assert (in_proj.fan_in, in_proj.fan_out) == (32, 96) and in_proj.channel_axis == -1
    assert in_proj.bias == "encoder.layers.0.self_attn.in_proj_bias"
    linear1 = points["encoder.layers.0.linear1"]
    assert linear1.nonlinearity == "gelu" and linear1.feeds
    assert points["encoder.layers.0.gelu"].channel_axis == -1
    assert points["encoder.layers.0.self_attn.softmax"].nonlinearity == "softmax"


def test_text_encoder_ids_range_and_embedding(exported: Exported) -> None:
    for dynamo in (False, True):
        path, _ = exported("text_encoder", dynamo=dynamo)
        model = load_onnx(path)
        (spec,) = model.inputs
        assert spec.dtype == torch.int64 and spec.value_range == (0, 100)
        embed = next(p for p in model.probe_points if p.op == "Gather")
        assert embed.layer == "embed" and embed.weight == "embed.weight"
        assert (embed.fan_in, embed.fan_out) == (32, 100)


def test_recurrent_layers(exported: Exported) -> None:
    for name, gates in (("lstm", 4), ("gru", 3)):
        path, _ = exported(name)
        model = load_onnx(path)
        rnn = [p for p in model.probe_points if p.op in ("LSTM", "GRU")]
        assert [p.layer for p in rnn] == ["rnn", "rnn#2"]
        assert (rnn[0].fan_in, rnn[0].fan_out) == (8, gates * 16)
        assert (rnn[1].fan_in, rnn[1].fan_out) == (16, gates * 16)
        assert all(p.channel_axis == -1 for p in rnn)
