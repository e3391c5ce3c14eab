"""Uploads against a real server: content addressing, size limit enforced before any chunk is
read, hash and length checks, broken streams, and names from the client never used as paths."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import grpc
import pytest
from server_harness import SHARED_LIMIT_MB, shared_server

from gradprobe.v1 import report_pb2 as pb
from gradprobe.v1 import service_pb2 as spb

MIB = 1 << 20


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture()
def stub(server):
    channel = grpc.insecure_channel(server.address)
    yield server.stub(channel)
    channel.close()


def _meta(data: bytes, *, sha: str | None = None, size: int | None = None,
          filename: str = "model.onnx", fmt: int = pb.MODEL_FORMAT_ONNX) -> spb.UploadModelRequest:
    return spb.UploadModelRequest(metadata=spb.UploadMetadata(
        filename=filename, format=fmt, size_bytes=len(data) if size is None else size,
        sha256=sha or hashlib.sha256(data).hexdigest()))


def _chunks(data: bytes, size: int = 64 * 1024):
    for i in range(0, len(data), size):
        yield spb.UploadModelRequest(chunk=data[i:i + size])


def _upload(stub, messages):
    return stub.UploadModel(iter(list(messages)), timeout=30)


def _incoming(server) -> list[str]:
    return sorted(os.listdir(server.store_dir / "incoming"))


def _stored(server) -> list[str]:
    return sorted(p.name for p in server.store_dir.iterdir() if p.is_file())


def _status(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_upload_stores_under_the_hash_not_the_client_name(server, stub, tmp_path):
    data = os.urandom(300 * 1024)
    sha = hashlib.sha256(data).hexdigest()
    evil = tmp_path / "escaped.onnx"
    reply = _upload(stub, [_meta(data, filename=f"../../../../{evil}"), *_chunks(data)])
    assert reply.sha256 == sha and reply.size_bytes == len(data) and not reply.already_present
    assert (server.store_dir / f"{sha}.onnx").read_bytes() == data
    assert not evil.exists()
    assert all(name.startswith(sha) or len(name.split(".")[0]) == 64 for name in _stored(server))
    assert stub.HasModel(spb.HasModelRequest(sha256=sha.upper()), timeout=5).present
    again = _upload(stub, [_meta(data), *_chunks(data)])
    assert again.already_present
    assert _incoming(server) == []


def test_sha_mismatch_is_rejected_and_nothing_is_kept(server, stub):
    data = os.urandom(100 * 1024)
    wrong = hashlib.sha256(b"something else").hexdigest()
    err = _status(lambda: _upload(stub, [_meta(data, sha=wrong), *_chunks(data)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sha256 of the uploaded bytes" in err.details()
    assert not stub.HasModel(spb.HasModelRequest(sha256=wrong), timeout=5).present
    assert _incoming(server) == []


def test_stream_that_stops_halfway_is_rejected(server, stub):
    data = os.urandom(200 * 1024)
    half = list(_chunks(data))[:2]
    err = _status(lambda: _upload(stub, [_meta(data), *half]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"ended after {128 * 1024} of {len(data)} bytes" in err.details()
    assert _incoming(server) == []


def test_more_bytes_than_declared_are_rejected(server, stub):
    data = os.urandom(100 * 1024)
    err = _status(lambda: _upload(stub, [_meta(data, size=1000), *_chunks(data)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than the declared 1000 bytes" in err.details()


@pytest.mark.parametrize("messages, reason", [
    ([], "empty upload"),
    ([spb.UploadModelRequest(chunk=b"x")], "first upload message must carry the metadata"),
    ([spb.UploadModelRequest(metadata=spb.UploadMetadata(sha256="abc", size_bytes=1))],
     "64 hex digits"),
    ([spb.UploadModelRequest(metadata=spb.UploadMetadata(sha256="a" * 64, size_bytes=0))],
     "must be positive"),
    ([spb.UploadModelRequest(metadata=spb.UploadMetadata(sha256="a" * 64, size_bytes=5,
                                                         format=7))], "unknown model format"),
])
def test_malformed_uploads(stub, messages, reason):
    err = _status(lambda: _upload(stub, messages))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in err.details()


def test_metadata_twice_is_rejected(stub):
    data = b"abc" * 100
    err = _status(lambda: _upload(stub, [_meta(data), _meta(data)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only come in the first message" in err.details()


def test_over_the_size_limit_is_rejected_before_the_chunks_are_read(server, stub):
    declared = 100 * MIB
    pulled = []
    chunk = bytes(MIB)

    def messages():
        yield spb.UploadModelRequest(metadata=spb.UploadMetadata(
            filename="big.onnx", size_bytes=declared, sha256="b" * 64))
        for i in range(declared // MIB):
            pulled.append(i)
            yield spb.UploadModelRequest(chunk=chunk)

    start = time.monotonic()
    err = _status(lambda: stub.UploadModel(messages(), timeout=30))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"limit of {SHARED_LIMIT_MB * MIB} bytes" in err.details()
    assert time.monotonic() - start < 10
    # gRPC's client may have queued a few chunks into its send window; the server read none.
    assert len(pulled) < 16, f"{len(pulled)} MiB were sent before the rejection"
    assert _incoming(server) == []


def test_client_that_vanishes_mid_upload_leaves_no_partial_file(server, stub):
    data = os.urandom(512 * 1024)
    release = threading.Event()

    def messages():
        yield _meta(data)
        yield from list(_chunks(data))[:3]
        release.wait(30)  # the stream stops here, neither finished nor closed

    future = stub.UploadModel.future(messages(), timeout=30)
    deadline = time.monotonic() + 10
    while not _incoming(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _incoming(server), "the upload never started"
    future.cancel()
    release.set()
    deadline = time.monotonic() + 10
    while _incoming(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _incoming(server) == []
    sha = hashlib.sha256(data).hexdigest()
    assert not stub.HasModel(spb.HasModelRequest(sha256=sha), timeout=5).present
