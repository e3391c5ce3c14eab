"""Where to measure a prepared TorchScript graph, and what to call each place.

A probe point is the output of a parameterised layer (linear, conv, embedding, RNN), of a
nonlinearity, or of a normalisation. Layer names are the user's module paths: for a layer that
consumes a parameter, the `prim::GetAttr` chain from `self` to its weight (`layer1.0.conv1`);
for the others, the module hierarchy TorchScript records on every inlined node
(`layer1(Sequential).0(BasicBlock).relu(ReLU)` -> `layer1.0.relu`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from gradprobe.diagnostics.graph import ProbePoint, Role
from gradprobe.diagnostics.loaders.masked_inputs import torchscript_reads_minus_infinity_fill
from gradprobe.diagnostics.loaders.pooled_inputs import torchscript_reads_global_pool
from gradprobe.diagnostics.loaders.torchscript_passes import Node, Value, all_nodes, argument_index
from gradprobe.diagnostics.selection_gates import FlowNode, GateGraph

# op -> (weight argument, bias argument, channel axis of the output)
_LINEAR_OPS: dict[str, tuple[str, str | None, int]] = {
    "aten::linear": ("weight", "bias", -1),
    "aten::conv1d": ("weight", "bias", 1),
    "aten::conv2d": ("weight", "bias", 1),
    "aten::conv3d": ("weight", "bias", 1),
    "aten::_convolution": ("weight", "bias", 1),
    "aten::convolution": ("weight", "bias", 1),
    "aten::conv_transpose1d": ("weight", "bias", 1),
    "aten::conv_transpose2d": ("weight", "bias", 1),
    "aten::conv_transpose3d": ("weight", "bias", 1),
    "aten::embedding": ("weight", None, -1),
}
# matrix products count as a layer only when their right operand is a parameter
_MATMUL_OPS: dict[str, tuple[str, str | None]] = {
    "aten::matmul": ("other", None),
    "aten::mm": ("mat2", None),
    "aten::addmm": ("mat2", "self"),
}
_RNN_OPS = frozenset({"aten::lstm", "aten::gru", "aten::rnn_tanh", "aten::rnn_relu"})
_ACTIVATION_OPS = {
    "aten::relu": "relu", "aten::relu6": "relu", "aten::leaky_relu": "leaky_relu",
    "aten::prelu": "prelu", "aten::elu": "elu", "aten::celu": "elu", "aten::selu": "selu",
    "aten::gelu": "gelu", "aten::silu": "silu", "aten::mish": "mish", "aten::softplus": "softplus",
    "aten::hardswish": "hardswish", "aten::hardsigmoid": "hardsigmoid", "aten::sigmoid": "sigmoid",
    "aten::tanh": "tanh", "aten::softmax": "softmax",
}
# op -> channel axis of the normalised output
_BATCH_NORM_OPS = {"aten::batch_norm", "aten::_batch_norm_impl_index", "aten::native_batch_norm"}
_NORM_OPS = {
    "aten::batch_norm": 1, "aten::_batch_norm_impl_index": 1, "aten::native_batch_norm": 1,
    "aten::instance_norm": 1, "aten::group_norm": 1, "aten::layer_norm": -1,
    "aten::native_layer_norm": -1,
}
_ELEMENTWISE = frozenset(
    "aten::" + name
    for name in ("add", "sub", "dropout", "feature_dropout", "alpha_dropout",
                 "feature_alpha_dropout", "contiguous", "clone")
)
# ops a layer's signal passes on its way to the nonlinearity that acts on it
_PASS_THROUGH = _ELEMENTWISE | frozenset(_NORM_OPS) | frozenset(
    "aten::" + name
    for name in ("view", "reshape", "flatten", "unflatten", "transpose", "permute", "squeeze",
                 "unsqueeze", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d",
                 "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                 "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
                 "adaptive_max_pool3d")
)
_TRANSPOSING = frozenset({"aten::t", "aten::transpose", "aten::numpy_T", "aten::mT"})
_LAYOUT_NEUTRAL = frozenset({"aten::contiguous", "aten::to", "aten::detach", "aten::clone"})
_INDEX_PASS = frozenset({"aten::view", "aten::reshape", "aten::to", "aten::contiguous",
                         "aten::unsqueeze", "aten::squeeze", "aten::flatten", "aten::long"})
_HIERARCHY_PART = re.compile(r"([^.()]+)\(([^()]*)\)")
_HIERARCHY_NOISE = frozenset({"SELF", "UNKNOWN_INSTANCE"})


@dataclass
class _Candidate:
    node: Node
    value: Value
    role: Role
    op: str
    channel_axis: int
    layer: str = ""
    nonlinearity: str | None = None
    parameters: tuple[str, ...] = ()
    weight: str | None = None
    bias: str | None = None
    weight_path: str | None = None
    owner_path: str | None = None  # the module holding a norm's computed scale: its name
    on_weights: bool = False  # a norm over a parameter (weight standardisation)
    weight_layout: str = "out_in"
    fan_in: int | None = None
    fan_out: int | None = None
    feeds: list[str] = field(default_factory=list)
    followed_by_norm: bool = False

    @property
    def label(self) -> str:
        return f"{self.op}@{self.layer}"


@dataclass
class Discovery:
    """Probe points in graph order, the graph value each one observes, and notes."""

    points: list[ProbePoint]
    values: list[Value]
    notes: list[str]


class _ParameterResolver:
    """Maps graph values back to the module attributes they were read from."""

    def __init__(self, graph: torch._C.Graph, module: torch.jit.ScriptModule):
        self._self = next(iter(graph.inputs())).unique()
        self._root = module._c
        self._names = {t._cdata: name for name, t in module.named_parameters()}
        self.tensors = dict(module.named_parameters())

    def access_path(self, value: Value) -> str | None:
        names = []
        while value.node().kind() == "prim::GetAttr":
            names.append(value.node().s("name"))
            value = value.node().input()
        if value.unique() != self._self or not names:
            return None
        return ".".join(reversed(names))

    def _object(self, path: str) -> object:
        obj: object = self._root
        for name in path.split("."):
            obj = obj.getattr(name)  # type: ignore[attr-defined]
        return obj

    def parameter(self, value: Value) -> tuple[str, str] | None:
        """(access path, parameter name) when `value` is a parameter read from `self`."""
        path = self.access_path(value)
        if path is None:
            return None
        obj = self._object(path)
        name = self._names.get(obj._cdata) if isinstance(obj, torch.Tensor) else None
        return (path, name) if name else None

    def parameter_list(self, value: Value) -> tuple[str | None, list[str]]:
        """Access path of the list's owner and the parameter names in a list of tensors
        (`prim::ListConstruct` of attributes when traced, one list attribute when scripted)."""
        node = value.node()
        if node.kind() == "prim::ListConstruct":
            found = [self.parameter(item) for item in node.inputs()]
            names = [f[1] for f in found if f]
            owner = found[0][0].rpartition(".")[0] if found and found[0] else None
            return owner, names
        path = self.access_path(value)
        if path is None:
            return None, []
        obj = self._object(path)
        tensors = obj if isinstance(obj, list) else []
        names = [self._names[t._cdata] for t in tensors
                 if isinstance(t, torch.Tensor) and t._cdata in self._names]
        return path.rpartition(".")[0], names


class _ModulePaths:
    """Turns a node's recorded module hierarchy into a path in the module tree. Containers
    that are indexed rather than called (`nn.ModuleList`) are missing from the hierarchy,
    so a step that is not a child is looked up one level further down."""

    def __init__(self, module: torch.jit.ScriptModule):
        self._root = module
        self._cache: dict[str, tuple[str, bool] | None] = {}

    def resolve(self, node: Node) -> tuple[str, bool] | None:
        """(module path, whether that module has no submodules) or None when unrecorded."""
        text = node.getModuleHierarchy()
        if text not in self._cache:
            self._cache[text] = self._walk(text)
        return self._cache[text]

    def _walk(self, text: str) -> tuple[str, bool] | None:
        steps = [(n, t) for n, t in _HIERARCHY_PART.findall(text) if n not in _HIERARCHY_NOISE]
        if not steps:
            return None
        path: list[str] = []
        current = self._root
        for step, (name, type_name) in enumerate(steps):
            children = dict(current.named_children())
            if name in children:
                path.append(name)
                current = children[name]
                continue
            for child_name, child in children.items():
                grandchild = dict(child.named_children()).get(name)
                if grandchild is not None and _type_name(grandchild) == type_name:
                    path += [child_name, name]
                    current = grandchild
                    break
            else:  # the tree does not match the record: keep the recorded names
                return ".".join([*path, *(n for n, _ in steps[step:])]), False
        return ".".join(path), not any(True for _ in current.children())


def _type_name(module: torch.nn.Module) -> str:
    return getattr(module, "original_name", type(module).__name__)


def discover_points(graph: torch._C.Graph, module: torch.jit.ScriptModule) -> Discovery:
    """Probe points of a prepared graph (see torchscript_passes.prepare_forward_graph)."""
    resolver = _ParameterResolver(graph, module)
    module_paths = _ModulePaths(module)
    reachable, in_loops = _nodes_outside_loops(graph)
    from_sizes = _shape_arithmetic(reachable)
    candidates = [c for c in (_classify(node, resolver) for node in reachable)
                  if c is not None and not (c.role == "activation"
                                            and c.node.inputsAt(0).unique() in from_sizes)]
    skipped = sum(1 for node in in_loops if _classify(node, resolver) is not None)
    by_node = {c.value.unique(): c for c in candidates}
    _name_layers(candidates, by_node, module_paths)
    for candidate in candidates:
        if candidate.role == "linear":
            _follow_downstream(candidate, by_node)
        elif candidate.role == "activation":
            upstream = _upstream_point(candidate.node.inputsAt(0), by_node)
            candidate.channel_axis = upstream.channel_axis if upstream else 1
    points = [_to_point(i, c) for i, c in enumerate(candidates)]
    notes = []
    if skipped:
        notes.append(f"{skipped} layers inside loops of the TorchScript code are not probed")
    return Discovery(points, [c.value for c in candidates], notes)


def _nodes_outside_loops(graph: torch._C.Graph) -> tuple[list[Node], list[Node]]:
    """Nodes in program order, descending into `if` branches, and the nodes of loop bodies
    apart (a value computed in a loop has one instance per iteration: no single value)."""
    found: list[Node] = []
    skipped: list[Node] = []

    def visit(block: torch._C.Block) -> None:
        for node in block.nodes():
            found.append(node)
            for inner in node.blocks():
                if node.kind() == "prim::If":
                    visit(inner)
                else:
                    skipped.extend(all_nodes(inner))

    visit(graph.block())
    return found, skipped


# Ops whose result is a tensor's size, not its values: what a trace computes from it is shape
# arithmetic (timm's "same" padding: `clamp((ceil(h / s) - 1) * s + k - h, min=0)`).
_SIZE_OPS = frozenset({"aten::size", "aten::sym_size", "aten::dim", "aten::numel", "aten::len",
                       "prim::shape"})


def _shape_arithmetic(nodes: list[Node]) -> set[int]:
    """Values computed from tensor sizes and constants alone. A clamp there is padding
    arithmetic, not a ReLU over units: it has no units, no batch and no gradient."""
    from_sizes: set[int] = set()
    for node in nodes:
        kind = node.kind()
        inputs = list(node.inputs())
        if kind in _SIZE_OPS:
            derived = True
        else:
            derived = (any(v.unique() in from_sizes for v in inputs)
                       and all(v.unique() in from_sizes or v.node().kind() == "prim::Constant"
                               for v in inputs))
        if derived:
            from_sizes.update(v.unique() for v in node.outputs())
    return from_sizes


def _classify(node: Node, resolver: _ParameterResolver) -> _Candidate | None:
    kind = node.kind()
    if node.outputsSize() == 0:
        return None
    value = node.outputsAt(0)
    if kind in _LINEAR_OPS:
        weight_arg, bias_arg, axis = _LINEAR_OPS[kind]
        candidate = _Candidate(node, value, "linear", kind, axis)
        _attach_weight(candidate, node, resolver, weight_arg, bias_arg, transposed=False)
        return candidate
    if kind in _MATMUL_OPS:
        weight_arg, bias_arg = _MATMUL_OPS[kind]
        index = argument_index(node, weight_arg)
        if index is None:
            return None
        operand, flips = _strip_layout_ops(node.inputsAt(index))
        if resolver.parameter(operand) is None:
            return None  # a product of two activations (attention scores), not a layer
        candidate = _Candidate(node, value, "linear", kind, -1)
        _attach_weight(candidate, node, resolver, weight_arg, bias_arg, transposed=flips % 2 == 0)
        return candidate
    if kind in _RNN_OPS:
        return _rnn_candidate(node, resolver)
    if kind in _NORM_OPS:
        candidate = _Candidate(node, value, "norm", kind, _NORM_OPS[kind])
        _attach_weight(candidate, node, resolver, "weight", "bias", transposed=False)
        candidate.fan_in = candidate.fan_out = None
        candidate.on_weights = resolver.parameter(_scale_source(node.inputsAt(0))) is not None
        return candidate
    # an in-place activation the passes had to keep (its input is aliased) is still one
    canonical = _ACTIVATION_OPS.get(kind.removesuffix("_")) or _hardtanh_as_relu(node)
    if canonical is None:
        return None
    candidate = _Candidate(node, value, "activation", kind, 1, nonlinearity=canonical)
    if kind == "aten::prelu":
        _attach_weight(candidate, node, resolver, "weight", None, transposed=False)
        candidate.fan_in = candidate.fan_out = None
    return candidate


def _hardtanh_as_relu(node: Node) -> str | None:
    """`hardtanh(x, 0, 6)` is ReLU6 as TorchScript writes it, `clamp(x, min=0)` a ReLU;
    other clamps are not ReLUs."""
    kind = node.kind().removesuffix("_")
    if kind not in ("aten::hardtanh", "aten::clamp") or node.inputsSize() < 3:
        return None
    bounds = [node.inputsAt(i) for i in (1, 2)]
    if any(b.node().kind() != "prim::Constant" for b in bounds):
        return None
    low, high = (b.toIValue() for b in bounds)
    if isinstance(low, torch.Tensor) or isinstance(high, torch.Tensor):
        return None
    if low == 0 and (high == 6 or (high is None and kind == "aten::clamp")):
        return "relu"
    return None


def _strip_layout_ops(value: Value) -> tuple[Value, int]:
    """The tensor under transposes and copies, and how many transposes were stripped."""
    flips = 0
    while value.node().kind() in _TRANSPOSING | _LAYOUT_NEUTRAL:
        flips += value.node().kind() in _TRANSPOSING
        value = value.node().inputsAt(0)
    return value, flips


_RESHAPING = frozenset({"aten::view", "aten::reshape", "aten::flatten"})


def _scale_source(value: Value) -> Value:
    """The tensor a norm's scale is read from through reshapes and a constant factor: weight
    standardisation (timm's ScaledStdConv2d) passes `(gain * c).view(-1)` as the scale of a
    batch_norm over the conv's weight, and a zero-initialised `gain` is that norm's zero scale."""
    while True:
        node = value.node()
        if node.kind() in _TRANSPOSING | _LAYOUT_NEUTRAL | _RESHAPING:
            value = node.inputsAt(0)
        elif node.kind() in ("aten::mul", "aten::div") and node.inputsSize() == 2:
            first, second = node.inputsAt(0), node.inputsAt(1)
            if second.node().kind() == "prim::Constant":
                value = first
            elif node.kind() == "aten::mul" and first.node().kind() == "prim::Constant":
                value = second
            else:
                return value
        else:
            return value


def _attach_weight(candidate: _Candidate, node: Node, resolver: _ParameterResolver,
                   weight_arg: str, bias_arg: str | None, *, transposed: bool) -> None:
    """Fill weight/bias/fans. `transposed`: the weight is stored (in, out) (`x @ W`)."""
    names: list[str] = []
    weight_index = argument_index(node, weight_arg)
    if weight_index is not None:
        direct = _strip_layout_ops(node.inputsAt(weight_index))[0]
        found = resolver.parameter(direct)
        if found:
            candidate.weight_path, candidate.weight = found
            names.append(found[1])
        elif candidate.role == "norm":
            found = resolver.parameter(_scale_source(direct))
            if found:
                candidate.owner_path, candidate.weight = found[0].rpartition(".")[0], found[1]
                names.append(found[1])
    bias_index = argument_index(node, bias_arg) if bias_arg else None
    if bias_index is not None:
        found = resolver.parameter(node.inputsAt(bias_index))
        if found:
            candidate.bias = found[1]
            names.append(found[1])
    candidate.parameters = tuple(names)
    if candidate.weight is not None:
        shape = tuple(resolver.tensors[candidate.weight].shape)
        candidate.weight_layout = "in_out" if transposed else "out_in"
        candidate.fan_in, candidate.fan_out = _fans(shape, transposed)


def _fans(shape: tuple[int, ...], transposed: bool) -> tuple[int | None, int | None]:
    """As torch.nn.init._calculate_fan_in_and_fan_out for (out, in, *kernel) weights;
    swapped for (in, out) matrices so that fan_in always counts inputs."""
    if len(shape) < 2:
        return None, None
    if transposed:
        return shape[-2], shape[-1]
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def _rnn_candidate(node: Node, resolver: _ParameterResolver) -> _Candidate | None:
    index = argument_index(node, "params")
    if index is None:
        return None
    owner, names = resolver.parameter_list(node.inputsAt(index))
    candidate = _Candidate(node, node.outputsAt(0), "linear", node.kind(), -1)
    candidate.parameters = tuple(names)
    if names:
        candidate.weight = names[0]  # weight_ih_l0: the layer that reads the input
        candidate.weight_path = f"{owner}.{names[0].rpartition('.')[2]}" if owner else names[0]
        shape = tuple(resolver.tensors[names[0]].shape)
        candidate.fan_in, candidate.fan_out = _fans(shape, False)
    return candidate


def _name_layers(candidates: list[_Candidate], by_node: dict[int, _Candidate],
                 module_paths: _ModulePaths) -> None:
    seen: dict[str, int] = {}
    for candidate in candidates:
        base = _base_name(candidate, by_node, module_paths)
        seen[base] = seen.get(base, 0) + 1
        candidate.layer = base if seen[base] == 1 else f"{base}#{seen[base]}"


def _base_name(candidate: _Candidate, by_node: dict[int, _Candidate],
               module_paths: _ModulePaths) -> str:
    if candidate.owner_path:
        return candidate.owner_path
    if candidate.weight_path and candidate.role != "activation":
        owner, _, attribute = candidate.weight_path.rpartition(".")
        if attribute == "weight" or candidate.op in _RNN_OPS or not owner:
            return owner or attribute
        return f"{owner}.{attribute.removesuffix('_weight')}"  # MHA in_proj_weight -> in_proj
    resolved = module_paths.resolve(candidate.node)
    short = candidate.nonlinearity or candidate.op.removeprefix("aten::")
    if resolved is not None:
        path, is_leaf = resolved
        # a leaf module (nn.ReLU, nn.LayerNorm) is the layer; a functional call inside a
        # bigger module (F.relu in a residual block) is named after that module
        return path if is_leaf else f"{path}:{short}"
    upstream = _upstream_point(candidate.node.inputsAt(0), by_node)
    if upstream is not None and upstream.layer:
        return f"{upstream.layer.partition('#')[0]}:{short}"
    return short


def _upstream_point(value: Value, by_node: dict[int, _Candidate]) -> _Candidate | None:
    """The probe point whose output reaches `value` through elementwise ops only."""
    for _ in range(32):
        found = by_node.get(value.unique())
        if found is not None:
            return found
        node = value.node()
        if node.kind() not in _ELEMENTWISE or node.inputsSize() == 0:
            return None
        value = node.inputsAt(0)
    return None


def _follow_downstream(candidate: _Candidate, by_node: dict[int, _Candidate]) -> None:
    """Find the nonlinearities this layer's output reaches before the next layer. Besides
    pass-through ops, the signal is followed out of `if` branches and through tuples
    (scripted attention returns `(output, weights)`): `element` is its place in a tuple."""
    found: list[_Candidate] = []
    stack: list[tuple[Value, int | None]] = [(candidate.value, None)]
    visited: set[tuple[int, int | None]] = set()
    while stack:
        value, element = stack.pop()
        if (value.unique(), element) in visited:
            continue
        visited.add((value.unique(), element))
        for use in value.uses():
            user = use.user
            kind = user.kind()
            if kind == "prim::Return":
                owner = user.owningBlock().owningNode()
                if owner is not None and owner.kind() == "prim::If":
                    stack.append((owner.outputsAt(use.offset), element))
            elif element is not None:
                if kind == "prim::TupleUnpack":
                    stack.append((user.outputsAt(element), None))
                elif kind == "prim::TupleIndex" and user.inputsAt(1).toIValue() == element:
                    stack.append((user.output(), None))
            elif kind == "prim::TupleConstruct":
                stack.append((user.output(), use.offset))
            else:
                reached = by_node.get(user.outputsAt(0).unique()) if user.outputsSize() else None
                if reached is not None and reached.role == "activation":
                    found.append(reached)
                elif reached is not None and reached.role == "linear":
                    continue
                elif kind in _PASS_THROUGH and (use.offset == 0 or kind in _ELEMENTWISE):
                    # BatchNorm only, as graph.ProbePoint documents: a LayerNorm reached through
                    # a residual add does not make this layer's scale irrelevant.
                    candidate.followed_by_norm |= kind in _BATCH_NORM_OPS
                    stack.append((user.outputsAt(0), None))
    order = {id(c): i for i, c in enumerate(by_node.values())}
    found.sort(key=lambda c: order[id(c)])
    candidate.feeds = list(dict.fromkeys(c.label for c in found))
    candidate.nonlinearity = found[0].nonlinearity if found else None


def _to_point(index: int, c: _Candidate) -> ProbePoint:
    return ProbePoint(
        index=index, layer=c.layer, node=c.label, op=c.op, role=c.role,
        nonlinearity=c.nonlinearity, parameters=c.parameters, weight=c.weight, bias=c.bias,
        fan_in=c.fan_in, fan_out=c.fan_out, weight_layout=c.weight_layout,  # type: ignore[arg-type]
        channel_axis=c.channel_axis, feeds=tuple(c.feeds), followed_by_norm=c.followed_by_norm,
        on_weights=c.on_weights,
        reads_global_pool=c.role == "linear" and c.op not in _RNN_OPS
        and torchscript_reads_global_pool(c.node),
        reads_minus_infinity_fill=c.role == "activation"
        and torchscript_reads_minus_infinity_fill(c.node),
    )


def integer_input_ranges(graph: torch._C.Graph,
                         module: torch.jit.ScriptModule) -> dict[int, tuple[int, int]]:
    """Graph input position (self excluded) -> [0, rows) for inputs used as embedding indices."""
    resolver = _ParameterResolver(graph, module)
    ranges: dict[int, tuple[int, int]] = {}
    for position, graph_input in enumerate(list(graph.inputs())[1:]):
        stack = [graph_input]
        while stack:
            value = stack.pop()
            for use in value.uses():
                user = use.user
                if user.kind() in _INDEX_PASS and use.offset == 0:
                    stack.append(user.outputsAt(0))
                elif user.kind() == "aten::embedding" and use.offset == 1:
                    found = resolver.parameter(user.inputsAt(0))
                    if found:
                        rows = resolver.tensors[found[1]].shape[0]
                        low, high = ranges.get(position, (0, rows))
                        ranges[position] = (0, min(high, rows))
    return ranges


# How selection_gates reads a node kind: selects, and min/max/clamp bounds (`aten::min` is
# left out: with one operand it is a reduction of it).
_GATE_KINDS = {"aten::where": "where", "aten::masked_fill": "masked_fill",
               "aten::masked_scatter": "masked_scatter", "aten::index_put": "index_put",
               "aten::minimum": "minmax", "aten::maximum": "minmax", "aten::fmin": "minmax",
               "aten::fmax": "minmax", "aten::clamp": "clamp", "aten::clip": "clamp",
               "aten::clamp_min": "clamp", "aten::clamp_max": "clamp"}


def gate_graph(graph: torch._C.Graph, module: torch.jit.ScriptModule,
               integer_positions: list[int], output: Value) -> GateGraph:
    """The graph as selection_gates reads it, up to `output`; selects named `op@module`."""
    resolver = _ParameterResolver(graph, module)
    module_paths = _ModulePaths(module)
    flow: list[FlowNode] = []
    parameters: dict[str, list[str]] = {}

    def key(value: Value) -> str:
        return str(value.unique())

    def visit(block: torch._C.Block) -> None:
        for node in block.nodes():
            if node.kind() == "prim::GetAttr":
                found = resolver.parameter(node.output())
                if found is not None:
                    parameters.setdefault(found[1], []).append(key(node.output()))
            inputs = [key(v) for v in node.inputs()]
            for inner in node.blocks():  # into the block, through it, out of the node
                flow.append(FlowNode("", "", tuple(inputs), tuple(key(v) for v in inner.inputs())))
                visit(inner)
                inputs += [key(v) for v in inner.returnNode().inputs()]
            resolved = module_paths.resolve(node)
            label = f"{node.kind()}@{resolved[0]}" if resolved else node.kind()
            flow.append(FlowNode(label, _GATE_KINDS.get(node.kind().removesuffix("_"), ""),
                                 tuple(inputs), tuple(key(v) for v in node.outputs())))

    visit(graph.block())
    arguments = list(graph.inputs())[1:]  # after `self`
    ints = [key(arguments[i]) for i in integer_positions if i < len(arguments)]
    return GateGraph(flow, ints, [key(output)], parameters)
