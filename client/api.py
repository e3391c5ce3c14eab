"""`Client`: the Python API of a gradprobe server, for MLOps code and `gradprobe lint --server`.

    from gradprobe.client.api import Client

    with Client("gradprobe.internal:50051", token=os.environ["GRADPROBE_TOKEN"]) as client:
        report = client.diagnose("model.onnx")      # uploads only if the server lacks it
        if report.fails("error"): ...

Returns the same pydantic `Report` as the local `diagnose()`. A model the server rejects raises
the same GradprobeError class the local run would; transport and server faults raise
`RemoteError` (with the gRPC status name in `.code`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradprobe.diagnostics.errors import ConfigError, ModelLoadError
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.report import Report
from gradprobe.server import convert
from gradprobe.v1 import service_pb2 as spb
from gradprobe.v1 import service_pb2_grpc

if TYPE_CHECKING:  # the rules package imports torch; a client needs it only for list_rules
    from gradprobe.diagnostics.rules.base import RuleDoc

CHUNK_BYTES = 1 << 20
# A job that has not reached a replica is sent again; gRPC's retry policy covers failures
# before the replica answers, this covers an upload cut short. Never after `accepted`.
LINT_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.2
# round_robin: each new call goes to the next ready replica. Retries: a call that fails as
# UNAVAILABLE before the server sent anything (connection refused, replica shutting down) is
# retried on the next replica; gRPC commits a call at the first response, so nothing a replica
# has started is ever run twice.
SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "gradprobe.v1.Gradprobe"}, {"service": "grpc.health.v1.Health"}],
        "retryPolicy": {
            "maxAttempts": 4,
            "initialBackoff": "0.05s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
})
MAX_RECEIVE_BYTES = 512 << 20  # reports of large models are big
ERROR_CLASS_KEY = "gradprobe-error-class"  # trailing metadata set by the server
TOKEN_ENV = "GRADPROBE_TOKEN"

ModelSource = str | Path | bytes
Progress = Callable[[str, float], None]


class RemoteError(Exception):
    """The server could not be reached, refused the call, or failed (not the model's fault)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    memory_bytes: int


@dataclass(frozen=True)
class ServerInfo:
    version: str
    default_device: str
    auth_required: bool
    max_model_bytes: int
    workers: int
    max_queue: int
    timeout_s: float | None
    chunk_bytes: int
    devices: list[Device] = field(default_factory=list)


def translate_error(exc: grpc.RpcError, target: str) -> Exception:
    """The exception a caller should see for a failed call."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or str(code)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        trailers = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
        return convert.rebuild_error(trailers.get(ERROR_CLASS_KEY, ""), details)
    if code == grpc.StatusCode.INTERNAL and "RST_STREAM" in details:
        # A stream reset (by a balancer whose replica went away, or by the connection itself)
        # is a lost replica, not a fault of gradprobe: our server ends its calls with a status.
        return RemoteError(grpc.StatusCode.UNAVAILABLE,
                           f"gradprobe server {target} is unavailable: the call was reset on "
                           f"its way to a replica ({details})")
    if code == grpc.StatusCode.UNAVAILABLE:
        return RemoteError(code, f"gradprobe server {target} is unavailable: {details}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return RemoteError(code, f"gradprobe server {target} rejected the call: {details} "
                                 f"(set {TOKEN_ENV}, or give the token: --token-file FILE on "
                                 "the command line, Client(token=...) in Python)")
    return RemoteError(code, f"gradprobe server {target}: {code.name}: {details}")


def _read_pem(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class _Payload:
    data: bytes | Path  # what is uploaded
    sha256: str  # of the uploaded bytes: the server's key
    size: int
    # An ONNX file with external data goes up inlined; the report still describes the file
    # the user named, as a local run does: its own sha256 and size.
    file_identity: tuple[str, int] | None = None


def _hash_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _require_file_source(model: object) -> None:
    """The server probes files; a live model is linted locally or saved first. (Exporting it
    here would pull torch into a client that is torch-free by design.)"""
    if not isinstance(model, (str, Path, bytes)):
        raise ModelLoadError(
            f"Client.diagnose sends a model file (a path or bytes), not a {type(model).__name__}:"
            " lint a live model locally with gradprobe.diagnose(model, example_inputs), or save "
            "it with torch.export.save(torch.export.export(model, example_inputs), 'model.pt2')"
            " and send that file")


def _model_payload(source: ModelSource) -> _Payload:
    """What to upload for `source`. An ONNX file whose tensors live in external data files is
    sent with them inlined: the server only ever holds single files."""
    if isinstance(source, bytes):
        return _Payload(source, hashlib.sha256(source).hexdigest(), len(source))
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{path}: no such model file")
    inlined = _inline_external_data(path)
    if inlined is not None:
        return _Payload(inlined, hashlib.sha256(inlined).hexdigest(), len(inlined),
                        file_identity=_hash_file(path))
    sha, size = _hash_file(path)
    return _Payload(path, sha, size)


def _inline_external_data(path: Path) -> bytes | None:
    with path.open("rb") as f:
        if f.read(4) == b"PK\x03\x04":  # TorchScript archive
            return None
    try:
        import onnx
        from onnx.external_data_helper import uses_external_data

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not readable as ONNX here: let the server say why
        return None
    if not any(uses_external_data(t) for t in model.graph.initializer):
        return None
    try:
        return onnx.load(str(path)).SerializeToString()
    except Exception as exc:
        raise ConfigError(f"{path}: cannot read its external data: {exc}") from None


def _chunks(payload: bytes | Path) -> Iterator[bytes]:
    stream: BinaryIO
    with (io.BytesIO(payload) if isinstance(payload, bytes) else payload.open("rb")) as stream:
        yield from iter(lambda: stream.read(CHUNK_BYTES), b"")


def _upload_metadata(payload: _Payload, model: ModelSource,
                     options: DiagnoseOptions | None) -> spb.UploadMetadata:
    name = Path(model).name if not isinstance(model, bytes) else ""
    return spb.UploadMetadata(filename=name, format=_format_of(options),
                              size_bytes=payload.size, sha256=payload.sha256)


def _format_of(options: DiagnoseOptions | None) -> int:
    # Unspecified unless the caller says: the server reads the format from the content.
    return convert.format_to_proto(options.format if options is not None else None)


class Client:
    """A connection to one gradprobe server. Thread-safe; reuse one for many calls."""

    def __init__(self, target: str, token: str | None = None, tls_ca: str | Path | None = None,
                 client_cert: str | Path | None = None, client_key: str | Path | None = None,
                 *, tls: bool | None = None, timeout_s: float | None = None) -> None:
        """`target`: one server (`host:port`), several replicas (`a:50051,b:50051,c:50051`) or
        a name with one address per replica (`dns:///gradprobe-headless:50051`); jobs are
        spread over the replicas by gRPC's round_robin, and a job that fails to reach one
        before it was accepted is retried on another. `token`: the bearer token (default: the
        GRADPROBE_TOKEN environment variable); `tls_ca`: CA bundle that signed the server's
        certificate (TLS); `client_cert` and `client_key`: this client's certificate for
        mutual TLS. `tls=True` uses TLS with the system's roots. `timeout_s`: default deadline
        of each call."""
        if token is None:
            token = os.environ.get(TOKEN_ENV) or None
        self.target = target
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if (client_cert is None) != (client_key is None):
            raise ConfigError("mutual TLS needs both a client certificate and its key")
        channel_target, authority = balanced_target(target)
        options = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                   ("grpc.max_send_message_length", 4 * CHUNK_BYTES),
                   ("grpc.service_config", SERVICE_CONFIG),
                   ("grpc.enable_retries", 1)]
        if authority is not None:  # a list of replicas: TLS checks the first one's name
            options.append(("grpc.default_authority", authority))
        if tls or tls_ca is not None or client_cert is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(tls_ca, "TLS CA bundle"),
                private_key=_read_pem(client_key, "client key"),
                certificate_chain=_read_pem(client_cert, "client certificate"),
            )
            self._channel = grpc.secure_channel(channel_target, credentials, options)
        else:
            self._channel = grpc.insecure_channel(channel_target, options)
        self._stub = service_pb2_grpc.GradprobeStub(self._channel)
        self.last_replica: str | None = None  # which replica accepted the last job

    # --- context manager ----------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- calls --------------------------------------------------------------------------------

    def _call(self, method, request, deadline: float | None, **kwargs):  # noqa: ANN001, ANN202
        try:
            return method(request, timeout=_remaining(deadline), metadata=self._metadata,
                          **kwargs)
        except grpc.RpcError as exc:
            raise translate_error(exc, self.target) from None

    def _deadline(self, timeout_s: float | None) -> float | None:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        return None if timeout is None else time.monotonic() + timeout

    def has_model(self, sha256: str, *, timeout_s: float | None = None) -> bool:
        """Whether the replica this call reaches holds `sha256`. Deprecated with the 0.1 calls
        it uses (HasModel): behind a balancer the next call may reach another replica."""
        reply = self._call(self._stub.HasModel, spb.HasModelRequest(sha256=sha256),
                           self._deadline(timeout_s))
        return reply.present

    def upload(self, model: ModelSource, *, options: DiagnoseOptions | None = None,
               timeout_s: float | None = None) -> str:
        """Make sure the server holds `model` (a path or the file's bytes); return the sha256
        it is stored under. Nothing is sent when the server already has it. Deprecated with the
        0.1 calls it uses (HasModel, UploadModel): `diagnose` uploads within its own job."""
        _require_file_source(model)
        payload = _model_payload(model)
        self._upload(payload, model, options, self._deadline(timeout_s))
        return payload.sha256

    def _upload(self, payload: _Payload, model: ModelSource, options: DiagnoseOptions | None,
                deadline: float | None) -> None:
        if self._call(self._stub.HasModel,
                      spb.HasModelRequest(sha256=payload.sha256), deadline).present:
            return
        metadata = _upload_metadata(payload, model, options)

        def messages() -> Iterator[spb.UploadModelRequest]:
            yield spb.UploadModelRequest(metadata=metadata)
            for chunk in _chunks(payload.data):
                yield spb.UploadModelRequest(chunk=chunk)

        self._call(self._stub.UploadModel, messages(), deadline)

    def diagnose(self, model: ModelSource, options: DiagnoseOptions | None = None,
                 progress: Progress | None = None, *, path_label: str | None = None,
                 timeout_s: float | None = None) -> Report:
        """Probe `model` on the server (uploading it only where the replica lacks it): the
        report (and any error) of the local `diagnose(model, options, path_label=...)`.
        `path_label` is what the report shows as model.path; default: the path as given, None
        for bytes. A job that could not reach a replica before one accepted it is retried
        (on another replica where there are several); once accepted it is never re-run."""
        _require_file_source(model)
        options = options or DiagnoseOptions()
        wire_options = convert.options_to_proto(options)  # ConfigError before any traffic
        deadline = self._deadline(timeout_s)
        if path_label is None and not isinstance(model, bytes):
            path_label = str(model)
        payload = _model_payload(model)
        start = spb.LintStart(model=_upload_metadata(payload, model, options),
                              options=wire_options, path_label=path_label)
        if path_label is None:
            start.ClearField("path_label")
        for attempt in range(LINT_ATTEMPTS):
            try:
                report = self._lint(start, payload, progress, deadline)
                break
            except _NotAccepted as failure:
                pause = RETRY_BACKOFF_S * 2 ** attempt
                if attempt + 1 == LINT_ATTEMPTS or (
                        deadline is not None and deadline - time.monotonic() <= pause):
                    raise failure.error from None  # the replica's own status, not a timeout
                time.sleep(pause)
        if payload.file_identity is not None:
            report.model.sha256, report.model.size_bytes = payload.file_identity
        return report

    def _lint(self, start: spb.LintStart, payload: _Payload, progress: Progress | None,
              deadline: float | None) -> Report:
        """One Lint stream. Raises _NotAccepted for an UNAVAILABLE replica that had not yet
        accepted the job (nothing ran: safe to send again)."""
        outbox: queue.Queue[spb.LintRequest | object | None] = queue.Queue()
        outbox.put(spb.LintRequest(start=start))

        def requests() -> Iterator[spb.LintRequest]:
            while (item := outbox.get()) is not None:
                if item is _SEND_MODEL:  # read lazily: a large model is never all in memory
                    for chunk in _chunks(payload.data):
                        yield spb.LintRequest(chunk=chunk)
                    return  # the half-close ends the upload
                yield item

        findings = []
        report = None
        accepted = finished = False
        stream = self._call(self._stub.Lint, requests(), deadline)
        try:
            for event in stream:  # to the end of the stream: the server ends it with OK
                kind = event.WhichOneof("event")
                if kind == "send_model":
                    outbox.put(_SEND_MODEL)
                elif kind == "accepted":
                    accepted = True
                    self.last_replica = event.accepted.replica
                    outbox.put(None)
                elif kind == "progress":
                    if progress is not None:
                        progress(event.progress.stage, event.progress.fraction)
                elif kind == "finding":
                    findings.append(event.finding)
                elif kind == "report":
                    report = event.report
            finished = True
        except grpc.RpcError as exc:
            error = translate_error(exc, self.target)
            if not accepted and isinstance(error, RemoteError) \
                    and error.code == grpc.StatusCode.UNAVAILABLE:
                raise _NotAccepted(error) from None
            raise error from None
        finally:
            outbox.put(None)  # the request thread never waits on a finished call
            if not finished:  # e.g. the progress callback raised: free the server's worker
                stream.cancel()
        if report is None:
            raise RemoteError(grpc.StatusCode.INTERNAL,
                              f"gradprobe server {self.target} ended the stream without a report")
        return convert.report_from_proto(report, findings)

    def list_rules(self, *, timeout_s: float | None = None) -> list[RuleDoc]:
        reply = self._call(self._stub.ListRules, spb.ListRulesRequest(), self._deadline(timeout_s))
        return [convert.rule_doc_from_proto(r) for r in reply.rules]

    def server_info(self, *, timeout_s: float | None = None) -> ServerInfo:
        info = self._call(self._stub.GetServerInfo, spb.GetServerInfoRequest(),
                          self._deadline(timeout_s))
        limits = info.limits
        return ServerInfo(
            version=info.version, default_device=info.default_device,
            auth_required=info.auth_required, max_model_bytes=limits.max_model_bytes,
            workers=limits.workers, max_queue=limits.max_queue,
            timeout_s=limits.timeout_s or None, chunk_bytes=limits.chunk_bytes,
            devices=[Device(d.name, d.description, d.memory_bytes) for d in info.devices],
        )

    def health(self, service: str = "", *, timeout_s: float | None = 5.0) -> str:
        """The standard health status: "SERVING", "NOT_SERVING", ..."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        reply = self._call(stub.Check, health_pb2.HealthCheckRequest(service=service),
                           self._deadline(timeout_s))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class _NotAccepted(Exception):
    """A Lint stream failed as UNAVAILABLE before any replica accepted the job."""

    def __init__(self, error: RemoteError) -> None:
        self.error = error
        super().__init__(str(error))


_SEND_MODEL = object()  # the server asked for the model's bytes


def balanced_target(target: str) -> tuple[str, str | None]:
    """The gRPC channel target for `target`, and the authority to send when it differs.

    `a:1,b:2` (several replicas) becomes one `ipv4:`/`ipv6:` target of their addresses,
    resolved here once, so that round_robin spreads jobs over them; gRPC's own names
    (`dns:///...`, `ipv4:...`, `unix:...`) and a single `host:port` pass unchanged."""
    parts = [p.strip() for p in target.split(",")]
    if len(parts) == 1 or ":///" in target or target.startswith(("ipv4:", "ipv6:", "unix:")):
        return target, None
    if any(not p for p in parts):
        raise ConfigError(f"--server {target!r}: an empty address in the list")
    v4, v6 = [], []
    for part in parts:
        host, port = _split_host_port(part, target)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise ConfigError(f"--server {target!r}: cannot resolve {host}: {exc}") from None
        families = {info[0] for info in infos}
        # One address per replica: localhost is 127.0.0.1 and ::1, the same process.
        if socket.AF_INET in families:
            address = next(i[4][0] for i in infos if i[0] == socket.AF_INET)
            v4.append(f"{address}:{port}")
        else:
            address = next(i[4][0] for i in infos if i[0] == socket.AF_INET6)
            v6.append(f"[{address}]:{port}")
    if v4 and v6:
        raise ConfigError(f"--server {target!r} mixes IPv4 and IPv6 replicas: gRPC balances "
                          "over one family; give names of one family or a dns:/// name")
    scheme, addresses = ("ipv4", v4) if v4 else ("ipv6", v6)
    return f"{scheme}:{','.join(addresses)}", parts[0]


def _split_host_port(address: str, target: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"--server {target!r}: {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise RemoteError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
    return remaining


__all__ = ["Client", "Device", "RemoteError", "ServerInfo"]
