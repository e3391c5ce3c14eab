"""The TorchScript loader on real traced and scripted modules exported in the test."""

from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from zoo import MLP, ResNet, build, example_inputs, export_onnx, export_torchscript

from gradprobe.diagnostics.errors import InputSpecError, ModelLoadError
from gradprobe.diagnostics.loaders.torchscript_loader import TorchScriptModel, load_torchscript
from gradprobe.diagnostics.loaders.torchscript_passes import argument_index

# the seven architectures of the zoo (not every builder added later: keeps the file fast)
MODELS = ["mlp", "resnet", "mobilenet", "vit", "text_encoder", "lstm", "gru"]
CASES = [(name, scripted) for name in MODELS for scripted in (False, True)]
LAYER_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.LSTM, nn.GRU)


def _case_id(case: tuple[str, bool]) -> str:
    return f"{case[0]}-{'scripted' if case[1] else 'traced'}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path | str]:
    """Each zoo model exported once, traced and scripted; a str holds why scripting failed."""
    folder = tmp_path_factory.mktemp("torchscript")
    files: dict[tuple[str, bool], Path | str] = {}
    for name, scripted in CASES:
        path = folder / f"{name}-{'scripted' if scripted else 'traced'}.pt"
        try:
            files[name, scripted] = export_torchscript(build(name), example_inputs(name), path,
                                                       scripted=scripted)
        except Exception as exc:  # torch.jit.script rejects some Python
            files[name, scripted] = f"torch.jit.script cannot compile {name}: {exc}"
    return files


def _load(exported: dict, case: tuple[str, bool]) -> TorchScriptModel:
    file = exported[case]
    if isinstance(file, str):
        pytest.skip(file)
    return load_torchscript(file)


def _run_with_taps(model: TorchScriptModel, inputs) -> tuple[list[torch.Tensor], dict]:
    seen: dict[str, tuple] = {}
    outputs = model.run(list(inputs),
                        lambda point, value: seen.setdefault(point.node, (point, value)))
    return outputs, seen


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_matches_module_in_training_mode(exported, case):
    """Same numbers as the Python module with BatchNorm on batch statistics (train mode; the
    zoo's dropout is 0), although the file was exported in eval mode."""
    model = _load(exported, case)
    reference_module = build(case[0]).train()
    inputs = example_inputs(case[0])
    outputs = model.run(list(inputs))
    with torch.no_grad():
        expected = reference_module(*inputs)
    assert len(outputs) == 1
    torch.testing.assert_close(outputs[0], expected, atol=1e-5, rtol=1e-5)
    eval_output = build(case[0]).eval()(*inputs)
    if any(isinstance(m, nn.BatchNorm2d) for m in reference_module.modules()):
        assert not torch.allclose(outputs[0], eval_output, atol=1e-3), "BN ran on running stats"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_parameters_are_the_modules_own_and_all_get_gradients(exported, case):
    model = _load(exported, case)
    reference = build(case[0])
    assert list(model.parameters) == [n for n, _ in reference.named_parameters()]
    outputs, seen = _run_with_taps(model, example_inputs(case[0]))
    assert seen, "no probe point was observed"
    assert all(value.requires_grad for _, value in seen.values()), "observed values are detached"
    outputs[0].backward(torch.randn_like(outputs[0]))
    for name, parameter in model.parameters.items():
        assert parameter.requires_grad, name
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters.values())


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_points_are_named_after_module_paths(exported, case):
    model = _load(exported, case)
    _run_with_taps(model, example_inputs(case[0]))  # drops points of branches not taken
    points = model.probe_points
    layers = [p.layer for p in points]
    nodes = [p.node for p in points]
    assert len(set(layers)) == len(layers), "duplicate layer names"
    assert len(set(nodes)) == len(nodes), "duplicate node labels"
    reference = build(case[0])
    modules = {n for n, m in reference.named_modules() if isinstance(m, LAYER_MODULES)}
    linear = {p.layer: p for p in points if p.role == "linear"}
    assert modules <= set(linear), f"missing layers: {sorted(modules - set(linear))}"
    parameter_names = set(model.parameters)
    for point in points:
        assert set(point.parameters) <= parameter_names, point
        if point.role == "linear" and point.layer in modules:
            assert point.weight is not None and point.weight.startswith(point.layer + "."), point
    for layer in modules:
        weight = dict(reference.named_parameters()).get(f"{layer}.weight")
        if weight is not None and weight.dim() >= 2:
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
            assert (linear[layer].fan_in, linear[layer].fan_out) == (fan_in, fan_out), layer


