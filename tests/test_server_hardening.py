"""Attacks on a real server on localhost (issue 11): each is first shown to be a real attack,
then shown to fail against `gradprobe serve`, which keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import torch
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import helper, numpy_helper
from server_harness import SLOW_BATCH, shared_models, shared_server, start_test_server, wait_dead

from gradprobe.client.api import Client
from gradprobe.diagnostics.options import DiagnoseOptions
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
    for rule, values in (thresholds or {}).items():
        options.thresholds[rule].CopyFrom(values)
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


# --- streams and connections -------------------------------------------------------------------

TOKEN = "hardening-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    running = start_test_server(tmp_path_factory.mktemp("limited"), token=TOKEN,
                                upload_idle_s=120.0)  # the other limits at their defaults
    yield running
    running.stop()


async def _hold_streams(address: str, count: int, channels: int, open_call) -> tuple[list, list]:
    """Open `count` streams spread over `channels` connections; return (channels, calls)."""
    opened = [aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
              for _ in range(channels)]
    return opened, [open_call(opened[i % channels], i) for i in range(count)]


def _idle_upload(release: asyncio.Event):
    def open_call(channel, i):
        async def messages():
            sha = hashlib.sha256(f"idle {i}".encode()).hexdigest()
            yield spb.UploadModelRequest(metadata=spb.UploadMetadata(sha256=sha,
                                                                     size_bytes=1 << 20))
            await release.wait()
        return service_pb2_grpc.GradprobeStub(channel).UploadModel(messages(), metadata=AUTH)
    return open_call


def _idle_watch(channel, i):
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))


@pytest.mark.slow
def test_idle_streams_cannot_lock_out_health_or_work(limited_server, tmp_path: Path):
    models = shared_models()

    async def attack() -> tuple[int, int, int, int]:
        release = asyncio.Event()
        watch_channels, watches = await _hold_streams(limited_server.address, 400, 16,
                                                      _idle_watch)
        upload_channels, uploads = await _hold_streams(limited_server.address, 400, 16,
                                                       _idle_upload(release))
        await asyncio.sleep(5)  # every stream has reached the server or been refused
        # idle uploads hold no file: the store's incoming folder stays empty
        assert not list((limited_server.store_dir / "incoming").iterdir())
        async with aio.insecure_channel(limited_server.address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        def normal_diagnose():
            with Client(limited_server.address, token=TOKEN, timeout_s=120) as client:
                return client.diagnose(models.defect)

        report = await asyncio.to_thread(normal_diagnose)
        assert report.findings  # the planted defect is found
        refused = [c for c in watches if c.done()
                   and await c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
        open_watches = sum(not c.done() for c in watches)
        open_uploads = sum(not c.done() for c in uploads)
        release.set()
        for call in [*watches, *uploads]:
            call.cancel()
        for channel in [*watch_channels, *upload_channels]:
            await channel.close()
        return len(refused), open_watches, open_uploads, len(watches) + len(uploads)

    refused, open_watches, open_uploads, total = asyncio.run(attack())
    assert total == 800
    assert 0 < open_watches <= 128 and refused == 400 - open_watches  # --max-open-streams
    assert open_uploads == 400  # all still open, idle: they cost no file and no slot of work


@pytest.mark.slow
def test_an_idle_upload_is_cancelled_and_cleaned(tmp_path: Path):
    running = start_test_server(tmp_path, upload_idle_s=2.0)
    try:
        stub = service_pb2_grpc.GradprobeStub(grpc.insecure_channel(running.address))
        data = b"x" * 5000

        def messages():
            yield spb.UploadModelRequest(metadata=spb.UploadMetadata(
                sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)))
            yield spb.UploadModelRequest(chunk=data[:1000])
            time.sleep(6)  # then nothing: the server gives up after 2 s

        start = time.monotonic()
        error = status_of(lambda: stub.UploadModel(messages(), timeout=30))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "--upload-idle-s" in error.details()
        assert time.monotonic() - start < 5.5
        assert not list((running.store_dir / "incoming").iterdir())  # the temp file is gone
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(running.address))
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop()


def test_a_stream_of_empty_chunks_is_bounded(server, stub):
    def messages():
        yield spb.UploadModelRequest(metadata=spb.UploadMetadata(sha256="ab" * 32,
                                                                 size_bytes=10))
        for _ in range(100_000):
            yield spb.UploadModelRequest(chunk=b"")

    error = status_of(lambda: stub.UploadModel(messages(), timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty chunks" in error.details()


# --- workers: memory, errors, store quota, orphans ---------------------------------------------

MEMORY_MB = 1500  # a worker takes ~0.9 GB with torch imported and warmed up
QUOTA_BYTES = 200 * 1024


class _AllocatesGigabytes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        big = torch.ones([x.shape[0] * 400_000_000])  # 3.2 GB for a batch of 2
        return self.fc(x) + big.sum() * 0


class _RaisesText(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        if bool(x.sum() > -1e30):
            raise ValueError("EXFIL-MARKER " + str(x.shape[0]))
        return self.fc(x)


def _scripted_bytes(module: torch.nn.Module, tmp_path: Path) -> bytes:
    path = tmp_path / "m.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), str(path))
    return path.read_bytes()


@pytest.fixture(scope="module")
def capped_server(tmp_path_factory):
    running = start_test_server(tmp_path_factory.mktemp("capped"), worker_memory_mb=MEMORY_MB,
                                store_max_gb=QUOTA_BYTES / (1 << 30))
    yield running
    running.stop()


@pytest.fixture()
def capped_stub(capped_server):
    capped_server.wait_for_workers(1)
    channel = grpc.insecure_channel(capped_server.address)
    yield service_pb2_grpc.GradprobeStub(channel)
    channel.close()


@pytest.mark.slow
def test_a_probe_over_the_memory_cap_is_resource_exhausted_and_the_worker_replaced(
        capped_server, capped_stub, tmp_path: Path):
    before = set(capped_server.pool.pids)
    sha = upload(capped_stub, _scripted_bytes(_AllocatesGigabytes(), tmp_path))
    error = status_of(lambda: diagnose(capped_stub, sha, label="big.pt", shapes=[[2, 4]]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--worker-memory-mb" in error.details()
    after = set(capped_server.wait_for_workers(1))
    assert not before & after  # that worker was replaced
    ok = upload(capped_stub, _mlp_onnx({"fc.weight": np.eye(8, dtype=np.float32),
                                        "fc.bias": np.zeros(8, np.float32)}).SerializeToString())
    assert diagnose(capped_stub, ok).report.model.sha256 == ok


def test_a_batch_that_cannot_fit_is_refused_before_any_work(capped_server, capped_stub):
    sha = upload(capped_stub, _mlp_onnx({"fc.weight": np.eye(8, dtype=np.float32),
                                         "fc.bias": np.zeros(8, np.float32)}).SerializeToString())
    pids = set(capped_server.pool.pids)
    start = time.monotonic()
    error = status_of(lambda: diagnose(capped_stub, sha, shapes=[[200_000, 8, 1000]]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--worker-memory-mb" in error.details() and time.monotonic() - start < 5
    assert set(capped_server.pool.pids) == pids  # no worker was touched


def test_request_errors_get_their_status_and_bounded_text(capped_server, capped_stub,
                                                          tmp_path: Path):
    mlp = _mlp_onnx({"fc.weight": np.eye(8, dtype=np.float32),
                     "fc.bias": np.zeros(8, np.float32)})
    sha = upload(capped_stub, mlp.SerializeToString())
    for shapes in ([[-4, 8]], [[0, 8]]):
        error = status_of(lambda: diagnose(capped_stub, sha, shapes=shapes))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    for value in (float("nan"), float("inf")):
        error = status_of(lambda: diagnose(capped_stub, sha,
                                           thresholds={"dead-relu": spb.Thresholds(
                                               values={"dead_share": value})}))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "finite" in error.details()

    raising = upload(capped_stub, _scripted_bytes(_RaisesText(), tmp_path))
    error = status_of(lambda: diagnose(capped_stub, raising, label="r.pt", shapes=[[2, 4]]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "EXFIL-MARKER" not in error.details() and "ValueError" in error.details()

    mlp.graph.node[1].op_type = "R" * 100_000  # a 100 KB operator name
    long_name = upload(capped_stub, mlp.SerializeToString())
    error = status_of(lambda: diagnose(capped_stub, long_name))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unsupported operator" in error.details() and len(error.details()) < 2000


def test_the_store_quota_evicts_the_least_recently_used_model(capped_server, capped_stub):
    rng = np.random.default_rng(11)
    blobs = [rng.bytes(80 * 1024) for _ in range(3)]
    first, second = upload(capped_stub, blobs[0]), upload(capped_stub, blobs[1])
    time.sleep(0.05)
    assert capped_stub.HasModel(spb.HasModelRequest(sha256=first), timeout=10).present
    third = upload(capped_stub, blobs[2])  # 240 KB > 200 KB: the least recently used goes
    present = {sha: capped_stub.HasModel(spb.HasModelRequest(sha256=sha), timeout=10).present
               for sha in (first, second, third)}
    assert present == {first: True, second: False, third: True}
    stored = sum(p.stat().st_size for p in capped_server.store_dir.iterdir() if p.is_file())
    assert stored <= QUOTA_BYTES
    error = status_of(lambda: upload(capped_stub, rng.bytes(QUOTA_BYTES + 1)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--store-max-gb" in error.details()


def _worker_pids(server_pid: int) -> list[int]:
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    return [int(pid) for pid in children
            if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text()]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_killed_server_takes_its_busy_worker_with_it(tmp_path: Path):
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gradprobe.client.cli", "serve", "--port", "0",
             "--workers", "1", "--store-dir", str(tmp_path / "store")],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (found := re.search(r"listening on (127\.0\.0\.1:\d+)",
                                      log_path.read_text(errors="replace"))):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        models = shared_models()
        probing = threading.Event()

        def slow_probe() -> None:
            with contextlib.suppress(Exception), \
                    Client(found.group(1), timeout_s=120) as client:
                client.diagnose(models.slow, DiagnoseOptions(batch_size=SLOW_BATCH),
                                progress=lambda stage, _: stage == "probe" and probing.set())

        thread = threading.Thread(target=slow_probe, daemon=True)
        thread.start()
        assert probing.wait(120), "the slow probe never began"
        workers = _worker_pids(process.pid)
        assert workers
        process.kill()  # kill -9: no chance to clean up
        process.wait()
        for pid in workers:
            wait_dead(pid, timeout_s=10)
    finally:
        if process.poll() is None:
            process.kill()


def test_a_client_that_pings_too_often_is_disconnected(server):
    """Keep-alive enforcement: pings more often than every 10 s without data are strikes; two
    strikes and the server closes the connection (GOAWAY too_many_pings)."""
    channel = grpc.insecure_channel(server.address, options=[
        ("grpc.keepalive_time_ms", 500), ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0)])
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                        timeout=60)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        for reply in watch:
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert "too many pings" in caught.value.details().lower()
    assert time.monotonic() - start < 30
    channel.close()
