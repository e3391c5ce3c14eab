"""ONNX operators as torch functions. Importing the package registers every family."""

from gradprobe.diagnostics.onnx_ops import activations, elementwise, nn, norm, reduce, tensor  # noqa: F401
from gradprobe.diagnostics.onnx_ops.registry import (  # noqa: F401
    OpContext,
    lookup,
    register,
    supported_operators,
)
