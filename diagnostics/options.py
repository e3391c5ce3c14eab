"""Options of one diagnosis: the boundary model shared by the CLI, the library and the server."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

from gradprobe.diagnostics.report import Severity

DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")
# A dimension of an input shape: at least 1, and small enough that torch can index it.
Dim = Annotated[int, Field(ge=1, le=2**40)]


class DiagnoseOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # One shape per model input, in order; overrides or supplies what the file declares.
    input_shapes: list[list[Dim]] | None = None
    # One dtype for every input, or one per input in order.
    input_dtypes: list[Literal[DTYPES]] | None = None  # type: ignore[valid-type]
    # Real data instead of the synthetic batch (.npy, .npz, .pt).
    input_file: str | None = None
    # Fills a symbolic/unknown leading batch dimension.
    batch_size: int = Field(8, ge=1, le=4096)
    device: Literal["cpu", "cuda", "auto"] = "auto"
    seed: int = 0
    # Rule selection and tuning (configuration file or flags).
    select: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)
    severities: dict[str, Severity] = Field(default_factory=dict)
    thresholds: dict[str, dict[str, FiniteFloat]] = Field(default_factory=dict)  # no NaN/inf
    # How the file should be read; None: from the file's content.
    format: Literal["onnx", "torchscript", "pt2"] | None = None
