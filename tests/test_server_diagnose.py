"""Diagnose, ListRules and server info against a real server on localhost: the remote report is
the local one, bad models get INVALID_ARGUMENT with the reason and the server keeps serving."""

from __future__ import annotations

import hashlib
import json

import grpc
import pytest
from server_harness import SHARED_LIMIT_MB, shared_models, shared_server

from gradprobe.client.api import Client, RemoteError
from gradprobe.client.remote import diagnose_remote
from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.errors import ConfigError, InputSpecError, ModelLoadError
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.rules import all_rules
from gradprobe.v1 import service_pb2 as spb


@pytest.fixture(scope="module")
def models():
    return shared_models()


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture()
def client(server):
    server.wait_for_workers(1)
    with Client(server.address, timeout_s=60) as c:
        yield c


def _without_timing(report) -> dict:
    data = json.loads(report.to_json())
    data.pop("timing")
    return data


@pytest.mark.parametrize("which, options", [
    ("onnx", DiagnoseOptions(seed=3)),
    ("defect", DiagnoseOptions()),
    ("torchscript", DiagnoseOptions(input_shapes=[[8, 16]])),
])
def test_remote_report_is_the_local_report(server, models, which, options):
    path = getattr(models, which)
    local = diagnose(path, options)
    remote = diagnose_remote(path, options, server=server.address, token=None, tls_ca=None,
                             timeout_s=60)
    # Findings byte for byte; the whole report except the wall-clock timings.
    assert [f.model_dump_json() for f in remote.findings] == \
           [f.model_dump_json() for f in local.findings]
    assert _without_timing(remote) == _without_timing(local)
    assert remote.model.path == str(path)
    if which == "defect":
        assert remote.findings, "the planted zero weight must produce findings"


def test_progress_then_findings_then_report(server, models):
    channel = grpc.insecure_channel(server.address)
    stub = server.stub(channel)
    with Client(server.address) as c:
        sha = c.upload(models.defect)
    events = list(stub.Diagnose(spb.DiagnoseRequest(sha256=sha), timeout=60))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "report"
    first_finding = kinds.index("finding")
    assert set(kinds[:first_finding]) == {"progress"}
    assert set(kinds[first_finding:-1]) == {"finding"}
    stages = [e.progress.stage for e in events if e.HasField("progress")]
    assert stages[0] == "load" and "probe" in stages and stages[-1] == "rules"
    report = events[-1].report
    assert len(report.findings) == 0  # they came as events
    assert not report.model.HasField("path")  # no label sent: no path, and never the store's
    channel.close()


def test_upload_is_skipped_when_the_server_has_the_model(server, models):
    with Client(server.address) as c:
        sha = c.upload(models.onnx)
        assert sha == hashlib.sha256(models.onnx.read_bytes()).hexdigest()
        assert c.has_model(sha)
        calls = []
        c._stub.UploadModel = lambda *a, **k: calls.append(a)  # must not be reached
        assert c.upload(models.onnx) == sha
        report = c.diagnose(models.onnx)
    assert calls == [] and report.model.sha256 == sha


def test_model_bytes_can_be_sent_directly(client, models):
    report = client.diagnose(models.onnx.read_bytes())
    assert report.model.path is None
    assert report.model.sha256 == hashlib.sha256(models.onnx.read_bytes()).hexdigest()


@pytest.mark.parametrize("which, error, reason", [
    ("random", ModelLoadError, "not an ONNX model"),
    ("truncated", ModelLoadError, None),
    ("broken_torchscript", ModelLoadError, None),
])
def test_bad_model_gets_invalid_argument_and_server_keeps_serving(server, client, models, which,
                                                                   error, reason):
    path = getattr(models, which)
    with pytest.raises(error, match=reason) as caught:
        client.diagnose(path, DiagnoseOptions(input_shapes=[[4, 16]]))
    message = str(caught.value)
    assert str(server.store_dir) not in message  # the store's paths stay private
    # the same error class and message as the local run of the same call
    with pytest.raises(error) as local:
        diagnose(path, DiagnoseOptions(input_shapes=[[4, 16]]), path_label=str(path))
    assert message == str(local.value)
    with pytest.raises(error) as remote_bytes:
        client.diagnose(path.read_bytes(), DiagnoseOptions(input_shapes=[[4, 16]]))
    with pytest.raises(error) as local_bytes:
        diagnose(path.read_bytes(), DiagnoseOptions(input_shapes=[[4, 16]]))
    assert str(remote_bytes.value) == str(local_bytes.value)
    # raw gRPC status for the same call
    channel = grpc.insecure_channel(server.address)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(grpc.RpcError) as rpc:
        list(server.stub(channel).Diagnose(spb.DiagnoseRequest(sha256=sha), timeout=30))
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and rpc.value.details()
    channel.close()
    assert client.diagnose(models.onnx).model.format == "onnx"  # still serving


def test_bad_options_and_inputs_are_invalid_argument(client, models):
    with pytest.raises(InputSpecError, match="input.shape"):  # the field: input_shapes
        client.diagnose(models.torchscript)  # TorchScript carries no input shapes
    with pytest.raises(InputSpecError, match="needs size 16"):
        client.diagnose(models.onnx, DiagnoseOptions(input_shapes=[[4, 7]]))
    with pytest.raises(ConfigError, match="unknown rule"):
        client.diagnose(models.onnx, DiagnoseOptions(select=["no-such-rule"]))


def test_unknown_and_malformed_sha(server):
    channel = grpc.insecure_channel(server.address)
    stub = server.stub(channel)
    with pytest.raises(grpc.RpcError) as missing:
        list(stub.Diagnose(spb.DiagnoseRequest(sha256="0" * 64), timeout=10))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as bad:
        stub.HasModel(spb.HasModelRequest(sha256="../../etc/passwd"), timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()


def test_list_rules_matches_the_engine(client):
    remote = client.list_rules()
    assert [d.name for d in remote] == [r.name for r in all_rules()]
    assert remote == [r.doc() for r in all_rules()]
    assert all(d.summary and d.fix for d in remote)


def test_server_info(client):
    info = client.server_info()
    assert info.version == "test" and info.workers == 1
    assert info.devices[0].name == "cpu"
    assert info.max_model_bytes == SHARED_LIMIT_MB << 20 and info.chunk_bytes == 1 << 20
    assert not info.auth_required
    assert client.health() == "SERVING"
    assert client.health("gradprobe.v1.Gradprobe") == "SERVING"


def test_unreachable_server_is_a_remote_error(models):
    with Client("127.0.0.1:1", timeout_s=5) as c, pytest.raises(RemoteError) as caught:
        c.diagnose(models.onnx)
    assert caught.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_container_healthcheck_command(server, capsys):
    from gradprobe.server import healthcheck

    assert healthcheck.main(["--address", server.address]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert healthcheck.main(["--address", "127.0.0.1:1", "--timeout", "1"]) == 1
    assert capsys.readouterr().out.strip() == "UNREACHABLE"


def test_onnx_with_external_data_goes_up_inlined(client, models, tmp_path):
    import onnx

    path = tmp_path / "external.onnx"
    onnx.save_model(onnx.load(str(models.defect)), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="external.onnx.data",
                    size_threshold=0)
    assert (tmp_path / "external.onnx.data").stat().st_size > path.stat().st_size
    local = diagnose(path, path_label=str(path))
    remote = client.diagnose(path)
    assert _without_timing(remote) == _without_timing(local)  # sha256 and size: of the file
    assert remote.findings
