"""Worker processes under stress, against a real server: a worker killed mid-probe fails only
its own request; cancelled and timed-out probes free their worker; a full queue answers
RESOURCE_EXHAUSTED at once instead of hanging."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
from server_harness import (
    SLOW_BATCH,
    pid_alive,
    shared_models,
    shared_server,
    start_test_server,
    wait_dead,
)

from gradprobe.client.api import Client
from gradprobe.v1 import service_pb2 as spb


@pytest.fixture(scope="module")
def models():
    return shared_models()


@pytest.fixture(scope="module")
def server():
    server = shared_server()  # one worker, one place in the queue
    assert server.config.workers == 1 and server.config.max_queue == 1
    return server


@pytest.fixture(scope="module")
def slow_sha(server, models):
    with Client(server.address) as c:
        return c.upload(models.slow)


@pytest.fixture()
def stub(server):
    server.wait_for_workers(1)  # a worker replaced by the previous test must be back
    channel = grpc.insecure_channel(server.address)
    yield server.stub(channel)
    channel.close()


def _slow_request(sha: str) -> spb.DiagnoseRequest:
    return spb.DiagnoseRequest(sha256=sha, options=spb.DiagnoseOptions(batch_size=SLOW_BATCH))


def _until_probe(call) -> None:
    """Read progress events until the probe stage has begun."""
    for event in call:
        if event.HasField("progress") and event.progress.stage == "probe":
            return
    raise AssertionError("the stream ended before the probe began")


def test_worker_killed_mid_probe_fails_that_request_only(server, stub, models, slow_sha):
    call = stub.Diagnose(_slow_request(slow_sha), timeout=120)
    _until_probe(call)
    [pid] = server.pool.busy_pids()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert f"worker crashed while probing {slow_sha}" in caught.value.details()
    assert "SIGKILL" in caught.value.details()
    # the pool replaced the worker and the next request succeeds
    with Client(server.address, timeout_s=120) as c:
        report = c.diagnose(models.onnx)
    assert report.model.format == "onnx"
    assert pid not in server.pool.pids


def test_cancelled_request_frees_its_worker(server, stub, models, slow_sha):
    call = stub.Diagnose(_slow_request(slow_sha), timeout=120)
    _until_probe(call)
    [pid] = server.pool.busy_pids()
    call.cancel()
    assert wait_dead(pid, timeout_s=5) < 5  # killed, not left to finish its probe
    with Client(server.address, timeout_s=120) as c:
        assert c.diagnose(models.onnx).model.format == "onnx"


def test_deadline_frees_the_worker(server, stub, slow_sha):
    call = stub.Diagnose(_slow_request(slow_sha), timeout=1.5)
    first = next(call)
    assert first.HasField("progress")
    [pid] = server.pool.busy_pids()
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_dead(pid, timeout_s=5)


def test_full_queue_is_resource_exhausted_not_a_hang(server, stub, slow_sha):
    running = stub.Diagnose(_slow_request(slow_sha), timeout=120)
    _until_probe(running)  # the only worker is busy
    queued = stub.Diagnose(_slow_request(slow_sha), timeout=120)
    first = next(queued)
    assert first.progress.stage == "queued"  # the one place in the queue is taken
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Diagnose(_slow_request(slow_sha), timeout=120))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-queue 1" in caught.value.details()
    assert time.monotonic() - start < 2
    # cheap calls are not queued behind probes
    assert stub.HasModel(spb.HasModelRequest(sha256=slow_sha), timeout=5).present
    [pid] = server.pool.busy_pids()
    queued.cancel()  # leaving the queue kills nothing
    running.cancel()
    wait_dead(pid)


def test_probe_past_the_server_time_limit(tmp_path, models):
    server = start_test_server(tmp_path, workers=1, timeout_s=1.0)
    channel = grpc.insecure_channel(server.address)
    try:
        with Client(server.address, timeout_s=120) as c:
            sha = c.upload(models.slow)
            with pytest.raises(grpc.RpcError) as caught:
                list(server.stub(channel).Diagnose(_slow_request(sha), timeout=60))
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "--timeout-s" in caught.value.details()
            assert c.diagnose(models.onnx).model.format == "onnx"  # a new worker took over
    finally:
        channel.close()
        server.stop()


def test_workers_ignore_a_group_sigint(server, stub, models):
    """Ctrl-C in a terminal reaches the whole process group; only the server decides when
    workers stop, so in-flight probes can drain."""
    pids = server.wait_for_workers(1)
    for pid in pids:
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    assert all(pid_alive(pid) for pid in pids)
    done = threading.Event()
    with Client(server.address, timeout_s=60) as c:
        c.diagnose(models.onnx, progress=lambda *_: done.set())
    assert done.is_set()

