"""Does an activation read a tensor that a select filled with -inf? Both loaders ask it of
every sigmoid.

Llama 4's MoE router keeps the top-k logits per token and writes -inf for every other expert
(`full_like(logits, -inf).scatter_(1, top_idx, top_val)`), then takes the sigmoid: the
unselected experts score exactly 0. Those entries sit on the sigmoid's flat tail because a
mask put them there, not because a layer's scale drove them there; the same goes for a
`masked_fill(mask, -inf)` or a `where(mask, x, -inf)` in front of a sigmoid.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from gradprobe.diagnostics.loaders.pooled_inputs import ONNX_VIEWS
from gradprobe.diagnostics.loaders.torchscript_passes import Node, Value

if TYPE_CHECKING:  # onnx_points asks this module; importing it here would be a cycle
    from gradprobe.diagnostics.loaders.onnx_points import GraphView

_STEPS = 16
# How the filled tensor may reach the activation: views and casts of it.
_TS_VIEWS = frozenset(
    "aten::" + name
    for name in ("view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose",
                 "contiguous", "to", "clone", "float", "type_as")
)
# op -> (the slot of the tensor written into, the slots of a value it writes)
_ONNX_WRITES = {"ScatterElements": (0, ()), "ScatterND": (0, ()), "Where": (None, (1, 2))}
_TS_WRITES = {"aten::scatter": (0, ()), "aten::scatter_": (0, ()), "aten::index_put": (0, ()),
              "aten::index_put_": (0, ()), "aten::masked_fill": (None, (2,)),
              "aten::masked_fill_": (None, (2,)), "aten::where": (None, (1, 2))}
_TS_FILLS = {"aten::full_like": 1, "aten::full": 1, "aten::new_full": 2}


def _minus_infinity(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() >= 1 and bool(torch.all(value == -math.inf))
    return isinstance(value, float) and value == -math.inf


def onnx_reads_minus_infinity_fill(view: GraphView, value: str) -> bool:
    """`value` is, through views, a scatter into a -inf tensor or a select with a -inf branch."""
    node = view.producer_through(value, ONNX_VIEWS, _STEPS)
    if node is None or node.op_type not in _ONNX_WRITES:
        return False
    base, fills = _ONNX_WRITES[node.op_type]
    candidates = [node.inputs[base]] if base is not None else \
        [node.inputs[i] for i in fills if i < len(node.inputs)]
    return any(_onnx_minus_infinity(view, c) for c in candidates)


def _onnx_minus_infinity(view: GraphView, value: str) -> bool:
    """A constant -inf, or a tensor of -inf built from one (ConstantOfShape, Expand). A dynamo
    file stores `full_like(x, -inf)` as an initializer, which the loader reads as a parameter."""
    for _ in range(_STEPS):
        static = view.constants.get(value, view.params.get(value))
        if static is not None:
            return _minus_infinity(static)
        producer = view.producer.get(value)
        if producer is None:
            return False
        node = view.nodes[producer]
        if node.op_type == "ConstantOfShape":
            return _minus_infinity(node.attrs.get("value"))
        if node.op_type not in (*ONNX_VIEWS, "Expand") or not node.inputs:
            return False
        value = node.inputs[0]
    return False


def torchscript_reads_minus_infinity_fill(node: Node) -> bool:
    """The activation's input is, through views, a scatter into a -inf tensor or a select
    (masked_fill, where) that writes -inf."""
    if node.inputsSize() == 0:
        return False
    value: Value = node.inputsAt(0)
    for _ in range(_STEPS):
        producer = value.node()
        kind = producer.kind()
        if kind in _TS_WRITES:
            base, fills = _TS_WRITES[kind]
            if base is not None:
                return _ts_minus_infinity_tensor(producer.inputsAt(base))
            return any(i < producer.inputsSize() and (
                _minus_infinity(producer.inputsAt(i).toIValue())
                or _ts_minus_infinity_tensor(producer.inputsAt(i))) for i in fills)
        if kind not in _TS_VIEWS or producer.inputsSize() == 0:
            return False
        value = producer.inputsAt(0)
    return False


def _ts_minus_infinity_tensor(value: Value) -> bool:
    producer = value.node()
    slot = _TS_FILLS.get(producer.kind())
    return slot is not None and slot < producer.inputsSize() and _minus_infinity(
        producer.inputsAt(slot).toIValue())