def test_expected_layer_names_and_nonlinearities(exported):
    for scripted in (False, True):
        mlp = {p.layer: p for p in _load(exported, ("mlp", scripted)).probe_points}
        assert {"net.0", "net.2", "net.4"} <= set(mlp)
        assert [mlp[n].nonlinearity for n in ("net.0", "net.2", "net.4")] == ["relu", "relu", None]
        assert mlp["net.0"].feeds == ("aten::relu@net.1",)
        assert mlp["net.1"].role == "activation" and mlp["net.1"].nonlinearity == "relu"
        assert (mlp["net.0"].weight, mlp["net.0"].bias) == ("net.0.weight", "net.0.bias")
        net0 = mlp["net.0"]
        assert (net0.fan_in, net0.fan_out, net0.weight_layout) == (16, 32, "out_in")

        resnet = {p.layer: p for p in _load(exported, ("resnet", scripted)).probe_points}
        assert {"conv1", "layer1.0.conv1", "layer2.0.downsample.0", "fc"} <= set(resnet)
        assert resnet["conv1"].nonlinearity == "relu" and resnet["conv1"].followed_by_norm
        assert resnet["layer1.0.conv2"].nonlinearity == "relu"  # through bn2 and the residual add
        assert resnet["fc"].nonlinearity is None and not resnet["fc"].followed_by_norm
        assert resnet["bn1"].role == "norm" and resnet["bn1"].channel_axis == 1
        # one nn.ReLU module applied twice per block: two points, both under its path
        assert {"layer1.0.relu", "layer1.0.relu#2"} <= set(resnet)

        mobile = {p.layer: p for p in _load(exported, ("mobilenet", scripted)).probe_points}
        assert mobile["stem.0"].nonlinearity == "hardswish"
        assert mobile["blocks.0.se.fc2"].nonlinearity == "hardsigmoid"
        assert mobile["blocks.0.depthwise.0"].fan_in == 9  # depthwise: one input channel, 3x3

        vit = {p.layer: p for p in _load(exported, ("vit", scripted)).probe_points}
        assert vit["encoder.layers.0.linear1"].nonlinearity == "gelu"
        assert vit["encoder.layers.0.linear1"].channel_axis == -1
        assert vit["encoder.layers.0.self_attn.in_proj"].weight == \
            "encoder.layers.0.self_attn.in_proj_weight"

        lstm = {p.layer: p for p in _load(exported, ("lstm", scripted)).probe_points}
        assert lstm["rnn"].op == "aten::lstm" and lstm["rnn"].channel_axis == -1
        assert len(lstm["rnn"].parameters) == 8 and lstm["rnn"].weight == "rnn.weight_ih_l0"


def test_inplace_relu_does_not_overwrite_observed_values(exported):
    """ResNet's ReLU(inplace=True) runs on the BN output: the probe must see the BN output
    before the ReLU, with its negative half, and the ReLU output separately."""
    for scripted in (False, True):
        model = _load(exported, ("resnet", scripted))
        _, seen = _run_with_taps(model, example_inputs("resnet"))
        by_layer = {point.layer: value for point, value in seen.values()}
        for layer in ("conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1", "layer2.1.bn2"):
            assert (by_layer[layer] < 0).any(), f"{layer} was observed after an in-place ReLU"
        assert (by_layer["relu"] >= 0).all()
        assert by_layer["relu"].data_ptr() != by_layer["bn1"].data_ptr()
        bn = nn.functional.batch_norm(by_layer["conv1"], None, None, training=True)
        torch.testing.assert_close(by_layer["bn1"], bn, atol=1e-5, rtol=1e-5)  # BN affine is 1, 0


