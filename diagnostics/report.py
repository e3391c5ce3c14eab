"""The report contract (`gradprobe.report/v1`): one schema behind the CLI, the library and the
server. Field names here are what CI configs and dashboards read; change them only with a new
schema version."""

from __future__ import annotations

import hashlib
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA = "gradprobe.report/v1"

EvidenceValue = float | int | str | bool | list[float] | list[int] | list[str] | None


class _Model(BaseModel):
    # Probes of broken networks measure NaN and Inf; JSON has no literal for them, so they
    # travel as the strings "NaN"/"Infinity", which pydantic reads back as floats.
    model_config = ConfigDict(ser_json_inf_nan="strings")


class Severity(str, Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return {"info": 0, "warning": 1, "error": 2}[self.value]


InitScheme = Literal[
    "he_normal", "he_uniform", "xavier_normal", "xavier_uniform", "lecun_normal", "orthogonal",
    "normal",  # normal(0, std) with the std given: a layer re-initialised like its peers
]


class Fix(_Model):
    """The concrete repair. For weight findings `init` names the scheme with its numbers."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")

    init: InitScheme | None = None
    gain: float | None = None
    std: float | None = None
    bound: float | None = None
    fan_in: int | None = None
    fan_out: int | None = None
    bias: Literal["zeros"] | None = None  # reset the layer's bias as part of the fix
    code: str = ""
    advice: str = ""  # non-init remedies: LeakyReLU, normalisation, clipping, ...


class Finding(_Model):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")

    rule: str
    severity: Severity
    layer: str
    nodes: list[str] = Field(default_factory=list)
    parameters: list[str] = Field(default_factory=list)
    message: str
    evidence: dict[str, EvidenceValue] = Field(default_factory=dict)
    fix: Fix | None = None

    @property
    def fingerprint(self) -> str:
        """Stable identity across runs: rule + layer + parameters, not numbers or wording."""
        key = "\x1f".join([self.rule, self.layer, *sorted(self.parameters)])
        return hashlib.sha256(key.encode()).hexdigest()[:16]


class ActivationStats(_Model):
    """Statistics of one probe point's forward value over the probe batch."""

    mean: float
    var: float
    min: float
    max: float
    zero_fraction: float  # share of all entries that are exactly 0
    dead_units: float  # ReLU outputs: share of units (channels/features) 0 for every sample; else 0
    saturation: float  # share of entries on the flat tails (sigmoid/tanh only, else 0)
    nonfinite: int
    units: int
    numel: int
    # Mean over units of the variance across the batch: 0 when the value no longer depends on
    # the input (its signal was lost upstream).
    sample_var: float


class GradientStats(_Model):
    """Statistics of the gradient arriving at one probe point's value in the backward pass."""

    norm: float
    rms: float
    nonfinite: int


class ParameterStats(_Model):
    name: str
    layer: str
    shape: list[int]
    mean: float
    std: float
    abs_max: float
    nonfinite: int
    grad_norm: float
    grad_rms: float
    grad_to_weight: float  # |g| / |w|, inf when |w| = 0 and |g| > 0
    zero_grad_fraction: float
    nonfinite_grad: int
    constant: bool  # every entry exactly equal (a float std of a constant is not exactly 0)


class LayerReport(_Model):
    name: str
    op: str
    node: str
    role: str
    nonlinearity: str | None = None
    parameters: list[str] = Field(default_factory=list)
    activation: ActivationStats | None = None
    gradient: GradientStats | None = None


class InputInfo(_Model):
    name: str
    shape: list[int]
    dtype: str
    # "example": the caller's own tensors given to diagnose(model, example_inputs)
    source: Literal["declared", "flag", "default", "file", "example"]


class ModelInfo(_Model):
    path: str | None
    # "pytorch": a live nn.Module/ScriptModule (sha256 of its structure, not a file);
    # "pt2": a torch.export ExportedProgram or its .pt2 archive
    format: Literal["onnx", "torchscript", "pt2", "pytorch"]
    sha256: str
    size_bytes: int
    inputs: list[InputInfo]
    notes: list[str] = Field(default_factory=list)
    shared_parameters: dict[str, list[str]] = Field(default_factory=dict)


class Timing(_Model):
    load_s: float
    probe_s: float
    rules_s: float
    total_s: float


class Summary(_Model):
    error: int = 0
    warning: int = 0
    info: int = 0


class Report(_Model):
    schema_: str = Field(SCHEMA, alias="schema")
    version: str
    model: ModelInfo
    device: str
    seed: int
    findings: list[Finding]
    layers: list[LayerReport]
    parameters: list[ParameterStats]
    timing: Timing
    summary: Summary

    model_config = ConfigDict(populate_by_name=True, ser_json_inf_nan="strings")

    def to_json(self, indent: int | None = 2) -> str:
        return self.model_dump_json(by_alias=True, indent=indent)

    def to_html(self, *, before: Report | None = None) -> str:
        """A self-contained HTML page (no network) with the layer plots and the findings, as
        `gradprobe lint --html` writes it; `before`: a report of the same model before a fix,
        drawn under this one."""
        # The page is an output format of the client package; the engine never needs it, so
        # it is imported here, on demand, and only this method reaches for it.
        from gradprobe.client.formats.html import render_html

        return render_html([self], before=[before] if before is not None else None)

    def worst(self) -> Severity | None:
        return max((f.severity for f in self.findings), key=lambda s: s.rank, default=None)

    def fails(self, fail_on: Severity | Literal["never"]) -> bool:
        if fail_on == "never":
            return False
        return any(f.severity.rank >= Severity(fail_on).rank for f in self.findings)
