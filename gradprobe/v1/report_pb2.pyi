from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEVERITY_UNSPECIFIED: _ClassVar[Severity]
    SEVERITY_INFO: _ClassVar[Severity]
    SEVERITY_WARNING: _ClassVar[Severity]
    SEVERITY_ERROR: _ClassVar[Severity]

class ModelFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_FORMAT_UNSPECIFIED: _ClassVar[ModelFormat]
    MODEL_FORMAT_ONNX: _ClassVar[ModelFormat]
    MODEL_FORMAT_TORCHSCRIPT: _ClassVar[ModelFormat]
    MODEL_FORMAT_PT2: _ClassVar[ModelFormat]
    MODEL_FORMAT_PYTORCH: _ClassVar[ModelFormat]
SEVERITY_UNSPECIFIED: Severity
SEVERITY_INFO: Severity
SEVERITY_WARNING: Severity
SEVERITY_ERROR: Severity
MODEL_FORMAT_UNSPECIFIED: ModelFormat
MODEL_FORMAT_ONNX: ModelFormat
MODEL_FORMAT_TORCHSCRIPT: ModelFormat
MODEL_FORMAT_PT2: ModelFormat
MODEL_FORMAT_PYTORCH: ModelFormat

class DoubleList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class IntList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[int]] = ...) -> None: ...

class StringList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class EvidenceValue(_message.Message):
    __slots__ = ("number", "integer", "text", "flag", "numbers", "integers", "texts")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    INTEGER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    NUMBERS_FIELD_NUMBER: _ClassVar[int]
    INTEGERS_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    number: float
    integer: int
    text: str
    flag: bool
    numbers: DoubleList
    integers: IntList
    texts: StringList
    def __init__(self, number: _Optional[float] = ..., integer: _Optional[int] = ..., text: _Optional[str] = ..., flag: _Optional[bool] = ..., numbers: _Optional[_Union[DoubleList, _Mapping]] = ..., integers: _Optional[_Union[IntList, _Mapping]] = ..., texts: _Optional[_Union[StringList, _Mapping]] = ...) -> None: ...

class EvidenceEntry(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: EvidenceValue
    def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[EvidenceValue, _Mapping]] = ...) -> None: ...

class Fix(_message.Message):
    __slots__ = ("init", "gain", "std", "bound", "fan_in", "fan_out", "bias", "code", "advice")
    INIT_FIELD_NUMBER: _ClassVar[int]
    GAIN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    BOUND_FIELD_NUMBER: _ClassVar[int]
    FAN_IN_FIELD_NUMBER: _ClassVar[int]
    FAN_OUT_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ADVICE_FIELD_NUMBER: _ClassVar[int]
    init: str
    gain: float
    std: float
    bound: float
    fan_in: int
    fan_out: int
    bias: str
    code: str
    advice: str
    def __init__(self, init: _Optional[str] = ..., gain: _Optional[float] = ..., std: _Optional[float] = ..., bound: _Optional[float] = ..., fan_in: _Optional[int] = ..., fan_out: _Optional[int] = ..., bias: _Optional[str] = ..., code: _Optional[str] = ..., advice: _Optional[str] = ...) -> None: ...

class Finding(_message.Message):
    __slots__ = ("rule", "severity", "layer", "nodes", "parameters", "message", "evidence", "fix")
    RULE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    FIX_FIELD_NUMBER: _ClassVar[int]
    rule: str
    severity: Severity
    layer: str
    nodes: _containers.RepeatedScalarFieldContainer[str]
    parameters: _containers.RepeatedScalarFieldContainer[str]
    message: str
    evidence: _containers.RepeatedCompositeFieldContainer[EvidenceEntry]
    fix: Fix
    def __init__(self, rule: _Optional[str] = ..., severity: _Optional[_Union[Severity, str]] = ..., layer: _Optional[str] = ..., nodes: _Optional[_Iterable[str]] = ..., parameters: _Optional[_Iterable[str]] = ..., message: _Optional[str] = ..., evidence: _Optional[_Iterable[_Union[EvidenceEntry, _Mapping]]] = ..., fix: _Optional[_Union[Fix, _Mapping]] = ...) -> None: ...

class ActivationStats(_message.Message):
    __slots__ = ("mean", "var", "min", "max", "zero_fraction", "dead_units", "saturation", "nonfinite", "units", "numel", "sample_var")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    VAR_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    ZERO_FRACTION_FIELD_NUMBER: _ClassVar[int]
    DEAD_UNITS_FIELD_NUMBER: _ClassVar[int]
    SATURATION_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_VAR_FIELD_NUMBER: _ClassVar[int]
    mean: float
    var: float
    min: float
    max: float
    zero_fraction: float
    dead_units: float
    saturation: float
    nonfinite: int
    units: int
    numel: int
    sample_var: float
    def __init__(self, mean: _Optional[float] = ..., var: _Optional[float] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., zero_fraction: _Optional[float] = ..., dead_units: _Optional[float] = ..., saturation: _Optional[float] = ..., nonfinite: _Optional[int] = ..., units: _Optional[int] = ..., numel: _Optional[int] = ..., sample_var: _Optional[float] = ...) -> None: ...

