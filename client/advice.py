"""A domain error as the command line words it: the engine's hint (a `DiagnoseOptions` field)
becomes the flag that sets it."""

from __future__ import annotations

from typing import Any

from gradprobe.diagnostics.errors import GradprobeError, Hint


def _shape(shape: Any) -> str:
    return "x".join(str(d) for d in shape)


def _flags(hint: Hint) -> str:
    example = hint.example
    if hint.option == "input_shapes":
        if example is None:
            return "pass --input-shape once per input, in order (e.g. --input-shape 8x3x224x224)"
        return "pass --input-shape once per input, e.g. " + " ".join(
            f"--input-shape {_shape(s)}" for s in example)
    if hint.option == "input_dtypes":
        if example is None:
            return "pass --input-dtype once per input, in order"
        return "pass " + " ".join(f"--input-dtype {d}" for d in example)
    if hint.option == "batch_size":
        return "pass --batch-size" + (f" {example}" if example is not None else "")
    if hint.option == "input_file":
        return "pass --input FILE (.npy, .npz, .pt)"
    if hint.option == "device":
        return f"pass --device {example or 'cpu'}"
    flag = "--" + hint.option.replace("_", "-")
    return f"pass {flag}" + (f" {example}" if example is not None else "")


def cli_message(exc: GradprobeError) -> str:
    """One line for stderr: the problem, then the flag that fixes it."""
    hint = getattr(exc, "hint", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if hint is None:
        return str(exc)
    return f"{problem}: {_flags(hint)}"
