"""Attacks on a real server on localhost (issue 11): each is first shown to be a real attack,
then shown to fail against `gradprobe serve`, which keeps serving."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from server_harness import shared_server

from gradprobe.diagnostics.loaders.onnx_loader import load_onnx
from gradprobe.v1 import service_pb2 as spb
from gradprobe.v1 import service_pb2_grpc


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.address)
    yield service_pb2_grpc.GradprobeStub(channel)
    channel.close()


def upload(stub, data: bytes, fmt: int = 0) -> str:
    sha = hashlib.sha256(data).hexdigest()
    messages = [spb.UploadModelRequest(metadata=spb.UploadMetadata(
        sha256=sha, size_bytes=len(data), format=fmt))]
    messages += [spb.UploadModelRequest(chunk=data[i:i + (1 << 20)])
                 for i in range(0, len(data), 1 << 20)]
    stub.UploadModel(iter(messages), timeout=60)
    return sha


def diagnose(stub, sha: str, *, label: str | None = "model.onnx", shapes=None, timeout=120,
             thresholds=None) -> spb.DiagnoseEvent:
    options = spb.DiagnoseOptions(device="cpu")
    if shapes:
        options.input_shapes.CopyFrom(spb.Shapes(shapes=[spb.Shape(dims=s) for s in shapes]))
    if thresholds:
        options.thresholds.values.update(thresholds)
    request = spb.DiagnoseRequest(sha256=sha, options=options)
    if label is not None:
        request.path_label = label
    events = list(stub.Diagnose(request, timeout=timeout))
    return events[-1]


def status_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def _mlp_onnx(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["h"], "/fc/Gemm", transB=1),
         helper.make_node("Relu", ["h"], ["y"], "/relu/Relu")],
        "victim", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 8])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _external_reader(victim_file: str, count: int) -> bytes:
    """The attacker's model: its weights are 'stored' in the victim's file in the store."""
    model = _mlp_onnx({"fc.weight": np.zeros((8, 8), np.float32),
                       "fc.bias": np.zeros(8, np.float32)})
    offset = 0
    for tensor in model.graph.initializer:
        size = int(np.prod(tensor.dims)) * 4
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", victim_file), ("offset", str(offset)),
                           ("length", str(min(size, count)))):
            tensor.external_data.add(key=key, value=value)
        offset += 4
    return model.SerializeToString()


def test_an_upload_cannot_read_another_clients_model_through_external_data(server, stub,
                                                                             tmp_path: Path):
    rng = np.random.default_rng(7)
    victim = _mlp_onnx({"fc.weight": rng.standard_normal((8, 8)).astype(np.float32),
                        "fc.bias": rng.standard_normal(8).astype(np.float32)})
    victim_bytes = victim.SerializeToString()
    victim_sha = upload(stub, victim_bytes)  # no format: stored as <sha>.model
    victim_file = f"{victim_sha}.model"
    assert (server.store_dir / victim_file).is_file()
    attack = _external_reader(victim_file, len(victim_bytes))

    # the attack is real: resolved against the store's folder it reads the victim's bytes
    (tmp_path / "attack.onnx").write_bytes(attack)
    stolen = load_onnx(tmp_path / "attack.onnx", base_dir=server.store_dir)
    assert stolen.parameters["fc.weight"].detach().abs().sum() > 0

    attack_sha = upload(stub, attack, fmt=1)
    for label in ("attack.onnx", None, "../../etc/x.onnx"):
        error = status_of(lambda: diagnose(stub, attack_sha, label=label))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "external data" in error.details() and "self-contained" in error.details()
        assert str(server.store_dir) not in error.details()
    assert diagnose(stub, victim_sha).report.model.sha256 == victim_sha  # still serving


def test_custom_onnx_domains_are_refused_naming_the_operator(server, stub):
    model = _mlp_onnx({"fc.weight": np.ones((8, 8), np.float32),
                       "fc.bias": np.zeros(8, np.float32)})
    model.graph.node[1].domain = "com.evil"
    model.opset_import.append(helper.make_opsetid("com.evil", 1))
    sha = upload(stub, model.SerializeToString())
    error = status_of(lambda: diagnose(stub, sha))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "com.evil::Relu" in error.details() and "/relu/Relu" in error.details()


class _WritesFile(torch.nn.Module):
    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        mapped = torch.from_file(self.target, True, 4, dtype=torch.uint8)
        mapped.copy_(torch.full([4], 65, dtype=torch.uint8))
        return self.fc(x) + mapped.sum().float() * 0


def test_a_torchscript_upload_cannot_write_files(server, stub, tmp_path: Path):
    target = tmp_path / "sitecustomize_dropped.pth"
    path = tmp_path / "writes.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_WritesFile(str(target))), str(path))
    sha = upload(stub, path.read_bytes())
    error = status_of(lambda: diagnose(stub, sha, label="writes.pt", shapes=[[2, 4]]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "aten::from_file" in error.details()
    assert not target.exists()
