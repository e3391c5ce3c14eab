"""Node attributes decoded to plain Python values (and torch tensors for TENSOR attributes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from gradprobe.diagnostics.errors import UnsupportedOperator
from gradprobe.diagnostics.onnx_ops.tensors import tensor_from_proto

_A = onnx.AttributeProto


def decode_attributes(node: onnx.NodeProto, base_dir: Path | None = None) -> dict[str, Any]:
    """Map attribute name -> value: int, float, str, lists of those, torch tensors.

    An If's branches become `control.Subgraph`s; other subgraph attributes (Loop/Scan bodies)
    are outside what the interpreter runs, so they raise UnsupportedOperator naming the node's
    operator.
    """
    node_name = node.name or (node.output[0] if node.output else node.op_type)
    decoded: dict[str, Any] = {}
    for attr in node.attribute:
        kind = attr.type
        if kind == _A.INT:
            value: Any = int(attr.i)
        elif kind == _A.FLOAT:
            value = float(attr.f)
        elif kind == _A.STRING:
            value = attr.s.decode("utf-8", errors="replace")
        elif kind == _A.INTS:
            value = [int(v) for v in attr.ints]
        elif kind == _A.FLOATS:
            value = [float(v) for v in attr.floats]
        elif kind == _A.STRINGS:
            value = [s.decode("utf-8", errors="replace") for s in attr.strings]
        elif kind == _A.TENSOR:
            value = tensor_from_proto(attr.t, base_dir)
        elif kind == _A.TENSORS:
            value = [tensor_from_proto(t, base_dir) for t in attr.tensors]
        elif kind == _A.GRAPH and node.op_type == "If":
            from gradprobe.diagnostics.onnx_ops.control import Subgraph

            value = Subgraph(attr.g, base_dir)
        elif kind in (_A.GRAPH, _A.GRAPHS):
            raise UnsupportedOperator(node.op_type, node_name,
                                      f"attribute '{attr.name}' holds a subgraph")
        else:
            kind_name = _A.AttributeType.Name(kind) if kind in _A.AttributeType.values() else kind
            raise UnsupportedOperator(node.op_type, node_name,
                                      f"attribute '{attr.name}' of kind {kind_name}")
        decoded[attr.name] = value
    return decoded
