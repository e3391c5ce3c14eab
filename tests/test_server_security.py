"""Bearer token, TLS and mutual TLS against real servers, with certificates made by the test.
Health stays open without the token (Kubernetes probes); reflection is opt-in and needs the
token like any other call."""

from __future__ import annotations

import argparse

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_harness import (
    make_certificates,
    openssl_available,
    shared_models,
    start_test_server,
)

from gradprobe.client.api import Client, RemoteError
from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.errors import ConfigError
from gradprobe.server import healthcheck
from gradprobe.server.main import add_serve_arguments, config_from_args
from gradprobe.v1 import service_pb2 as spb
from gradprobe.v1 import service_pb2_grpc

TOKEN = "s3cret-token-for-tests"

pytestmark = pytest.mark.skipif(not openssl_available(), reason="needs the openssl command")


@pytest.fixture(scope="module")
def models():
    return shared_models()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, certs):
    """TLS plus a bearer token."""
    running = start_test_server(tmp_path_factory.mktemp("tls-server"), token=TOKEN,
                                tls_cert=certs["server.pem"], tls_key=certs["server.key"],
                                reflection=True)
    yield running
    running.stop()


def _tls_channel(server, certs, *, client_cert: bool = False) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs["ca.pem"].read_bytes(),
        private_key=certs["client.key"].read_bytes() if client_cert else None,
        certificate_chain=certs["client.pem"].read_bytes() if client_cert else None)
    return grpc.secure_channel(server.address, credentials)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


@pytest.mark.parametrize("metadata", [
    (), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
    (("authorization", f"Bearer {TOKEN}x"),), (("authorization", f"bearer {TOKEN[:-1]}"),),
])
def test_calls_without_the_token_are_unauthenticated(tls_server, certs, metadata):
    channel = _tls_channel(tls_server, certs)
    stub = service_pb2_grpc.GradprobeStub(channel)
    kw = {"metadata": metadata, "timeout": 10}
    sha = "a" * 64
    assert _code(lambda: stub.HasModel(spb.HasModelRequest(sha256=sha), **kw)) \
        == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: stub.ListRules(spb.ListRulesRequest(), **kw)) \
        == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: list(stub.Diagnose(spb.DiagnoseRequest(sha256=sha), **kw))) \
        == grpc.StatusCode.UNAUTHENTICATED
    upload = iter([spb.UploadModelRequest(metadata=spb.UploadMetadata(sha256=sha, size_bytes=1))])
    assert _code(lambda: stub.UploadModel(upload, **kw)) == grpc.StatusCode.UNAUTHENTICATED
    channel.close()


def test_health_stays_open_and_reflection_needs_the_token(tls_server, certs):
    channel = _tls_channel(tls_server, certs)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "gradprobe.v1.Gradprobe"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert healthcheck.check(tls_server.address, tls_ca=certs["ca.pem"]) == "SERVING"
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = [reflection_pb2.ServerReflectionRequest(list_services="")]
    assert _code(lambda: list(reflection.ServerReflectionInfo(iter(request), timeout=10))) \
        == grpc.StatusCode.UNAUTHENTICATED
    replies = list(reflection.ServerReflectionInfo(
        iter(request), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),)))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"gradprobe.v1.Gradprobe", "grpc.health.v1.Health"} <= names
    channel.close()


def test_token_over_tls_diagnoses(tls_server, certs, models):
    with Client(tls_server.address, token=TOKEN, tls_ca=certs["ca.pem"], timeout_s=60) as c:
        assert c.server_info().auth_required
        report = c.diagnose(models.defect)
    local = diagnose(models.defect)
    assert [f.model_dump_json() for f in report.findings] == \
           [f.model_dump_json() for f in local.findings]
    with Client(tls_server.address, tls_ca=certs["ca.pem"], timeout_s=10) as c, \
            pytest.raises(RemoteError) as caught:
        c.diagnose(models.defect)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_plaintext_and_untrusted_clients_cannot_connect(tls_server, tmp_path):
    with Client(tls_server.address, token=TOKEN, timeout_s=5) as c, \
            pytest.raises(RemoteError) as plain:
        c.server_info()
    assert plain.value.code == grpc.StatusCode.UNAVAILABLE
    other_ca = make_certificates(tmp_path / "other")["ca.pem"]
    with Client(tls_server.address, token=TOKEN, tls_ca=other_ca, timeout_s=5) as c, \
            pytest.raises(RemoteError) as untrusted:
        c.server_info()
    assert untrusted.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate(tmp_path, certs):
    server = start_test_server(tmp_path, tls_cert=certs["server.pem"],
                               tls_key=certs["server.key"], tls_client_ca=certs["ca.pem"])
    try:
        with Client(server.address, tls_ca=certs["ca.pem"], timeout_s=5) as c, \
                pytest.raises(RemoteError) as caught:
            c.server_info()
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        with Client(server.address, tls_ca=certs["ca.pem"], client_cert=certs["client.pem"],
                    client_key=certs["client.key"], timeout_s=10) as c:
            assert c.server_info().version == "test"
            assert c.health() == "SERVING"
    finally:
        server.stop()


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_token_file_is_read_and_checked(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    assert config_from_args(_serve_args("--token-file", str(token_file))).token == TOKEN
    token_file.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        config_from_args(_serve_args("--token-file", str(token_file)))
    with pytest.raises(ConfigError, match="cannot read"):
        config_from_args(_serve_args("--token-file", str(tmp_path / "missing")))
