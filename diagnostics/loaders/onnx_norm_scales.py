"""Which initializers of an ONNX graph scale a normalised value: the gain of a normalisation
the exporter wrote out as arithmetic.

timm's EvoNorm-S0a is `x * sigmoid(v * x) / group_std(x) * weight + bias`; neither exporter has
an operator for it, so the file holds a Div by a Sqrt-derived standard deviation and then a Mul
by `weight`, an initializer like any other. Its residual blocks start that gain at zero, a
deliberate zero start like a zero BatchNorm scale: it gets a gradient and moves at the first
step. A zero mask buffer (`fc3(x) * mask`) looks the same in a file, but it multiplies a
layer's output, not a value divided by its own spread; only the second kind is a gain.
"""

from __future__ import annotations

from collections.abc import Callable

from gradprobe.diagnostics.loaders.onnx_points import NORMS, GraphNode, GraphView

_STEPS = 8
# op -> the slots that carry the data (a Reshape's second input is shape arithmetic).
# Between the normalisation and its gain: EvoNorm's `x * sigmoid(v * x)` before the division,
# views and casts after it.
_ELEMENTWISE = {"Mul": (0, 1), "Div": (0, 1), "Sigmoid": (0,), "Cast": (0,), "Identity": (0,),
                "Reshape": (0,), "Expand": (0,)}
# Between the spread and the division: views and broadcasts of `sqrt(var + eps)`.
_SPREAD_VIEWS = {"Cast": (0,), "Identity": (0,), "Reshape": (0,), "Expand": (0,),
                 "Unsqueeze": (0,), "Where": (1, 2)}


def onnx_normalised_scales(view: GraphView) -> frozenset[str]:
    """The initializers every reader of which is a Mul whose other operand is a normalised
    value: a value divided by a standard deviation (or times its reciprocal) computed in the
    graph, or a normalisation operator's output."""
    found = set()
    for name in view.params:
        readers = view.consumers.get(name, [])
        if readers and all(_scales_normalised(view, index, slot) for index, slot in readers):
            found.add(name)
    return frozenset(found)


def _scales_normalised(view: GraphView, index: int, slot: int) -> bool:
    node = view.nodes[index]
    if node.op_type != "Mul" or len(node.inputs) != 2:
        return False
    return _normalised(view, node.inputs[1 - slot])


def _normalised(view: GraphView, value: str) -> bool:
    def divides_by_spread(node: GraphNode) -> bool:
        if node.op_type in NORMS:
            return True
        if node.op_type == "Div" and len(node.inputs) == 2:
            return _spread(view, node.inputs[1])
        return node.op_type == "Mul" and any(_spread(view, v, reciprocal=True)
                                             for v in node.inputs)

    return _upstream(view, value, _ELEMENTWISE, divides_by_spread)


def _spread(view: GraphView, value: str, reciprocal: bool = False) -> bool:
    """`value` is, through views, a Sqrt (or the reciprocal of one, when `reciprocal`)."""
    def is_spread(node: GraphNode) -> bool:
        if not reciprocal:
            return node.op_type == "Sqrt"
        if node.op_type == "Reciprocal" and node.inputs:
            return _spread(view, node.inputs[0])
        return node.op_type == "Div" and len(node.inputs) == 2 \
            and view.is_static(node.inputs[0]) and _spread(view, node.inputs[1])

    return _upstream(view, value, _SPREAD_VIEWS, is_spread)


def _upstream(view: GraphView, value: str, through: dict[str, tuple[int, ...]],
              found: Callable[[GraphNode], bool]) -> bool:
    """Some producer of `value`, within _STEPS nodes up its data inputs through the ops of
    `through`, is `found`."""
    todo, seen = [value], set()
    while todo and len(seen) < _STEPS:
        current = todo.pop()
        if current in seen or current not in view.producer:
            continue
        seen.add(current)
        node = view.nodes[view.producer[current]]
        if found(node):
            return True
        todo.extend(_data_inputs(view, node, through))
    return False


def _data_inputs(view: GraphView, node: GraphNode, slots_of: dict[str, tuple[int, ...]]
                 ) -> list[str]:
    slots = slots_of.get(node.op_type, ())
    return [node.inputs[i] for i in slots if i < len(node.inputs) and node.inputs[i]
            and not view.is_static(node.inputs[i])
            and node.inputs[i] not in view.shape_arithmetic]
