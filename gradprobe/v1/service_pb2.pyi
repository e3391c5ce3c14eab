from gradprobe.v1 import report_pb2 as _report_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HasModelRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class HasModelResponse(_message.Message):
    __slots__ = ("present", "size_bytes")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    present: bool
    size_bytes: int
    def __init__(self, present: _Optional[bool] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class UploadMetadata(_message.Message):
    __slots__ = ("filename", "format", "size_bytes", "sha256")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    filename: str
    format: _report_pb2.ModelFormat
    size_bytes: int
    sha256: str
    def __init__(self, filename: _Optional[str] = ..., format: _Optional[_Union[_report_pb2.ModelFormat, str]] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class UploadModelRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: UploadMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[UploadMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadModelResponse(_message.Message):
    __slots__ = ("sha256", "size_bytes", "already_present")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size_bytes: int
    already_present: bool
    def __init__(self, sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., already_present: _Optional[bool] = ...) -> None: ...

class Shape(_message.Message):
    __slots__ = ("dims",)
    DIMS_FIELD_NUMBER: _ClassVar[int]
    dims: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dims: _Optional[_Iterable[int]] = ...) -> None: ...

class Shapes(_message.Message):
    __slots__ = ("shapes",)
    SHAPES_FIELD_NUMBER: _ClassVar[int]
    shapes: _containers.RepeatedCompositeFieldContainer[Shape]
    def __init__(self, shapes: _Optional[_Iterable[_Union[Shape, _Mapping]]] = ...) -> None: ...

class Thresholds(_message.Message):
    __slots__ = ("values",)
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.ScalarMap[str, float]
    def __init__(self, values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class DiagnoseOptions(_message.Message):
    __slots__ = ("input_shapes", "input_dtypes", "batch_size", "device", "seed", "select", "ignore", "severities", "thresholds", "format", "fill_undeclared")
    class SeveritiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _report_pb2.Severity
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_report_pb2.Severity, str]] = ...) -> None: ...
    class ThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Thresholds
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Thresholds, _Mapping]] = ...) -> None: ...
    INPUT_SHAPES_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SELECT_FIELD_NUMBER: _ClassVar[int]
    IGNORE_FIELD_NUMBER: _ClassVar[int]
    SEVERITIES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    FILL_UNDECLARED_FIELD_NUMBER: _ClassVar[int]
    input_shapes: Shapes
    input_dtypes: _report_pb2.StringList
    batch_size: int
    device: str
    seed: int
    select: _report_pb2.StringList
    ignore: _containers.RepeatedScalarFieldContainer[str]
    severities: _containers.ScalarMap[str, _report_pb2.Severity]
    thresholds: _containers.MessageMap[str, Thresholds]
    format: _report_pb2.ModelFormat
    fill_undeclared: bool
    def __init__(self, input_shapes: _Optional[_Union[Shapes, _Mapping]] = ..., input_dtypes: _Optional[_Union[_report_pb2.StringList, _Mapping]] = ..., batch_size: _Optional[int] = ..., device: _Optional[str] = ..., seed: _Optional[int] = ..., select: _Optional[_Union[_report_pb2.StringList, _Mapping]] = ..., ignore: _Optional[_Iterable[str]] = ..., severities: _Optional[_Mapping[str, _report_pb2.Severity]] = ..., thresholds: _Optional[_Mapping[str, Thresholds]] = ..., format: _Optional[_Union[_report_pb2.ModelFormat, str]] = ..., fill_undeclared: _Optional[bool] = ...) -> None: ...

class DiagnoseRequest(_message.Message):
    __slots__ = ("sha256", "options", "path_label")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PATH_LABEL_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    options: DiagnoseOptions
    path_label: str
    def __init__(self, sha256: _Optional[str] = ..., options: _Optional[_Union[DiagnoseOptions, _Mapping]] = ..., path_label: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "fraction")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    stage: str
    fraction: float
    def __init__(self, stage: _Optional[str] = ..., fraction: _Optional[float] = ...) -> None: ...

