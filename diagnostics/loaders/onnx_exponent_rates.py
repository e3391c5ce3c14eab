"""Which initializers of an ONNX graph are rates inside an exponential: `exp(rate * x)`.

Doge's dynamic mask is `exp(A * softplus(dt_proj(v)))` with `A` a parameter that starts at
zero, so `dt_proj` gets no gradient until `A` has taken its first step (the TorchScript file,
which keeps parameters apart from buffers, steps it and is clean). An ONNX file stores a
parameter as it stores a buffer, and a zero buffer multiplying a layer's output (`fc3(x) *
mask`) must stay an error: that path is dead for good. A multiplicative mask zeroes what it
multiplies; inside an exponential a zero factor gives exp(0) = 1 and zeroes nothing, so a
factor whose every product goes into an exponential is a rate (Doge's `A`, the decay of a state
space model), trained from zero like a gate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradprobe.diagnostics.loaders.onnx_points import GraphView

_STEPS = 8
# Between the product and the exponential: views, casts and the sign (Mamba's `-exp(A_log)`).
_PASS_THROUGH = frozenset({"Cast", "Identity", "Reshape", "Expand", "Unsqueeze", "Squeeze",
                           "Transpose", "Neg"})


def onnx_exponent_rates(view: GraphView) -> frozenset[str]:
    """The initializers every reader of which is a Mul whose product reaches only Exp nodes,
    through views, casts and negation."""
    found = set()
    for name in view.params:
        readers = view.consumers.get(name, [])
        if readers and all(_is_rate(view, index) for index, _ in readers):
            found.add(name)
    return frozenset(found)


def _is_rate(view: GraphView, index: int) -> bool:
    node = view.nodes[index]
    if node.op_type != "Mul" or len(node.inputs) != 2 or not node.outputs:
        return False
    return _only_exponentiated(view, node.outputs[0])


def _only_exponentiated(view: GraphView, value: str) -> bool:
    """Every path down from `value`, within _STEPS nodes of the pass-through ops, ends at an
    Exp (and there is at least one)."""
    todo, seen, reached = [value], set(), False
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if len(seen) > _STEPS:
            return False
        readers = view.consumers.get(current, [])
        if not readers:  # a graph output: read as it is, not exponentiated
            return False
        for index, slot in readers:
            node = view.nodes[index]
            if node.op_type == "Exp":
                reached = True
            elif node.op_type in _PASS_THROUGH and slot == 0:
                todo.extend(v for v in node.outputs if v)
            else:
                return False
    return reached
