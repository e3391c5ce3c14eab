"""Which values of an ONNX graph the probe measures, and what the rules need to know about them.

Three roles: parameterised layers (`linear`: Conv, ConvTranspose, Gemm, MatMul with a weight,
LSTM/GRU/RNN, embedding Gather), nonlinearities (`activation`) and normalisations (`norm`).
For each layer this module works out its user-facing name, its weight and bias parameters, the
fans torch would compute for the weight, which nonlinearity follows it, and whether its weights
carry a BatchNorm folded in at export.

Folded BatchNorm, as observed with torch 2.13 (eval-mode exports of tests/zoo.py's ResNet):
- dynamo: the Conv node that absorbed the BN carries the BN's metadata: its
  `pkg.torch.onnx.class_hierarchy` ends in `BatchNorm2d`,
  `aten._native_batch_norm_legit_no_training.default`; the weight keeps the conv's name
  (`layer1.0.conv1.weight`, values rescaled) and a non-zero folded shift appears as
  `<conv>.weight_bias` (a zero one is dropped).
- legacy: weight and bias become anonymous `onnx::Conv_NNN` initializers, the bias often
  de-duplicated through Identity nodes; a conv without BN keeps `name.weight` / `name.bias`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import onnx
import torch

from gradprobe.diagnostics.graph import ProbePoint
from gradprobe.diagnostics.loaders.onnx_folded_norm import FOLDABLE
from gradprobe.diagnostics.loaders.onnx_naming import (
    class_hierarchy,
    is_anonymous,
    module_class,
    node_scope,
    owner_of,
    reads_only_buffers,
    unique_names,
)
from gradprobe.diagnostics.loaders.masked_inputs import onnx_reads_minus_infinity_fill
from gradprobe.diagnostics.loaders.pooled_inputs import onnx_reads_global_pool

ACTIVATIONS = {
    "Relu": "relu", "LeakyRelu": "leaky_relu", "PRelu": "prelu", "Elu": "elu", "Selu": "selu",
    "Gelu": "gelu", "Sigmoid": "sigmoid", "Tanh": "tanh", "HardSigmoid": "hardsigmoid",
    "HardSwish": "hardswish", "Softplus": "softplus", "Mish": "mish", "Softmax": "softmax",
}
NORMS = {"BatchNormalization", "LayerNormalization", "GroupNormalization", "InstanceNormalization"}
RECURRENT = {"LSTM", "GRU", "RNN"}

# torch.nn module classes that are a nonlinearity (dynamo metadata names them).
_ACTIVATION_MODULES = {
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish",
    "Softplus", "Hardswish", "Hardsigmoid", "Sigmoid", "Tanh", "Softmax", "Hardtanh",
}
# Ops a layer's output passes through on its way to the nonlinearity that acts on it.
_PASS_THROUGH = {
    "Add", "Sub", "BatchNormalization", "Reshape", "Transpose", "Flatten", "Squeeze",
    "Unsqueeze", "Identity", "Dropout", "Cast", "MaxPool",
}
_SCALE_OPS = {"Mul", "Div"}  # pass-through when the other operand is a constant
# Ops that keep a value's layout, for finding the channel axis of an activation upstream.
_LAYOUT_KEEPING = {
    "Add", "Sub", "Mul", "Div", "BatchNormalization", "Identity", "Dropout", "Cast", "Clip",
    "MaxPool", "AveragePool", "Pow", "Sqrt", "Neg", "Abs", "Erf", "Where", "Max", "Min",
    *ACTIVATIONS,
} - {"Softmax"}
_WEIGHT_VIEWS = {"Identity", "Cast", "Transpose"}  # how a weight may reach its layer
# How attention probabilities may reach the MatMul that weighs the values.
_SOFTMAX_VIEWS = {"Reshape", "Transpose", "Cast", "Identity", "Squeeze", "Unsqueeze", "Dropout"}
_UPSTREAM_LIMIT = 64


@dataclass
class GraphNode:
    """One node as the interpreter runs it (inputs already rewritten for untied parameters)."""

    index: int
    op_type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    proto: onnx.NodeProto
    scope: str | None  # module path, '' for the root module, None when unknown


@dataclass
class GraphView:
    nodes: list[GraphNode]
    params: Mapping[str, torch.Tensor]  # value name -> parameter tensor
    constants: Mapping[str, torch.Tensor]  # value name -> constant tensor (initializers, Constant)
    ranks: Mapping[str, int]  # value name -> rank, where shape inference knows it
    opset: int
    producer: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for node in self.nodes:
            for out in node.outputs:
                if out:
                    self.producer[out] = node.index
            for slot, name in enumerate(node.inputs):
                if name:
                    self.consumers.setdefault(name, []).append((node.index, slot))

    def is_static(self, value: str) -> bool:
        return value in self.params or value in self.constants

    def producer_through(self, value: str, through: Collection[str], steps: int = 16
                         ) -> GraphNode | None:
        """Follow `value` up the first input of the ops in `through` (views, casts) to the
        first node that is not one of them (None for a graph input or an initializer, and when
        `steps` nodes did not get past the views)."""
        for _ in range(steps):
            producer = self.producer.get(value)
            if producer is None:
                return None
            node = self.nodes[producer]
            if node.op_type not in through or not node.inputs:
                return node
            value = node.inputs[0]
        return None

    @cached_property
    def shape_arithmetic(self) -> frozenset[str]:
        """Values computed from tensor shapes and constants alone. A Relu or Clip there is
        padding arithmetic (timm's "same" padding: `max((ceil(h / s) - 1) * s + k - h, 0)`),
        not an activation over units: it has no units, no batch and no gradient."""
        derived: set[str] = set()
        for node in self.nodes:
            inputs = [v for v in node.inputs if v]
            if node.op_type not in ("Shape", "Size") and not (
                    any(v in derived for v in inputs)
                    and all(v in derived or (v in self.constants and v not in self.params)
                            for v in inputs)):
                continue
            derived.update(v for v in node.outputs if v)
        return frozenset(derived)


@dataclass(frozen=True)
class PointPlan:
    point: ProbePoint
    value: str  # the value the probe taps
    step: int  # index of the node that produces `value`


@dataclass
class _Draft:
    node: GraphNode
    role: Literal["linear", "activation", "norm"]
    value: str
    step: int
    kind: str | None = None  # canonical activation name
    weight: str | None = None
    bias: str | None = None
    parameters: tuple[str, ...] = ()
    fan_in: int | None = None
    fan_out: int | None = None
    layout: Literal["out_in", "in_out"] = "out_in"
    channel_axis: int = 1
    folded: bool = False
    folded_norm: str | None = None
    nonlinearity: str | None = None
    feeds: tuple[str, ...] = ()
    followed_by_norm: bool = False
    on_weights: bool = False
    layer: str = ""


def torch_fans(shape: Sequence[int]) -> tuple[int, int]:
    """torch.nn.init._calculate_fan_in_and_fan_out for a weight of this (out, in, *k) shape."""
    receptive = 1
    for d in shape[2:]:
        receptive *= int(d)
    return int(shape[1]) * receptive, int(shape[0]) * receptive


def build_points(view: GraphView) -> list[PointPlan]:
    """Probe points in the order the interpreter produces their values."""
    drafts: list[_Draft] = []
    internal: dict[int, int] = {}  # node index -> node index of the composite activation
    composites = _composite_activations(view, internal)
    for node in view.nodes:
        if node.index in internal:
            continue
        draft = (composites.get(node.index) or _linear(view, node) or _norm(view, node)
                 or _activation(view, node))
        if draft is not None:
            drafts.append(draft)
    drafts.sort(key=lambda d: (d.step, d.node.index))

    by_value = {d.value: d for d in drafts}
    by_node = {d.node.index: d for d in drafts}
    for node_index, composite in internal.items():
        by_node.setdefault(node_index, by_node[composite])
    for draft in drafts:
        if draft.role in ("linear", "norm"):
            _follow(view, draft, by_node)
    for draft in drafts:
        if draft.role == "activation":
            draft.channel_axis = _upstream_axis(view, draft, by_value)

    _name_layers(view, drafts)
    plans = []
    for index, d in enumerate(drafts):
        point = ProbePoint(
            index=index, layer=d.layer, node=d.node.name, op=d.node.op_type, role=d.role,
            nonlinearity=d.kind if d.role == "activation" else d.nonlinearity,
            parameters=d.parameters, weight=d.weight, bias=d.bias, fan_in=d.fan_in,
            fan_out=d.fan_out, weight_layout=d.layout, channel_axis=d.channel_axis,
            feeds=d.feeds, folded_batchnorm=d.folded, folded_norm=d.folded_norm,
            # the interpreter re-normalises a folded conv on batch statistics (onnx_folded_norm)
            followed_by_norm=d.followed_by_norm or (d.folded and d.node.op_type in FOLDABLE),
            on_weights=d.on_weights,
            reads_global_pool=d.role == "linear" and onnx_reads_global_pool(view, d.node.inputs),
            reads_minus_infinity_fill=d.role == "activation" and bool(d.node.inputs)
            and onnx_reads_minus_infinity_fill(view, d.node.inputs[0]),
        )
        plans.append(PointPlan(point=point, value=d.value, step=d.step))
    return plans


# --- parameterised layers -------------------------------------------------------------------

def _weight_source(view: GraphView, value: str) -> tuple[str, bool] | None:
    """The parameter behind a weight input, seen through Identity/Cast/Transpose, and whether
    it arrives transposed."""
    transposed = False
    for _ in range(8):
        if value in view.params:
            return value, transposed
        producer = view.producer.get(value)
        if producer is None:
            return None
        node = view.nodes[producer]
        if node.op_type not in _WEIGHT_VIEWS or not node.inputs:
            return None
        if node.op_type == "Transpose":
            perm = node.attrs.get("perm")
            swaps_last_two = perm is None or (
                len(perm) >= 2 and list(perm[-2:]) == [len(perm) - 1, len(perm) - 2])
            if not swaps_last_two:
                return None
            transposed = not transposed
        value = node.inputs[0]
    return None


def _parameters_behind(view: GraphView, value: str) -> list[str]:
    """The parameters `value` is computed from when it is computed from initializers and
    constants alone (empty when it depends on the data, or on no parameter): a
    reparameterised weight (weight standardisation, weight norm), as timm's ScaledStdConv2d
    exports it (a BatchNormalization over the weight, then Reshape)."""
    seen: set[str] = set()
    todo, params = [value], []
    while todo:
        current = todo.pop()
        if current in seen or not current:
            continue
        seen.add(current)
        if current in view.params:
            params.append(current)
            continue
        if current in view.constants:
            continue
        producer = view.producer.get(current)
        if producer is None or len(seen) > _UPSTREAM_LIMIT:
            return []  # a graph input: the value depends on the data
        todo.extend(view.nodes[producer].inputs)
    return params


def _param_input(view: GraphView, node: GraphNode, slot: int) -> str | None:
    if slot < len(node.inputs) and node.inputs[slot] in view.params:
        return node.inputs[slot]
    return None


def _flip(layout: Literal["out_in", "in_out"]) -> Literal["out_in", "in_out"]:
    return "in_out" if layout == "out_in" else "out_in"


def _is_softmax(view: GraphView, value: str) -> bool:
    """`value` is a softmax's output, seen through reshapes, transposes and casts."""
    node = view.producer_through(value, _SOFTMAX_VIEWS, steps=8)
    return node is not None and node.op_type in ("Softmax", "LogSoftmax")


def _matrix_fans(shape: Sequence[int], layout: str) -> tuple[int, int]:
    rows, cols = int(shape[-2]), int(shape[-1])
    return (cols, rows) if layout == "out_in" else (rows, cols)


def _bias_after(view: GraphView, value: str) -> tuple[str, str, int] | None:
    """A bias added right after a MatMul/Gemm (how exporters split torch's Linear)."""
    users = view.consumers.get(value, [])
    if len(users) != 1:
        return None
    node = view.nodes[users[0][0]]
    if node.op_type != "Add" or len(node.inputs) != 2:
        return None
    other = node.inputs[1 - users[0][1]]
    if other in view.params:
        return other, node.outputs[0], node.index
    return None


def _linear(view: GraphView, node: GraphNode) -> _Draft | None:
    op = node.op_type
    draft: _Draft | None = None
    if op in ("Conv", "ConvTranspose") and len(node.inputs) >= 2:
        source = _weight_source(view, node.inputs[1])
        if source is None and _parameters_behind(view, node.inputs[1]):
            # A layer all the same; its stored tensors are not its weight as applied, so no
            # rule judges their init (TorchScript sees such a conv the same way).
            return _Draft(node, "linear", node.outputs[0], node.index,
                          bias=_param_input(view, node, 2), channel_axis=1,
                          parameters=tuple(n for n in node.inputs[2:3] if n in view.params))
        if source is None or view.params[source[0]].dim() < 3:
            return None
        weight = source[0]
        fan_in, fan_out = torch_fans(view.params[weight].shape)
        draft = _Draft(node, "linear", node.outputs[0], node.index, weight=weight,
                       bias=_param_input(view, node, 2), fan_in=fan_in, fan_out=fan_out,
                       channel_axis=1)
    elif op == "Gemm" and len(node.inputs) >= 2:
        source = _weight_source(view, node.inputs[1])
        if source is None or view.params[source[0]].dim() != 2:
            return None
        weight, transposed = source
        layout: Literal["out_in", "in_out"] = "out_in" if node.attrs.get("transB", 0) else "in_out"
        layout = _flip(layout) if transposed else layout
        fan_in, fan_out = _matrix_fans(view.params[weight].shape, layout)
        draft = _Draft(node, "linear", node.outputs[0], node.index, weight=weight,
                       bias=_param_input(view, node, 2), fan_in=fan_in, fan_out=fan_out,
                       layout=layout, channel_axis=1)
    elif op == "MatMul" and len(node.inputs) == 2:
        right = _weight_source(view, node.inputs[1])
        left = _weight_source(view, node.inputs[0]) if right is None else None
        source, layout = (right, "in_out") if right is not None else (left, "out_in")
        if source is None or view.params[source[0]].dim() < 2:
            return None
        if _is_softmax(view, node.inputs[0 if right is not None else 1]):
            # Attention probabilities times a stored tensor: the values, which the exporter
            # computed from constants (DETR's first decoder layer projects its zero queries:
            # MaskFormer's dynamo file stores the zero values), not a layer's weight.
            return None
        weight, transposed = source
        layout = _flip(layout) if transposed else layout
        fan_in, fan_out = _matrix_fans(view.params[weight].shape, layout)
        draft = _Draft(node, "linear", node.outputs[0], node.index, weight=weight,
                       fan_in=fan_in, fan_out=fan_out, layout=layout, channel_axis=-1)
    elif op in RECURRENT and len(node.inputs) >= 3:
        weight = _param_input(view, node, 1)
        if weight is None or view.params[weight].dim() != 3:
            return None
        shape = view.params[weight].shape  # (directions, gates * hidden, input)
        tapped = 0 if node.outputs and node.outputs[0] else 1
        if tapped >= len(node.outputs) or not node.outputs[tapped]:
            return None
        draft = _Draft(node, "linear", node.outputs[tapped], node.index, weight=weight,
                       bias=_param_input(view, node, 3), fan_in=int(shape[2]),
                       fan_out=int(shape[1]), channel_axis=-1)
    elif op == "Gather" and len(node.inputs) == 2 and node.attrs.get("axis", 0) == 0:
        table = _param_input(view, node, 0)
        if table is None or view.params[table].dim() != 2:
            return None
        fan_in, fan_out = torch_fans(view.params[table].shape)
        draft = _Draft(node, "linear", node.outputs[0], node.index, weight=table,
                       fan_in=fan_in, fan_out=fan_out, channel_axis=-1)
    if draft is None:
        return None
    if op in ("MatMul", "Gemm", "Conv", "ConvTranspose") and reads_only_buffers(node.proto):
        # A fixed transform (a buffer, not a parameter): no init sets it, no rule judges it;
        # as TorchScript, which never makes a buffer a parameter, sees it.
        draft.weight = None
    if draft.bias is None and op in ("MatMul", "Gemm"):
        after = _bias_after(view, draft.value)
        if after is not None:
            draft.bias, draft.value, draft.step = after
    own = [n for n in node.inputs if n in view.params]
    extra = [draft.weight] if draft.weight and draft.weight not in own else []
    extra += [draft.bias] if draft.bias and draft.bias not in own else []
    draft.parameters = tuple(dict.fromkeys(own + extra))
    draft.folded = _folded_batchnorm(node, draft)
    draft.folded_norm = _folded_norm_path(node) if draft.folded else None
    return draft


def _folded_norm_path(node: GraphNode) -> str | None:
    """The BatchNorm's module path on a node the dynamo exporter fused it into: the fused node
    keeps the BatchNorm's metadata (`bn1`) while its weight keeps the conv's name."""
    module = module_class(node.proto) or ""
    if "BatchNorm" not in module:
        return None
    return node_scope(node.proto) or None


def _folded_batchnorm(node: GraphNode, draft: _Draft) -> bool:
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return False
    classes = class_hierarchy(node.proto)
    if classes:  # dynamo: the fused node keeps the BatchNorm's metadata
        return any("BatchNorm" in c or "batch_norm" in c for c in classes) or bool(
            draft.bias and draft.bias.endswith(".weight_bias"))
    # legacy: its eval-mode peephole fuses BN into Conv only, turning both the weight and
    # the bias into anonymous initializers
    return bool(node.op_type in ("Conv", "ConvTranspose") and draft.weight
                and is_anonymous(draft.weight) and draft.bias and is_anonymous(draft.bias))


# --- normalisations and activations ---------------------------------------------------------

def _norm(view: GraphView, node: GraphNode) -> _Draft | None:
    if node.op_type not in NORMS or not node.outputs or not node.outputs[0]:
        return None
    weight = _param_input(view, node, 1)
    bias = _param_input(view, node, 2)
    axis = -1 if node.op_type == "LayerNormalization" else 1
    draft = _Draft(node, "norm", node.outputs[0], node.index, weight=weight, bias=bias,
                   parameters=tuple(n for n in (weight, bias) if n), channel_axis=axis)
    if node.op_type == "InstanceNormalization" and _is_fill(view, weight, 1.0) \
            and _is_fill(view, bias, 0.0):
        _take_affine_after(view, draft)
    normalised = _parameters_behind(view, node.inputs[0])
    draft.on_weights = bool(normalised)
    if normalised and weight:
        # An exporter folds the scale's fixed factor in (timm: gain * gamma / sqrt(fan_in) is
        # one stored tensor): the fan-in says what a unit gain is (graph.ProbePoint.fan_in).
        units = max(view.params[weight].numel(), 1)
        draft.fan_in = max(view.params[n].numel() for n in normalised) // units or None
    return draft


def _is_fill(view: GraphView, param: str | None, value: float) -> bool:
    """No parameter there, or one whose every entry is `value`."""
    return param is None or bool((view.params[param] == value).all())


def _take_affine_after(view: GraphView, draft: _Draft) -> None:
    """GroupNorm as both exporters write it: InstanceNormalization over (N, groups, -1) with a
    constant unit scale, a Reshape back, then `* weight + bias` per channel. Those two
    parameters are the norm's own, and the norm's output is the value after them (what a
    TorchScript group_norm returns), so a zero-init scale is seen as the norm's zero scale."""
    value = draft.value
    users = view.consumers.get(value, [])
    while len(users) == 1 and view.nodes[users[0][0]].op_type in ("Reshape", "Identity"):
        value = view.nodes[users[0][0]].outputs[0]
        users = view.consumers.get(value, [])
    found: dict[str, tuple[str, str, int]] = {}
    for op in ("Mul", "Add"):
        if len(users) != 1:
            break
        node = view.nodes[users[0][0]]
        other = node.inputs[1 - users[0][1]] if len(node.inputs) == 2 else None
        if node.op_type != op or other not in view.params or view.params[other].dim() < 1:
            break
        found[op] = (other, node.outputs[0], node.index)
        value = node.outputs[0]
        users = view.consumers.get(value, [])
    if "Mul" not in found:
        return
    last = found.get("Add", found["Mul"])
    own = draft.parameters  # the constant unit scale and zero shift over the groups
    draft.weight = found["Mul"][0]
    draft.bias = found["Add"][0] if "Add" in found else None
    draft.parameters = (*(n for n in (draft.weight, draft.bias) if n), *own)
    draft.value, draft.step = last[1], last[2]


def _clip_is_relu(view: GraphView, node: GraphNode) -> bool:
    """ReLU6 and friends: Clip with a constant lower bound of zero."""
    if "min" in node.attrs:
        return float(node.attrs["min"]) == 0.0
    if len(node.inputs) >= 2 and node.inputs[1] in view.constants:
        low = view.constants[node.inputs[1]]
        return low.numel() == 1 and float(low.reshape(()).cpu()) == 0.0  # a load-time constant
    return False


def _activation(view: GraphView, node: GraphNode) -> _Draft | None:
    kind = ACTIVATIONS.get(node.op_type)
    if kind is None and node.op_type == "Clip" and _clip_is_relu(view, node):
        kind = "relu"
    if kind is None or not node.outputs or not node.outputs[0]:
        return None
    if node.inputs[0] in view.shape_arithmetic:
        return None
    slope = _param_input(view, node, 1) if node.op_type == "PRelu" else None
    draft = _Draft(node, "activation", node.outputs[0], node.index, kind=kind,
                   parameters=(slope,) if slope else ())
    if kind == "softmax":
        axis = node.attrs.get("axis", -1 if view.opset >= 13 else 1)
        rank = view.ranks.get(node.inputs[0])
        last = axis == -1 or (rank is not None and axis == rank - 1)
        draft.channel_axis = -1 if last else int(axis)
    return draft


def _composite_activations(view: GraphView, internal: dict[int, int]) -> dict[int, _Draft]:
    """SiLU written as x * Sigmoid(x), Mish as x * tanh(softplus(x)), GELU written with Erf:
    one activation point at the pattern's last node; its inner nodes go into `internal`."""
    found: dict[int, _Draft] = {}
    for node in view.nodes:
        if node.op_type == "Sigmoid" and node.outputs:
            x = node.inputs[0]
            for user, slot in view.consumers.get(node.outputs[0], []):
                mul = view.nodes[user]
                if mul.op_type == "Mul" and mul.inputs[1 - slot] == x:
                    found[mul.index] = _Draft(mul, "activation", mul.outputs[0], mul.index,
                                              kind="silu")
                    internal[node.index] = mul.index
                    break
        elif node.op_type == "Softplus" and node.outputs:
            chain = _mish_chain(view, node)
            if chain:
                tanh, mul = chain
                found[mul.index] = _Draft(mul, "activation", mul.outputs[0], mul.index,
                                          kind="mish")
                internal[node.index] = internal[tanh.index] = mul.index
        elif node.op_type == "Erf":
            chain = _gelu_chain(view, node)
            if chain:
                last = chain[-1]
                found[last.index] = _Draft(last, "activation", last.outputs[0], last.index,
                                           kind="gelu")
                for inner in chain[:-1]:
                    internal[inner.index] = last.index
    return found


def _mish_chain(view: GraphView, softplus: GraphNode) -> tuple[GraphNode, GraphNode] | None:
    """x * tanh(softplus(x)), as exporters write Mish before opset 18."""
    x = softplus.inputs[0]
    users = view.consumers.get(softplus.outputs[0], [])
    if len(users) != 1 or view.nodes[users[0][0]].op_type != "Tanh":
        return None
    tanh = view.nodes[users[0][0]]
    for user, slot in view.consumers.get(tanh.outputs[0], []):
        mul = view.nodes[user]
        if mul.op_type == "Mul" and mul.inputs[1 - slot] == x:
            return tanh, mul
    return None


def _gelu_chain(view: GraphView, erf: GraphNode) -> list[GraphNode] | None:
    """x * 0.5 * (1 + erf(x / sqrt(2))) in any of the orders exporters write it."""
    scaled = view.producer.get(erf.inputs[0])
    if scaled is None or view.nodes[scaled].op_type not in _SCALE_OPS:
        return None
    div = view.nodes[scaled]
    x = next((v for v in div.inputs if not view.is_static(v)), None)
    if x is None:
        return None
    chain = [div, erf]
    value = erf.outputs[0]
    touched_x = False
    for _ in range(4):
        users = view.consumers.get(value, [])
        if len(users) != 1:
            break
        nxt = view.nodes[users[0][0]]
        if nxt.op_type not in ("Add", "Mul"):
            break
        other = nxt.inputs[1 - users[0][1]]
        if nxt.op_type == "Mul" and not view.is_static(other):
            if other != x and not _is_scaled_copy(view, other, x):
                break
            touched_x = True
            extra = view.producer.get(other)
            if other != x and extra is not None:
                chain.append(view.nodes[extra])
        elif not view.is_static(other):
            break
        chain.append(nxt)
        value = nxt.outputs[0]
        if touched_x and nxt.op_type == "Mul":
            after = view.consumers.get(value, [])
            if len(after) == 1:
                tail = view.nodes[after[0][0]]
                if tail.op_type == "Mul" and view.is_static(tail.inputs[1 - after[0][1]]):
                    chain.append(tail)
            break
    if not touched_x:
        return None
    chain.sort(key=lambda n: n.index)
    return chain


def _is_scaled_copy(view: GraphView, value: str, x: str) -> bool:
    producer = view.producer.get(value)
    if producer is None:
        return False
    node = view.nodes[producer]
    return node.op_type in _SCALE_OPS and x in node.inputs and all(
        v == x or view.is_static(v) for v in node.inputs)


# --- what follows a layer, what precedes an activation --------------------------------------

def _follow(view: GraphView, draft: _Draft, by_node: dict[int, _Draft]) -> None:
    """The nonlinearities this layer's output reaches before the next layer."""
    seen: set[str] = {draft.value}
    queue = deque([draft.value])
    feeds: list[str] = []
    kinds: list[str] = []
    while queue:
        value = queue.popleft()
        for user, slot in view.consumers.get(value, []):
            node = view.nodes[user]
            target = by_node.get(user)
            if target is not None and target is not draft:
                if target.role == "activation":
                    if target.node.name not in feeds:
                        feeds.append(target.node.name)
                        kinds.append(target.kind or "")
                    continue
                if node.op_type != "BatchNormalization" or slot != 0:
                    continue  # the next layer
            elif node.op_type in _SCALE_OPS:
                if not all(v == value or view.is_static(v) for v in node.inputs):
                    continue
            elif node.op_type not in _PASS_THROUGH:
                continue
            if node.op_type == "BatchNormalization":
                draft.followed_by_norm = True
            out = node.outputs[0] if node.outputs else ""
            if out and out not in seen:
                seen.add(out)
                queue.append(out)
    draft.feeds = tuple(feeds)
    draft.nonlinearity = kinds[0] if kinds else None


def _rank_axis(rank: int | None) -> int:
    if rank == 3:
        return -1  # (batch, tokens, features)
    return 1  # (batch, features) and (batch, channels, *spatial)


def _upstream_axis(view: GraphView, draft: _Draft, by_value: dict[str, _Draft]) -> int:
    if draft.kind == "softmax":
        return draft.channel_axis
    start = next((v for v in draft.node.inputs if v and not view.is_static(v)), None)
    if start is None:
        return 1
    queue = deque([start])
    seen = {start}
    steps = 0
    while queue and steps < _UPSTREAM_LIMIT:
        steps += 1
        value = queue.popleft()
        source = by_value.get(value)
        if source is not None and source.role in ("linear", "norm"):
            return source.channel_axis
        producer = view.producer.get(value)
        if producer is None:
            continue
        node = view.nodes[producer]
        if node.op_type not in _LAYOUT_KEEPING:
            continue
        for v in node.inputs:
            if v and v not in seen and not view.is_static(v):
                seen.add(v)
                queue.append(v)
    return _rank_axis(view.ranks.get(draft.value))


# --- names ----------------------------------------------------------------------------------

def _name_layers(view: GraphView, drafts: list[_Draft]) -> None:
    """Module paths for every point: the weight's owner for layers, the module scope for
    activations; repeats numbered `#2`, `#3` in graph order."""
    for d in drafts:
        if d.role in ("linear", "norm"):
            owner = owner_of(d.weight) if d.weight else None
            d.layer = owner or d.node.scope or d.node.name
    layer_names = {d.layer for d in drafts if d.role in ("linear", "norm")}
    for d in drafts:
        if d.role != "activation":
            continue
        scope = d.node.scope
        if scope is None:
            d.layer = d.node.name
            continue
        if not scope:
            d.layer = d.kind or d.node.name
            continue
        cls = module_class(d.node.proto)
        if cls is not None:
            container = cls not in _ACTIVATION_MODULES
        else:
            container = any(n == scope or n.startswith(scope + ".") for n in layer_names)
        d.layer = f"{scope}.{d.kind}" if container else scope
    for d, name in zip(drafts, unique_names([d.layer for d in drafts]), strict=True):
        d.layer = name