class DiagnoseEvent(_message.Message):
    __slots__ = ("progress", "finding", "report")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    FINDING_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    finding: _report_pb2.Finding
    report: _report_pb2.Report
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., finding: _Optional[_Union[_report_pb2.Finding, _Mapping]] = ..., report: _Optional[_Union[_report_pb2.Report, _Mapping]] = ...) -> None: ...

class LintStart(_message.Message):
    __slots__ = ("model", "options", "path_label")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PATH_LABEL_FIELD_NUMBER: _ClassVar[int]
    model: UploadMetadata
    options: DiagnoseOptions
    path_label: str
    def __init__(self, model: _Optional[_Union[UploadMetadata, _Mapping]] = ..., options: _Optional[_Union[DiagnoseOptions, _Mapping]] = ..., path_label: _Optional[str] = ...) -> None: ...

class LintRequest(_message.Message):
    __slots__ = ("start", "chunk")
    START_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    start: LintStart
    chunk: bytes
    def __init__(self, start: _Optional[_Union[LintStart, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class SendModel(_message.Message):
    __slots__ = ("chunk_bytes",)
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    chunk_bytes: int
    def __init__(self, chunk_bytes: _Optional[int] = ...) -> None: ...

class Accepted(_message.Message):
    __slots__ = ("replica", "cached")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    replica: str
    cached: bool
    def __init__(self, replica: _Optional[str] = ..., cached: _Optional[bool] = ...) -> None: ...

class LintEvent(_message.Message):
    __slots__ = ("send_model", "accepted", "progress", "finding", "report")
    SEND_MODEL_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    FINDING_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    send_model: SendModel
    accepted: Accepted
    progress: Progress
    finding: _report_pb2.Finding
    report: _report_pb2.Report
    def __init__(self, send_model: _Optional[_Union[SendModel, _Mapping]] = ..., accepted: _Optional[_Union[Accepted, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., finding: _Optional[_Union[_report_pb2.Finding, _Mapping]] = ..., report: _Optional[_Union[_report_pb2.Report, _Mapping]] = ...) -> None: ...

class ListRulesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RuleDoc(_message.Message):
    __slots__ = ("name", "severity", "summary", "why", "example", "fix", "thresholds", "defaults")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_FIELD_NUMBER: _ClassVar[int]
    FIX_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    severity: _report_pb2.Severity
    summary: str
    why: str
    example: str
    fix: str
    thresholds: str
    defaults: _containers.RepeatedCompositeFieldContainer[ThresholdDefault]
    def __init__(self, name: _Optional[str] = ..., severity: _Optional[_Union[_report_pb2.Severity, str]] = ..., summary: _Optional[str] = ..., why: _Optional[str] = ..., example: _Optional[str] = ..., fix: _Optional[str] = ..., thresholds: _Optional[str] = ..., defaults: _Optional[_Iterable[_Union[ThresholdDefault, _Mapping]]] = ...) -> None: ...

class ThresholdDefault(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class ListRulesResponse(_message.Message):
    __slots__ = ("rules",)
    RULES_FIELD_NUMBER: _ClassVar[int]
    rules: _containers.RepeatedCompositeFieldContainer[RuleDoc]
    def __init__(self, rules: _Optional[_Iterable[_Union[RuleDoc, _Mapping]]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Device(_message.Message):
    __slots__ = ("name", "description", "memory_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    memory_bytes: int
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_model_bytes", "workers", "max_queue", "timeout_s", "chunk_bytes", "max_message_bytes")
    MAX_MODEL_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_model_bytes: int
    workers: int
    max_queue: int
    timeout_s: float
    chunk_bytes: int
    max_message_bytes: int
    def __init__(self, max_model_bytes: _Optional[int] = ..., workers: _Optional[int] = ..., max_queue: _Optional[int] = ..., timeout_s: _Optional[float] = ..., chunk_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "devices", "default_device", "limits", "auth_required")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_DEVICE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    AUTH_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    version: str
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    default_device: str
    limits: Limits
    auth_required: bool
    def __init__(self, version: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., default_device: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., auth_required: _Optional[bool] = ...) -> None: ...
