"""Does a layer read a global pool? Both loaders ask it of every parameterised layer.

A layer behind a global pool sees one value per channel per sample: a squeeze-excite
projection, the classifier head, or ECA's Conv1d, which slides its kernel across the pooled
channels (timm's `EcaModule`: `x.mean((2, 3)).view(B, 1, -1)` -> Conv1d -> sigmoid). Counting
positions per unit recognises the first two; ECA's Conv1d turns the channels into positions,
so only the data flow shows that it reads a pooled value.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from gradprobe.diagnostics.loaders.torchscript_passes import Node, Value, argument_index

if TYPE_CHECKING:  # onnx_points asks this module; importing it here would be a cycle
    from gradprobe.diagnostics.loaders.onnx_points import GraphNode, GraphView

# How a pooled value may reach the layer: views of it, not computations on it.
ONNX_VIEWS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Identity", "Cast"}
_ONNX_GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
_ONNX_REDUCTIONS = {"ReduceMean", "ReduceMax"}
_TS_VIEWS = frozenset(
    "aten::" + name
    for name in ("view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose",
                 "contiguous", "to", "clone")
)
_TS_REDUCTIONS = frozenset({"aten::mean", "aten::amax"})
_TS_ADAPTIVE_POOLS = frozenset(
    "aten::" + name
    for name in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
                 "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d")
)
# op -> the argument that carries the signal (the other operand is the weight)
_TS_DATA_ARGUMENT = {"aten::matmul": "self", "aten::mm": "self", "aten::addmm": "mat1"}
_STEPS = 16


def pools_globally(rank: int | None, axes: Iterable[int]) -> bool:
    """A reduction over `axes` of a rank-`rank` value leaves one value per channel per sample:
    it keeps the batch axis and exactly one other (NCHW over (2, 3); tokens over axis 1).
    A saved TorchScript graph keeps no ranks; there, only a reduction over two or more axes
    behind the channel axis counts (NCHW over (2, 3)): a mean over axis 1 alone may be a
    mean over tokens, or over channels (CBAM's spatial attention), which pools nothing."""
    axes = list(axes)
    if rank is None:
        return len(axes) >= 2 and all(a >= 2 or a < 0 for a in axes)
    if rank < 3:
        return False
    kept = set(range(rank)) - {a % rank for a in axes}
    return 0 in kept and len(kept) == 2


def onnx_reads_global_pool(view: GraphView, node_inputs: list[str]) -> bool:
    """The layer's data input (its first non-parameter input) is a global pool, viewed."""
    value = next((v for v in node_inputs if v and v not in view.params), None)
    if value is None:
        return False
    node = view.producer_through(value, ONNX_VIEWS, _STEPS)
    if node is None:
        return False
    if node.op_type in _ONNX_GLOBAL_POOLS:
        return True
    return node.op_type in _ONNX_REDUCTIONS and pools_globally(view.ranks.get(node.inputs[0]),
                                                               _onnx_axes(view, node))


def _onnx_axes(view: GraphView, node: GraphNode) -> list[int]:
    """Axes of a Reduce node: an attribute up to opset 17, a constant input from opset 18."""
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    if len(node.inputs) > 1 and node.inputs[1] in view.constants:
        return [int(a) for a in view.constants[node.inputs[1]].flatten().tolist()]
    return []  # no axes: the reduction is over everything, batch included


def torchscript_reads_global_pool(node: Node) -> bool:
    """The layer's data input is a global pool (mean, amax, adaptive pool to size 1), viewed."""
    index = argument_index(node, _TS_DATA_ARGUMENT.get(node.kind(), "input"))
    if index is None or index >= node.inputsSize():
        return False
    value: Value = node.inputsAt(index)
    for _ in range(_STEPS):
        producer = value.node()
        kind = producer.kind()
        if kind in _TS_ADAPTIVE_POOLS:
            size = producer.inputsAt(1).toIValue()
            return size is not None and all(s == 1 for s in _as_list(size))
        if kind in _TS_REDUCTIONS:
            dims = producer.inputsAt(1).toIValue()
            return dims is not None and pools_globally(_rank(producer.inputsAt(0)),
                                                       _as_list(dims))
        if kind not in _TS_VIEWS or producer.inputsSize() == 0:
            return False
        value = producer.inputsAt(0)
    return False


def _as_list(value: object) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]  # type: ignore[call-overload]


def _rank(value: Value) -> int | None:
    kind = value.type()
    return kind.dim() if isinstance(kind, torch._C.TensorType) else None
