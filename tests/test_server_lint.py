"""The one-stream Lint call against a real server: the model is asked for only when the replica
lacks it, `accepted` comes before any work, malformed streams get one clear status, a client
skips a replica that is down, and /metrics (scraped over HTTP, parsed by prometheus_client)
counts what happened."""

from __future__ import annotations

import hashlib
import queue
import time
from pathlib import Path

import grpc
import pytest
from replicas import free_port, metrics_text, parse_metrics
from server_harness import SLOW_BATCH, shared_models, start_test_server

from gradprobe.client.api import Client, RemoteError
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.v1 import report_pb2 as pb
from gradprobe.v1 import service_pb2 as spb


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = shared_models()
    small = max(models.onnx.stat().st_size, models.defect.stat().st_size)
    # room for the slow model and one small one and a half: models get evicted
    quota = models.slow.stat().st_size + 1.5 * small
    running = start_test_server(tmp_path_factory.mktemp("lint"), metrics_port=0,
                                replica="replica-a", store_max_gb=quota / (1 << 30))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def models():
    return shared_models()


def _start(data: bytes, *, sha: str | None = None, size: int | None = None,
           label: str | None = "model.onnx") -> spb.LintRequest:
    start = spb.LintStart(model=spb.UploadMetadata(
        filename="model.onnx", format=pb.MODEL_FORMAT_ONNX,
        size_bytes=len(data) if size is None else size,
        sha256=sha or hashlib.sha256(data).hexdigest()), path_label=label)
    return spb.LintRequest(start=start)


class Conversation:
    """Drives one Lint stream by hand: what the client sends depends on what it was told."""

    def __init__(self, stub, first: spb.LintRequest) -> None:
        self.outbox: queue.Queue = queue.Queue()
        self.outbox.put(first)
        self.events = stub.Lint(iter(self.outbox.get, None), timeout=120)

    def send(self, data: bytes, chunk: int = 16 * 1024) -> None:
        for i in range(0, len(data), chunk):
            self.outbox.put(spb.LintRequest(chunk=data[i:i + chunk]))
        self.outbox.put(None)  # half-close: the upload is complete

    def kinds(self, data: bytes | None = None) -> list[tuple[str, object]]:
        seen = []
        try:
            for event in self.events:
                kind = event.WhichOneof("event")
                seen.append((kind, getattr(event, kind)))
                if kind == "send_model":
                    assert data is not None, "the server asked for a model it should have"
                    self.send(data)
                elif kind == "accepted":
                    self.outbox.put(None)
        finally:
            self.outbox.put(None)
        return seen


def _stub(server):
    channel = grpc.insecure_channel(server.address)
    return channel, server.stub(channel)


def test_a_new_model_is_asked_for_once_then_served_from_the_replicas_store(server, models):
    data = models.defect.read_bytes()
    channel, stub = _stub(server)
    with channel:
        first = Conversation(stub, _start(data)).kinds(data)
        second = Conversation(stub, _start(data)).kinds(None)
    kinds = [k for k, _ in first]
    assert kinds[:2] == ["send_model", "accepted"] and kinds[-1] == "report", kinds
    assert first[0][1].chunk_bytes == 1 << 20
    assert first[1][1].replica == "replica-a" and not first[1][1].cached
    assert "finding" in kinds and kinds.index("finding") > kinds.index("progress")
    again = [k for k, _ in second]
    assert again[0] == "accepted" and second[0][1].cached and "send_model" not in again
    findings = [(f.rule, f.layer) for k, f in first if k == "finding"]
    assert findings and findings == [(f.rule, f.layer) for k, f in second if k == "finding"]
    report = first[-1][1]
    assert report.model.sha256 == hashlib.sha256(data).hexdigest()
    assert report.model.path == "model.onnx"