def test_batchnorm_running_statistics_are_not_updated(exported):
    for case in (("resnet", False), ("resnet", True), ("mobilenet", True)):
        model = _load(exported, case)
        before = {n: b.clone() for n, b in model.module.named_buffers()}
        model.run(list(example_inputs(case[0])))
        for name, buffer in model.module.named_buffers():
            assert torch.equal(buffer, before[name]), f"{name} changed"


def test_integer_inputs_are_described_for_the_probe(exported):
    model = _load(exported, ("text_encoder", False))
    (spec,) = model.inputs
    assert (spec.name, spec.shape, spec.dtype) == ("ids", None, torch.int64)
    assert spec.value_range == (0, 100)  # below the embedding table size
    image = _load(exported, ("resnet", True)).inputs
    assert [(s.name, s.shape, s.dtype) for s in image] == [("x", None, None)]


def test_wrong_number_of_inputs_is_an_input_error(exported):
    model = _load(exported, ("mlp", False))
    with pytest.raises(InputSpecError, match="takes 1 inputs"):
        model.run([])


def test_dropout_is_off_and_frozen_parameters_are_probed(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 4))
    net[0].weight.requires_grad_(False)
    x = torch.randn(32, 8)
    path = tmp_path / "dropout.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net.train(), (x,), check_trace=False)  # records train=True
    torch.jit.save(traced, str(path))
    model = load_torchscript(path)
    first, second = model.run([x])[0], model.run([x])[0]
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first, net.eval()(x))
    assert model.parameters["0.weight"].requires_grad
    assert any("requires_grad=False" in note for note in model.notes)
    assert {p.layer: p.nonlinearity for p in model.probe_points if p.role == "linear"} == \
        {"0": "relu", "3": None}


@pytest.mark.parametrize("train_when_traced", [True, False])
def test_stacked_rnn_runs_without_dropout_in_training_mode(tmp_path, train_when_traced):
    """Dropout between stacked LSTM layers is off through its probability, while the op runs
    in training mode: cuDNN computes an RNN's backward pass only in training mode."""
    torch.manual_seed(0)
    net = nn.LSTM(6, 8, num_layers=2, dropout=0.5, batch_first=True)
    x = torch.randn(4, 5, 6)
    path = tmp_path / "lstm.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net.train(train_when_traced), (x,), check_trace=False)
    torch.jit.save(traced, str(path))
    model = load_torchscript(path)
    lstm = [n for n in model._graph.findAllNodes("aten::lstm", True)]
    assert lstm
    for node in lstm:
        args = {name: node.inputsAt(argument_index(node, name)).toIValue()
                for name in ("dropout", "train")}
        assert args == {"dropout": 0.0, "train": True}
    first, second = model.run([x])[0], model.run([x])[0]
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first, net.eval()(x)[0])


def test_save_writes_new_values_and_keeps_the_module_as_it_was(tmp_path):
    torch.manual_seed(0)
    net = MLP()
    net.net[4].bias.requires_grad_(False)
    source = export_torchscript(net, example_inputs("mlp"), tmp_path / "mlp.pt", scripted=True)
    model = load_torchscript(source)
    new_weight = torch.full((32, 32), 0.125)
    target = tmp_path / "fixed.pt"
    model.save(target, {"net.2.weight": new_weight})
    reloaded = torch.jit.load(str(target))
    parameters = dict(reloaded.named_parameters())
    torch.testing.assert_close(parameters["net.2.weight"], new_weight)
    torch.testing.assert_close(parameters["net.0.weight"], net.net[0].weight)
    assert not parameters["net.4.bias"].requires_grad
    assert not reloaded.training  # exported in eval mode, saved in eval mode
    again = load_torchscript(target)
    torch.testing.assert_close(again.parameters["net.2.weight"], new_weight)
    assert model.parameters["net.4.bias"].requires_grad  # still probed as trainable
    with pytest.raises(KeyError, match="net.9.weight"):
        model.save(tmp_path / "bad.pt", {"net.9.weight": new_weight})