class GradientStats(_message.Message):
    __slots__ = ("norm", "rms", "nonfinite")
    NORM_FIELD_NUMBER: _ClassVar[int]
    RMS_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_FIELD_NUMBER: _ClassVar[int]
    norm: float
    rms: float
    nonfinite: int
    def __init__(self, norm: _Optional[float] = ..., rms: _Optional[float] = ..., nonfinite: _Optional[int] = ...) -> None: ...

class ParameterStats(_message.Message):
    __slots__ = ("name", "layer", "shape", "mean", "std", "abs_max", "nonfinite", "grad_norm", "grad_rms", "grad_to_weight", "zero_grad_fraction", "nonfinite_grad", "constant")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    ABS_MAX_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    GRAD_RMS_FIELD_NUMBER: _ClassVar[int]
    GRAD_TO_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ZERO_GRAD_FRACTION_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_GRAD_FIELD_NUMBER: _ClassVar[int]
    CONSTANT_FIELD_NUMBER: _ClassVar[int]
    name: str
    layer: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    mean: float
    std: float
    abs_max: float
    nonfinite: int
    grad_norm: float
    grad_rms: float
    grad_to_weight: float
    zero_grad_fraction: float
    nonfinite_grad: int
    constant: bool
    def __init__(self, name: _Optional[str] = ..., layer: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ..., abs_max: _Optional[float] = ..., nonfinite: _Optional[int] = ..., grad_norm: _Optional[float] = ..., grad_rms: _Optional[float] = ..., grad_to_weight: _Optional[float] = ..., zero_grad_fraction: _Optional[float] = ..., nonfinite_grad: _Optional[int] = ..., constant: _Optional[bool] = ...) -> None: ...

class LayerReport(_message.Message):
    __slots__ = ("name", "op", "node", "role", "nonlinearity", "parameters", "activation", "gradient")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NONLINEARITY_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    op: str
    node: str
    role: str
    nonlinearity: str
    parameters: _containers.RepeatedScalarFieldContainer[str]
    activation: ActivationStats
    gradient: GradientStats
    def __init__(self, name: _Optional[str] = ..., op: _Optional[str] = ..., node: _Optional[str] = ..., role: _Optional[str] = ..., nonlinearity: _Optional[str] = ..., parameters: _Optional[_Iterable[str]] = ..., activation: _Optional[_Union[ActivationStats, _Mapping]] = ..., gradient: _Optional[_Union[GradientStats, _Mapping]] = ...) -> None: ...

class InputInfo(_message.Message):
    __slots__ = ("name", "shape", "dtype", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    source: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("path", "format", "sha256", "size_bytes", "inputs", "notes", "shared_parameters")
    PATH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    path: str
    format: ModelFormat
    sha256: str
    size_bytes: int
    inputs: _containers.RepeatedCompositeFieldContainer[InputInfo]
    notes: _containers.RepeatedScalarFieldContainer[str]
    shared_parameters: _containers.RepeatedCompositeFieldContainer[SharedParameter]
    def __init__(self, path: _Optional[str] = ..., format: _Optional[_Union[ModelFormat, str]] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[InputInfo, _Mapping]]] = ..., notes: _Optional[_Iterable[str]] = ..., shared_parameters: _Optional[_Iterable[_Union[SharedParameter, _Mapping]]] = ...) -> None: ...

class SharedParameter(_message.Message):
    __slots__ = ("name", "aliases")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    name: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("load_s", "probe_s", "rules_s", "total_s")
    LOAD_S_FIELD_NUMBER: _ClassVar[int]
    PROBE_S_FIELD_NUMBER: _ClassVar[int]
    RULES_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    load_s: float
    probe_s: float
    rules_s: float
    total_s: float
    def __init__(self, load_s: _Optional[float] = ..., probe_s: _Optional[float] = ..., rules_s: _Optional[float] = ..., total_s: _Optional[float] = ...) -> None: ...

class Summary(_message.Message):
    __slots__ = ("error", "warning", "info")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    error: int
    warning: int
    info: int
    def __init__(self, error: _Optional[int] = ..., warning: _Optional[int] = ..., info: _Optional[int] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("schema", "version", "model", "device", "seed", "findings", "layers", "parameters", "timing", "summary")
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    schema: str
    version: str
    model: ModelInfo
    device: str
    seed: int
    findings: _containers.RepeatedCompositeFieldContainer[Finding]
    layers: _containers.RepeatedCompositeFieldContainer[LayerReport]
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterStats]
    timing: Timing
    summary: Summary
    def __init__(self, schema: _Optional[str] = ..., version: _Optional[str] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., device: _Optional[str] = ..., seed: _Optional[int] = ..., findings: _Optional[_Iterable[_Union[Finding, _Mapping]]] = ..., layers: _Optional[_Iterable[_Union[LayerReport, _Mapping]]] = ..., parameters: _Optional[_Iterable[_Union[ParameterStats, _Mapping]]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., summary: _Optional[_Union[Summary, _Mapping]] = ...) -> None: ...
