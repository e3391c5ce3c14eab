"""Options of one diagnosis: the boundary model shared by the CLI, the library and the server."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

from gradprobe.diagnostics.errors import InputSpecError
from gradprobe.diagnostics.report import Severity

DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")
# A dimension of an input shape: at least 1, and small enough that torch can index it.
Dim = Annotated[int, Field(ge=1, le=2**40)]


def parse_shape(text: str) -> list[int]:
    """'8x3x224x224' -> [8, 3, 224, 224]; also accepts commas."""
    parts = text.replace(",", "x").replace("X", "x").split("x")
    try:
        dims = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise InputSpecError(f"bad shape {text!r}: write dimensions as AxBxC, e.g. 8x3x224x224") from None
    if not dims or any(d <= 0 for d in dims):
        raise InputSpecError(f"bad shape {text!r}: every dimension must be a positive integer")
    return dims


class DiagnoseOptions(BaseModel):
    """How to probe one model: what to feed it, where to run it, which rules to apply.

    Every field has a default, so `DiagnoseOptions()` probes a file that declares its input
    shapes with a synthetic batch of 8 on the best device. The same model backs the CLI's
    flags, the configuration file and the gRPC request.

    - `input_shapes`: one shape per model input, in order (required for TorchScript files,
      which declare none); `input_dtypes`: one dtype for every input, or one per input.
    - `input_file`: real data instead of the synthetic batch (.npy, .npz, .pt).
    - `batch_size`: fills a free leading batch dimension.
    - `device` ("cpu", "cuda", "auto"), `seed` (of the synthetic batch and the cotangent).
    - `select` / `ignore`: rule names; `severities` / `thresholds`: per-rule overrides.
    - `format`: read the file as "onnx" or "torchscript" instead of detecting it.
    """

    model_config = ConfigDict(extra="forbid")

    # One shape per model input, in order; overrides or supplies what the file declares.
    input_shapes: list[list[Dim]] | None = None
    # True when shapes, dtypes and batch size were given for many files at once (a folder):
    # they only fill what a file leaves open; a file that declares its own keeps them.
    fill_undeclared: bool = False
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