def test_bytes_and_device_round_trip(exported):
    data = Path(exported["resnet", False]).read_bytes()
    model = load_torchscript(data)
    assert model.path is None and model.format == "torchscript"
    assert model.to(torch.device("cpu")) is model
    outputs = model.run(list(example_inputs("resnet")))
    assert outputs[0].shape == (4, 10) and model.device == torch.device("cpu")


def _state_dict_file(path: Path) -> Path:
    torch.save(ResNet().state_dict(), path)
    return path


def _truncated_file(path: Path, source: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _plain_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    return path


@pytest.mark.parametrize("kind, expected", [
    ("missing", "does not exist"),
    ("directory", "is a directory"),
    ("empty", "empty file"),
    ("text", "a text file"),
    ("onnx", "an ONNX model"),
    ("state_dict", "state_dict/pickle saved with torch.save, not a TorchScript module"),
    ("legacy_pickle", "legacy PyTorch pickle"),
    ("truncated", "truncated or corrupt zip"),
    ("plain_zip", "without TorchScript code"),
])
def test_files_that_are_not_torchscript_get_one_line_errors(tmp_path, exported, kind, expected):
    path = tmp_path / f"{kind}.pt"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a model\n")
    elif kind == "onnx":
        export_onnx(build("mlp"), example_inputs("mlp"), path)
    elif kind == "state_dict":
        _state_dict_file(path)
    elif kind == "legacy_pickle":
        torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    elif kind == "truncated":
        _truncated_file(path, Path(exported["mlp", False]))
    elif kind == "plain_zip":
        _plain_zip(path)
    with pytest.raises(ModelLoadError) as caught:
        load_torchscript(path)
    message = str(caught.value)
    assert expected in message and str(path) in message
    assert "\n" not in message


def test_bytes_errors_use_the_given_name():
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    with pytest.raises(ModelLoadError, match="^upload.pt is a PyTorch state_dict"):
        load_torchscript(buffer.getvalue(), name="upload.pt")


class _TiedLoopModel(nn.Module):
    """Tied embedding/output weights, a constant loop reusing one layer, an optional input
    with a default, and a tuple output."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(ids)
        for _ in range(3):
            x = torch.tanh(self.fc(x))
        return self.out(x) * scale, x


def test_tied_weights_loops_defaults_and_tuple_outputs(tmp_path):
    torch.manual_seed(0)
    net = _TiedLoopModel()
    ids = torch.randint(0, 20, (2, 5))
    path = tmp_path / "tied.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    model = load_torchscript(path)
    (spec,) = model.inputs  # `scale` has a default: not asked for
    assert (spec.name, spec.dtype, spec.value_range) == ("ids", torch.int64, (0, 20))
    assert list(model.parameters) == ["embed.weight", "fc.weight", "fc.bias"]
    points = {p.layer: p for p in model.probe_points}
    assert {"fc", "fc#2", "fc#3"} <= set(points), "the constant loop was not unrolled"
    assert points["out"].weight == "embed.weight"
    assert model.shared_parameters == {"embed.weight": ["embed", "out"],
                                       "fc.weight": ["fc", "fc#2", "fc#3"]}
    assert points["fc#3"].nonlinearity == "tanh"
    outputs, seen = _run_with_taps(model, [ids])
    expected = net(ids)
    assert len(outputs) == 2 and len(seen) == len(model.probe_points)
    torch.testing.assert_close(outputs[0], expected[0])
    torch.testing.assert_close(outputs[1], expected[1])
    torch.testing.assert_close(model.run([ids, 1.0])[0], net(ids, 1.0)[0])


def test_device_constants_of_traced_graphs_follow_the_model(exported):
    """A traced LSTM creates its initial state with `device=cpu` baked in: moving the model
    must move those constants too (checked on the graph; CUDA below runs it for real)."""
    from gradprobe.diagnostics.loaders.torchscript_passes import (
        all_nodes,
        retarget_device_constants,
    )

    model = _load(exported, ("lstm", False))
    graph = model._graph.copy()

    def devices() -> set[str]:
        return {str(n.output().toIValue()) for n in all_nodes(graph)
                if n.kind() == "prim::Constant" and n.output().type().kind() == "DeviceObjType"}

    assert devices() == {"cpu"}
    retarget_device_constants(graph, torch.device("meta"))
    assert devices() == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", [("lstm", False), ("resnet", True), ("text_encoder", True)],
                         ids=_case_id)
def test_runs_on_cuda(exported, case):
    model = _load(exported, case).to(torch.device("cuda"))
    inputs = [t.cuda() for t in example_inputs(case[0])]
    outputs, seen = _run_with_taps(model, inputs)
    assert outputs[0].device.type == "cuda"
    assert all(v.device.type == "cuda" for _, v in seen.values())
    outputs[0].sum().backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in model.parameters.values())
    expected = build(case[0]).train()(*example_inputs(case[0]))
    torch.testing.assert_close(outputs[0].cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_traced_and_scripted_files_give_the_same_points(exported, name):
    def summary(model: TorchScriptModel) -> dict:
        model.run(list(example_inputs(name)))
        return {p.layer: (p.role, p.weight, p.bias, p.parameters, p.nonlinearity, p.fan_in,
                          p.fan_out, p.channel_axis, p.followed_by_norm, len(p.feeds))
                for p in model.probe_points}

    traced, scripted = (summary(_load(exported, (name, s))) for s in (False, True))
    assert traced == scripted


def test_forward_failure_is_a_one_line_probe_error(exported):
    from gradprobe.diagnostics.errors import ProbeError

    model = _load(exported, ("mlp", True))
    with pytest.raises(ProbeError, match="^forward failed: .*shapes cannot be mult") as caught:
        model.run([torch.randn(4, 15)])
    assert "\n" not in str(caught.value)


def test_frozen_modules_are_refused_with_the_reason(tmp_path):
    path = tmp_path / "frozen.pt"
    torch.jit.save(torch.jit.freeze(torch.jit.script(MLP().eval())), str(path))
    with pytest.raises(ModelLoadError, match="frozen TorchScript module .*save the module before"):
        load_torchscript(path)


class _AliasedInplace(nn.Module):
    """In-place ops the loader must leave alone or rewrite without changing the result:
    a ReLU through a view taken before it, ReLU6 and clamp written as in-place ops."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        flat = h.view(-1)
        h.relu_()  # must still show through `flat`
        g = self.head(x)
        g = nn.functional.relu6(g, inplace=True)
        k = self.head(x).clamp_(min=0)
        return flat.view(x.shape[0], 6) + g + k


def test_inplace_ops_through_views_keep_their_meaning(tmp_path):
    torch.manual_seed(0)
    net = _AliasedInplace()
    x = torch.randn(3, 6)
    path = tmp_path / "aliased.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    model = load_torchscript(path)
    torch.testing.assert_close(model.run([x])[0], net(x))
    activations = [p.nonlinearity for p in model.probe_points if p.role == "activation"]
    assert activations.count("relu") == 3  # relu_, relu6 (hardtanh 0..6), clamp(min=0)
    _, seen = _run_with_taps(model, [x])
    head = [v for p, v in seen.values() if p.layer in ("head", "head#2")]
    assert len(head) == 2 and all((v < 0).any() for v in head), "head output seen after clamp"
