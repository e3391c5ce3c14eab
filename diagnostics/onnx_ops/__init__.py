"""ONNX operators as torch functions. Importing the package registers every family."""

from gradprobe.diagnostics.onnx_ops import (  # noqa: F401
    activations,
    control,
    elementwise,
    nn,
    norm,
    random,
    reduce,
    resize,
    rnn,
    spectral,
    tensor,
)
from gradprobe.diagnostics.onnx_ops.registry import (  # noqa: F401
    OpContext,
    lookup,
    register,
    supported_operators,
)
