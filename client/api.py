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
MAX_RECEIVE_BYTES = 512 << 20  # reports of large models are big
ERROR_CLASS_KEY = "gradprobe-error-class"  # trailing metadata set by the server

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
    if code == grpc.StatusCode.UNAVAILABLE:
        return RemoteError(code, f"gradprobe server {target} is unavailable: {details}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return RemoteError(code, f"gradprobe server {target} rejected the call: {details} "
                                 "(pass --token or set GRADPROBE_TOKEN)")
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


def _format_of(options: DiagnoseOptions | None) -> int:
    # Unspecified unless the caller says: the server reads the format from the content.
    return convert.format_to_proto(options.format if options is not None else None)


class Client:
    """A connection to one gradprobe server. Thread-safe; reuse one for many calls."""

    def __init__(self, target: str, token: str | None = None, tls_ca: str | Path | None = None,
                 client_cert: str | Path | None = None, client_key: str | Path | None = None,
                 *, tls: bool | None = None, timeout_s: float | None = None) -> None:
        """`tls_ca`: CA bundle that signed the server's certificate (TLS); `client_cert` and
        `client_key`: this client's certificate for mutual TLS. `tls=True` uses TLS with the
        system's roots. `timeout_s`: default deadline of each call."""
        self.target = target
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if (client_cert is None) != (client_key is None):
            raise ConfigError("mutual TLS needs both a client certificate and its key")
        options = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                   ("grpc.max_send_message_length", 4 * CHUNK_BYTES)]
        if tls or tls_ca is not None or client_cert is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(tls_ca, "TLS CA bundle"),
                private_key=_read_pem(client_key, "client key"),
                certificate_chain=_read_pem(client_cert, "client certificate"),
            )
            self._channel = grpc.secure_channel(target, credentials, options)
        else:
            self._channel = grpc.insecure_channel(target, options)
        self._stub = service_pb2_grpc.GradprobeStub(self._channel)

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
        reply = self._call(self._stub.HasModel, spb.HasModelRequest(sha256=sha256),
                           self._deadline(timeout_s))
        return reply.present

    def upload(self, model: ModelSource, *, options: DiagnoseOptions | None = None,
               timeout_s: float | None = None) -> str:
        """Make sure the server holds `model` (a path or the file's bytes); return the sha256
        it is stored under. Nothing is sent when the server already has it."""
        _require_file_source(model)
        payload = _model_payload(model)
        self._upload(payload, model, options, self._deadline(timeout_s))
        return payload.sha256

    def _upload(self, payload: _Payload, model: ModelSource, options: DiagnoseOptions | None,
                deadline: float | None, *, force: bool = False) -> None:
        if not force and self._call(self._stub.HasModel,
                                    spb.HasModelRequest(sha256=payload.sha256), deadline).present:
            return
        name = Path(model).name if not isinstance(model, bytes) else ""
        metadata = spb.UploadMetadata(filename=name, format=_format_of(options),
                                      size_bytes=payload.size, sha256=payload.sha256)

        def messages() -> Iterator[spb.UploadModelRequest]:
            yield spb.UploadModelRequest(metadata=metadata)
            for chunk in _chunks(payload.data):
                yield spb.UploadModelRequest(chunk=chunk)

        self._call(self._stub.UploadModel, messages(), deadline)

    def diagnose(self, model: ModelSource, options: DiagnoseOptions | None = None,
                 progress: Progress | None = None, *, path_label: str | None = None,
                 timeout_s: float | None = None) -> Report:
        """Upload `model` if needed and probe it on the server: the report (and any error) of
        the local `diagnose(model, options, path_label=...)`. `path_label` is what the report
        shows as model.path; default: the path as given, None for bytes."""
        _require_file_source(model)
        options = options or DiagnoseOptions()
        wire_options = convert.options_to_proto(options)  # ConfigError before any traffic
        deadline = self._deadline(timeout_s)
        if path_label is None and not isinstance(model, bytes):
            path_label = str(model)
        payload = _model_payload(model)
        self._upload(payload, model, options, deadline)
        request = spb.DiagnoseRequest(sha256=payload.sha256, options=wire_options,
                                      path_label=path_label)
        if path_label is None:
            request.ClearField("path_label")
        try:
            report = self._diagnose(request, progress, deadline)
        except RemoteError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
            # The store lost the model between the check and the probe: send it once more.
            self._upload(payload, model, options, deadline, force=True)
            report = self._diagnose(request, progress, deadline)
        if payload.file_identity is not None:
            report.model.sha256, report.model.size_bytes = payload.file_identity
        return report

    def _diagnose(self, request: spb.DiagnoseRequest, progress: Progress | None,
                  deadline: float | None) -> Report:
        findings = []
        report = None
        stream = self._call(self._stub.Diagnose, request, deadline)
        finished = False
        try:
            for event in stream:  # to the end of the stream: the server ends it with OK
                kind = event.WhichOneof("event")
                if kind == "progress":
                    if progress is not None:
                        progress(event.progress.stage, event.progress.fraction)
                elif kind == "finding":
                    findings.append(event.finding)
                elif kind == "report":
                    report = event.report
            finished = True
        except grpc.RpcError as exc:
            raise translate_error(exc, self.target) from None
        finally:
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


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise RemoteError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
    return remaining


__all__ = ["Client", "Device", "RemoteError", "ServerInfo"]
