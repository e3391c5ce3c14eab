"""ONNX loading: bad files, unsupported operators, exporter de-duplication, external data,
graph order, local functions, name recovery and writing a fixed model back."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import zoo
from onnx import TensorProto, helper

from gradprobe.diagnostics.errors import (
    InputSpecError,
    ModelLoadError,
    ProbeError,
    UnsupportedOperator,
)
from gradprobe.diagnostics.loaders.onnx_loader import load_onnx
from gradprobe.diagnostics.loaders.onnx_naming import ScopeNamer, is_anonymous, node_scope


def _zero_mlp() -> torch.nn.Module:
    """Four Linear layers, all but the head zero: the two 32x32 weights are identical, so the
    exporters store them once."""
    model = zoo.MLP((16, 32, 32, 32, 8))
    for module in list(model.net)[:-1]:
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.zeros_(module.weight)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("loader")
    torch.manual_seed(0)
    args = zoo.example_inputs("mlp")
    mlp = zoo.export_onnx(zoo.build("mlp"), args, root / "mlp.onnx")
    zero_legacy = zoo.export_onnx(_zero_mlp(), args, root / "zero_legacy.onnx")
    zero_dynamo = zoo.export_onnx(_zero_mlp(), args, root / "zero_dynamo.onnx", dynamo=True)
    return {"root": root, "args": args, "mlp": mlp, "zero_legacy": zero_legacy,
            "zero_dynamo": zero_dynamo}


def _ort(path, args) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
    return session.run(None, feeds)


def _single_node_model(op_type: str, domain: str = "", name: str = "the_node") -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    relu = helper.make_node("Relu", ["x"], ["h"], name="first")
    node = helper.make_node(op_type, ["h"], ["y"], name=name, domain=domain)
    graph = helper.make_graph([relu, node], "g", [x], [y])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets)


# --- bad files ------------------------------------------------------------------------------

def _load_error(source) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_onnx(source)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file_and_directory(tmp_path) -> None:
    assert "no such file" in _load_error(tmp_path / "absent.onnx")
    assert "directory" in _load_error(tmp_path)


def test_empty_text_random_and_truncated_files(tmp_path, files) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert "empty" in _load_error(empty)

    text = tmp_path / "notes.onnx"
    text.write_text("this is a README, not a model\n" * 20)
    message = _load_error(text)
    assert "notes.onnx" in message and "not an ONNX model" in message

    noise = tmp_path / "noise.onnx"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    assert "not an ONNX model" in _load_error(noise)

    data = files["mlp"].read_bytes()
    half = tmp_path / "half.onnx"
    half.write_bytes(data[: len(data) // 2])
    message = _load_error(half)
    assert "half.onnx" in message and "truncated" in message


def test_graph_without_nodes_and_dangling_input(tmp_path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    empty = helper.make_model(helper.make_graph([], "g", [x], [x]))
    assert "no nodes" in _load_error(empty.SerializeToString())

    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    broken = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["x", "ghost"], ["y"], name="adder")], "g", [x], [y]))
    message = _load_error(broken.SerializeToString())
    assert "'adder'" in message and "'ghost'" in message


@pytest.mark.parametrize("op_type, domain, shown", [
    ("FusedGelu", "com.microsoft", "com.microsoft::FusedGelu"),
    ("TfIdfVectorizer", "", "TfIdfVectorizer"),
])
def test_unsupported_operator_named_at_load(op_type: str, domain: str, shown: str) -> None:
    model = _single_node_model(op_type, domain)
    with pytest.raises(UnsupportedOperator) as info:
        load_onnx(model.SerializeToString())
    assert info.value.op_type == shown and info.value.node == "the_node"
    assert shown in str(info.value) and "the_node" in str(info.value)


# --- exporter de-duplication ------------------------------------------------------------------

@pytest.mark.parametrize("exporter", ["zero_legacy", "zero_dynamo"])
def test_shared_initializer_becomes_one_parameter_per_layer(files, exporter: str) -> None:
    path = files[exporter]
    graph = onnx.load(str(path)).graph
    assert "net.4.weight" not in {t.name for t in graph.initializer}  # merged in the file

    model = load_onnx(path)
    assert {"net.2.weight", "net.4.weight"} <= set(model.parameters)
    assert model.parameters["net.2.weight"] is not model.parameters["net.4.weight"]
    assert model.shared_parameters["net.4.weight"] == ["net.2", "net.4"]
    assert model.shared_parameters["net.2.weight"] == ["net.2", "net.4"]
    points = {p.layer: p for p in model.probe_points if p.role == "linear"}
    assert points["net.4"].weight == "net.4.weight" and points["net.2"].weight == "net.2.weight"

    outputs = model.run(list(files["args"]))
    np.testing.assert_allclose(outputs[0].detach().numpy(), _ort(path, files["args"])[0],
                               rtol=1e-5, atol=1e-6)
    outputs[0].sum().backward()
    g2 = model.parameters["net.2.weight"].grad
    g4 = model.parameters["net.4.weight"].grad
    # Behind a zero layer the earlier one gets no gradient, the later one does: tied, both
    # would have received the sum.
    assert torch.count_nonzero(g2) == 0 and torch.count_nonzero(g4) > 0


# --- external data, bytes, graph order, functions ------------------------------------------

def test_external_data_from_path_and_bytes(tmp_path, files) -> None:
    folder = tmp_path / "ext"
    folder.mkdir()
    path = folder / "model.onnx"
    proto = onnx.load(str(files["mlp"]))
    onnx.save_model(proto, str(path), save_as_external_data=True, location="model.onnx.data",
                     size_threshold=0)
    assert (folder / "model.onnx.data").exists()
    expected = _ort(files["mlp"], files["args"])[0]

    model = load_onnx(path)
    np.testing.assert_allclose(model.run(list(files["args"]))[0].detach().numpy(), expected,
                               rtol=1e-5, atol=1e-6)

    message = _load_error(path.read_bytes())
    assert "model.onnx.data" in message and "external" in message
    from_bytes = load_onnx(path.read_bytes(), base_dir=folder)
    assert set(from_bytes.parameters) == set(model.parameters)


def test_dynamo_export_external_data_file_is_read(files) -> None:
    path = files["zero_dynamo"]
    assert path.with_name(path.name + ".data").exists()
    model = load_onnx(path)
    assert float(model.parameters["net.0.weight"].detach().abs().sum()) == 0.0
    assert float(model.parameters["net.0.bias"].detach().abs().sum()) > 0.0


def test_unsorted_graph_runs_in_dependency_order(files) -> None:
    proto = onnx.load(str(files["mlp"]))
    nodes = list(proto.graph.node)
    proto.graph.ClearField("node")
    proto.graph.node.extend(reversed(nodes))
    model = load_onnx(proto.SerializeToString())
    expected = _ort(files["mlp"], files["args"])[0]
    np.testing.assert_allclose(model.run(list(files["args"]))[0].detach().numpy(), expected,
                               rtol=1e-5, atol=1e-6)
    assert [p.layer for p in model.probe_points] == ["net.0", "net.1", "net.2", "net.3", "net.4"]


def test_local_functions_are_inlined() -> None:
    inner = helper.make_function(
        "custom", "ScaledTanh", ["a"], ["b"],
        [helper.make_node("Constant", [], ["two"], value_float=2.0),
         helper.make_node("Mul", ["a", "two"], ["a2"]),
         helper.make_node("Tanh", ["a2"], ["b"])],
        [helper.make_opsetid("", 17)])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    weight = helper.make_tensor("w", TensorProto.FLOAT, [3, 3], np.eye(3, dtype=np.float32) * 0.5)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
         helper.make_node("ScaledTanh", ["h"], ["y"], domain="custom", name="act")],
        "g", [x], [y], initializer=[weight])
    model_proto = helper.make_model(graph, functions=[inner], opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)])
    model = load_onnx(model_proto.SerializeToString())
    inputs = torch.randn(2, 3)
    (out,) = model.run([inputs])
    torch.testing.assert_close(out, torch.tanh(inputs))
    proj = model.point("proj")
    assert proj.nonlinearity == "tanh" and proj.weight == "w" and proj.weight_layout == "in_out"


def test_activations_written_as_several_nodes(tmp_path) -> None:
    """Opset 17 has no Gelu/Mish nodes and torch writes SiLU as x * sigmoid(x): each pattern
    is one activation point, and the layer before it knows which one follows."""
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 16), nn.GELU(),
                        nn.Linear(16, 16), nn.ReLU6(), nn.Linear(16, 16), nn.Mish(),
                        nn.Linear(16, 4)).eval()
    x = torch.randn(4, 16)
    path = tmp_path / "acts.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter announces its deprecation
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17)
    model = load_onnx(path)
    linear = [p.nonlinearity for p in model.probe_points if p.role == "linear"]
    assert linear == ["silu", "gelu", "relu", "mish", None]
    acts = [(p.layer, p.op, p.nonlinearity) for p in model.probe_points
            if p.role == "activation"]
    assert acts == [("1", "Mul", "silu"), ("3", "Mul", "gelu"), ("5", "Clip", "relu"),
                    ("7", "Mul", "mish")]
    np.testing.assert_allclose(model.run([x])[0].detach().numpy(), _ort(path, (x,))[0],
                               rtol=1e-5, atol=1e-5)


# --- names ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, scopes, expected", [
    ("/net/net.2/Gemm", None, "net.2"),
    ("/layer1/layer1.0/conv1/Conv", None, "layer1.0.conv1"),
    ("/encoder/layers.0/self_attn/MatMul", None, "encoder.layers.0.self_attn"),
    ("/features/features.0/features.0.0/Conv", None, "features.0.0"),
    ("/Add", None, ""),
    ("node_conv2d", "['', 'layer1', 'layer1.0', 'layer1.0.conv1', 'conv2d']", "layer1.0.conv1"),
    ("node_conv2d", "['', 'layer1', '0', 'conv1', 'conv2d']", "layer1.0.conv1"),
    ("Gemm_3", None, None),
])
def test_node_scope(name: str, scopes: str | None, expected: str | None) -> None:
    node = helper.make_node("Relu", ["a"], ["b"], name=name)
    if scopes:
        entry = node.metadata_props.add()
        entry.key, entry.value = "pkg.torch.onnx.name_scopes", scopes
    assert node_scope(node) == expected


@pytest.mark.parametrize("name, anonymous", [
    ("onnx::Conv_123", True), ("val_12", True), ("_val_3", True), ("42", True),
    ("scalar_tensor_default", True), ("full_default_3", True),  # the dynamo exporter's constants
    ("sub", True), ("sub_11", True), ("clone_2", True), ("transpose_162", True),  # named after
    # the op that made them (Swin's window mask; DETR's first values, projected from zeros)
    ("net.2.weight", False), ("cls_token", False), ("default", False), ("subnet", False),
    ("sub.weight", False), ("linear", False),
    ("features.3.1.attn.relative_position_bias_table", False),
])
def test_exporter_invented_names_are_told_from_state_dict_names(name: str, anonymous: bool) -> None:
    assert is_anonymous(name) is anonymous


def test_legacy_reuse_suffix_folds_only_for_a_module_called_twice() -> None:
    nodes = [helper.make_node("Relu", ["a"], ["b"], name=n) for n in
             ("/block/act/Relu", "/block/act_1/Relu", "/conv/Relu", "/conv_1/Relu")]
    namer = ScopeNamer(nodes, parameter_names=["conv.weight", "conv_1.weight"])
    # `act_1` is `act` called again; `conv_1` is a module of its own (it has parameters)
    assert [namer.scope(i) for i in range(4)] == ["block.act", "block.act", "conv", "conv_1"]


# --- running and saving -------------------------------------------------------------------

def test_run_checks_inputs_and_names_failing_node(files) -> None:
    model = load_onnx(files["mlp"])
    with pytest.raises(InputSpecError):
        model.run([])
    with pytest.raises(ProbeError) as info:
        model.run([torch.randn(4, 5)])
    assert "/net/net.0/Gemm" in str(info.value)


def test_run_taps_points_in_order_with_live_tensors(files) -> None:
    model = load_onnx(files["mlp"])
    seen = []
    model.run(list(files["args"]), tap=lambda point, value: seen.append((point, value)))
    assert [p.index for p, _ in seen] == list(range(len(model.probe_points)))
    assert all(v.requires_grad for _, v in seen)
    assert model.inputs[0].shape == ("batch", 16) and model.inputs[0].dtype == torch.float32


def test_save_replaces_one_weight(tmp_path, files) -> None:
    model = load_onnx(files["mlp"])
    new = torch.full_like(model.parameters["net.2.weight"], 0.25)
    out = tmp_path / "fixed.onnx"
    model.save(out, {"net.2.weight": new})
    again = load_onnx(out)
    torch.testing.assert_close(again.parameters["net.2.weight"].detach(), new)
    torch.testing.assert_close(again.parameters["net.0.weight"].detach(),
                               model.parameters["net.0.weight"].detach())
    np.testing.assert_allclose(again.run(list(files["args"]))[0].detach().numpy(),
                               _ort(out, files["args"])[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        model.save(out, {"no.such.weight": new})


@pytest.mark.parametrize("exporter", ["zero_legacy", "zero_dynamo"])
def test_save_unties_a_shared_initializer(tmp_path, files, exporter: str) -> None:
    model = load_onnx(files[exporter])
    new = torch.randn(model.parameters["net.4.weight"].shape)
    out = tmp_path / "fixed.onnx"
    model.save(out, {"net.4.weight": new})
    again = load_onnx(out)
    torch.testing.assert_close(again.parameters["net.4.weight"].detach(), new)
    assert float(again.parameters["net.2.weight"].detach().abs().sum()) == 0.0
    assert not again.shared_parameters
    np.testing.assert_allclose(again.run(list(files["args"]))[0].detach().numpy(),
                               _ort(out, files["args"])[0], rtol=1e-5, atol=1e-5)


def test_to_keeps_integer_constants_on_cpu(files) -> None:
    model = load_onnx(files["mlp"])
    assert model.to(torch.device("cpu")) is model
    assert model.device == torch.device("cpu")
    assert model.run(list(files["args"]))[0].shape == (4, 8)


def test_save_keeps_batchnorm_running_statistics(tmp_path) -> None:
    """A training-mode export carries BN running statistics as non-trainable initializers;
    saving must write them back unchanged next to the replaced weight."""
    args = zoo.example_inputs("resnet")
    path = zoo.export_onnx(zoo.build("resnet"), args, tmp_path / "resnet_bn.onnx", train_bn=True)
    model = load_onnx(path)
    new = torch.zeros_like(model.parameters["layer1.0.conv1.weight"])
    out = tmp_path / "fixed.onnx"
    model.save(out, {"layer1.0.conv1.weight": new})
    saved = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    original = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    assert saved["bn1.running_mean"] == original["bn1.running_mean"]
    torch.testing.assert_close(load_onnx(out).parameters["layer1.0.conv1.weight"].detach(), new)


def test_empty_integer_initializer(tmp_path) -> None:
    """An empty int64 initializer (a dynamo export of transformers' GIT holds one) is read back
    with stride 0; the loader once crashed writing it into the graph it checks."""
    from onnx import numpy_helper

    from gradprobe.diagnostics.api import diagnose
    from gradprobe.diagnostics.options import DiagnoseOptions

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    weight = numpy_helper.from_array(
        np.random.default_rng(0).normal(0, 0.6, (3, 4)).astype(np.float32), "fc.weight")
    nothing = numpy_helper.from_array(np.zeros(0, dtype=np.int64), "nothing")
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Concat", ["shape", "nothing"], ["same_shape"], axis=0),
             helper.make_node("Reshape", ["x", "same_shape"], ["x2"]),
             helper.make_node("MatMul", ["x2", "fc.weight"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[weight, nothing])
    path = tmp_path / "empty.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    report = diagnose(path, DiagnoseOptions(device="cpu"))
    assert [f.rule for f in report.findings if f.severity.value == "error"] == []