@pytest.mark.parametrize("case", ["chunk first", "wrong sha", "too short", "too large"])
def test_a_malformed_stream_gets_one_clear_status_and_stores_nothing(server, models, case):
    data = models.onnx.read_bytes()
    before = sorted(p.name for p in server.store_dir.iterdir() if p.is_file())
    channel, stub = _stub(server)
    if case == "chunk first":
        first, body = spb.LintRequest(chunk=data[:10]), data
    elif case == "wrong sha":
        first, body = _start(data, sha="0" * 64), data
    elif case == "too short":
        first, body = _start(data + b"x" * 10), data
    else:
        first, body = _start(data, size=1 << 40), data
    with channel, pytest.raises(grpc.RpcError) as caught:
        Conversation(stub, first).kinds(body)
    code, details = caught.value.code(), caught.value.details()
    expected = {"chunk first": (grpc.StatusCode.INVALID_ARGUMENT, "first Lint message"),
                "wrong sha": (grpc.StatusCode.INVALID_ARGUMENT, "sha256 of the uploaded bytes"),
                "too short": (grpc.StatusCode.INVALID_ARGUMENT, "ended after"),
                "too large": (grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-model-mb")}[case]
    assert code == expected[0] and expected[1] in details and "\n" not in details, details
    assert sorted(p.name for p in server.store_dir.iterdir() if p.is_file()) == before


def test_the_client_skips_a_replica_that_is_down(server, models):
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    with Client(f"{down},{server.address}", timeout_s=120) as client:
        reports = [client.diagnose(models.onnx, DiagnoseOptions(seed=0)) for _ in range(4)]
        assert client.last_replica == "replica-a"
    assert {r.model.sha256 for r in reports} == {hashlib.sha256(
        models.onnx.read_bytes()).hexdigest()}


def test_a_client_with_only_dead_replicas_gets_unavailable_naming_them(models):
    target = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    with Client(target, timeout_s=30) as client, pytest.raises(RemoteError) as caught:
        client.diagnose(models.onnx)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert target in str(caught.value)


def _scrape(server) -> dict:
    return parse_metrics(metrics_text(server.running.metrics_port))


def test_metrics_count_requests_stages_uploads_restarts_and_evictions(server, models):
    before = _scrape(server)

    def value(metrics, name, **labels):
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

    with Client(server.address) as client:
        # a probe past its deadline: its worker is killed and replaced. The model goes up
        # first, so that a slow upload cannot use up the deadline before the probe starts.
        client.upload(models.slow)
        with pytest.raises(RemoteError) as caught:
            client.diagnose(models.slow, DiagnoseOptions(batch_size=SLOW_BATCH), timeout_s=4.0)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        server.wait_for_workers(1)
        # the store holds the slow model and one small one: the other pushes one out
        client.diagnose(models.onnx)
        client.diagnose(models.defect)
    channel, stub = _stub(server)
    with channel, pytest.raises(grpc.RpcError):  # a malformed stream
        Conversation(stub, spb.LintRequest(chunk=b"x")).kinds(None)

    def grew_in(metrics, *codes: str) -> float:
        return sum(value(metrics, "gradprobe_requests_total", method="Lint", code=code)
                   - value(before, "gradprobe_requests_total", method="Lint", code=code)
                   for code in codes)

    # The client sees a refused stream's status before the server's handler has returned and
    # counted it: scrape until every request above is counted (or give up after 10 s).
    expected = {("OK",): 2, ("INVALID_ARGUMENT",): 1, ("DEADLINE_EXCEEDED", "CANCELLED"): 1}
    after, settle_by = _scrape(server), time.monotonic() + 10
    while (any(grew_in(after, *codes) < n for codes, n in expected.items())
           and time.monotonic() < settle_by):
        time.sleep(0.1)
        after = _scrape(server)

    def grew(*codes: str) -> float:
        return grew_in(after, *codes)

    ok = value(after, "gradprobe_requests_total", method="Lint", code="OK")
    assert grew("OK") == 2
    assert grew("INVALID_ARGUMENT") == 1
    # The client's deadline reaches the server as a cancellation, which may land a moment
    # before the server's own copy of the deadline has passed.
    assert grew("DEADLINE_EXCEEDED", "CANCELLED") == 1
    assert value(after, "gradprobe_worker_restarts_total") >= 1
    assert value(after, "gradprobe_store_evictions_total") > value(
        before, "gradprobe_store_evictions_total")
    uploaded = value(after, "gradprobe_uploaded_bytes_total") - value(
        before, "gradprobe_uploaded_bytes_total")
    assert uploaded >= models.slow.stat().st_size  # the slow model, and the evicted one again
    for stage in ("queue", "load", "probe", "rules", "total"):
        count = value(after, "gradprobe_job_seconds_count", stage=stage)
        assert count >= ok if stage != "queue" else count >= ok + 1, stage
    assert value(after, "gradprobe_job_seconds_sum", stage="total") > value(
        after, "gradprobe_job_seconds_sum", stage="probe") > 0
    assert value(after, "gradprobe_queue_depth") == 0
    assert value(after, "gradprobe_busy_workers") == 0
    assert value(after, "gradprobe_workers") == 1
    stored = sum(p.stat().st_size for p in server.store_dir.iterdir() if p.is_file())
    assert value(after, "gradprobe_store_bytes") == stored > 0


def test_a_dns_name_with_one_address_per_replica_is_balanced(server, models):
    port = server.running.port
    with Client(f"dns:///localhost:{port}", timeout_s=120) as client:
        report = client.diagnose(models.defect, DiagnoseOptions(seed=0))
    assert client.last_replica == "replica-a"
    assert report.model.sha256 == hashlib.sha256(models.defect.read_bytes()).hexdigest()


def test_a_folder_fans_out_over_the_replicas_in_input_order(server, models, tmp_path, capsys):
    import json
    import shutil

    from gradprobe.client.cli import main

    folder = tmp_path / "models"
    folder.mkdir()
    names = ["a_defect.onnx", "b_healthy.onnx", "c_defect.onnx", "d_healthy.onnx"]
    defect = Path(__file__).resolve().parents[1] / "examples" / "mlp_defects.onnx"
    for name in names:
        shutil.copy(defect if "defect" in name else models.onnx, folder / name)
    down = f"127.0.0.1:{free_port()}"
    code = main(["lint", str(folder), "--server", f"{down},{server.address}", "--jobs", "3",
                 "--format", "json", "--seed", "0"])
    out = capsys.readouterr().out
    reports = json.loads(out)
    reports = reports if isinstance(reports, list) else reports["reports"]
    assert code == 1  # the defects are errors
    assert [r["model"]["path"] for r in reports] == [str(folder / n) for n in names]
    assert [r["summary"]["error"] > 0 for r in reports] == [True, False, True, False]
