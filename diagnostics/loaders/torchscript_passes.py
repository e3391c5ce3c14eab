"""Rewrites of a TorchScript forward graph so that it can be probed.

The probe needs the network as it trains at step 0, measured at every layer: BatchNorm on batch
statistics without touching the running buffers, dropout off, module flags resolved so that the
layer code is straight-line where possible, and no in-place op that would overwrite a value the
probe observes (`ReLU(inplace=True)` would turn an observed conv output into its ReLU).
Every pass works on a copy of `forward.graph`; the module itself is never changed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

Graph = torch._C.Graph
Node = torch._C.Node
Value = torch._C.Value

# Ops whose output may share memory with an input: mutating either mutates both.
VIEW_OPS = frozenset(
    "aten::" + name
    for name in (
        "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "t",
        "permute", "select", "slice", "narrow", "expand", "expand_as", "squeeze", "unsqueeze",
        "as_strided", "split", "split_with_sizes", "chunk", "unbind", "tensor_split", "detach",
        "alias", "contiguous", "movedim", "moveaxis", "diagonal", "unfold", "to", "type_as",
        "real", "imag", "view_as_real", "view_as_complex", "numpy_T", "mT", "mH", "adjoint",
        "swapaxes", "swapdims", "indices", "values", "__getitem__",
    )
)

# name of the argument that switches batch statistics on, per BatchNorm-like op
_BATCH_STAT_FLAG = {
    "aten::batch_norm": "training",
    "aten::_batch_norm_impl_index": "training",
    "aten::native_batch_norm": "training",
    "aten::instance_norm": "use_input_stats",
}
# name of the argument that switches dropout on, per op
_DROPOUT_FLAG = {
    "aten::dropout": "train",
    "aten::feature_dropout": "train",
    "aten::alpha_dropout": "train",
    "aten::feature_alpha_dropout": "train",
    "aten::native_dropout": "train",
    "aten::dropout_": "train",  # in-place forms left where rewriting them was unsafe
    "aten::feature_dropout_": "train",
    "aten::alpha_dropout_": "train",
    "aten::feature_alpha_dropout_": "train",
}
# Recurrent ops drop out between stacked layers when `train` is set; but cuDNN computes their
# backward pass only in training mode ("cudnn RNN backward can only be called in training
# mode"), so the probe turns dropout off through its probability instead.
_RNN_OPS = ("aten::lstm", "aten::gru", "aten::rnn_tanh", "aten::rnn_relu")
_SCALAR_ATTRIBUTE_TYPES = (bool, int, float, str)


def all_nodes(block: torch._C.Block | Graph) -> list[Node]:
    """Every node of a graph or block, nested blocks included, in program order."""
    found: list[Node] = []
    for node in block.nodes():
        found.append(node)
        for inner in node.blocks():
            found.extend(all_nodes(inner))
    return found


def _nodes_of_kinds(graph: Graph, kinds: Iterable[str]) -> list[Node]:
    return [node for kind in kinds for node in graph.findAllNodes(kind, True)]


def argument_index(node: Node, name: str) -> int | None:
    """Position of the schema argument `name` of an aten node (None if the node has no schema)."""
    schema = node.schema()
    if schema == "(no schema)":
        return None
    arguments = torch._C.parse_schema(schema).arguments
    return next((i for i, arg in enumerate(arguments) if arg.name == name), None)


def prepare_forward_graph(module: torch.jit.ScriptModule) -> Graph:
    """An inlined copy of `module.forward.graph`, rewritten for probing (see module docstring).
    `module` must already be in eval mode so that `self.training` folds to False."""
    graph = module.forward.graph.copy()
    torch._C._jit_pass_inline(graph)
    fold_module_attributes(graph, module._c)
    for _ in range(4):  # each folding round can expose more constant branches
        torch._C._jit_pass_constant_propagation(graph)
        torch._C._jit_pass_cse(graph)
        if not fold_identity_checks(graph):
            break
    # `for _ in range(3): x = layer(x)` becomes three calls, each one probed
    torch._C._jit_pass_constant_loop_unrolling(graph)
    torch._C._jit_pass_constant_propagation(graph)
    torch._C._jit_pass_dce(graph)
    rewrite_inplace_ops(graph)
    force_batch_statistics(graph)
    disable_dropout(graph)
    return graph


def fold_module_attributes(graph: Graph, root: torch._C.ScriptModule) -> None:
    """Replace reads of scalar or None module attributes (`self.training`, `self.norm_first`,
    `self.inplace`, `self.bias_k = None`) by constants, so constant propagation can resolve
    the branches they guard.
    Attributes the graph itself assigns (prim::SetAttr) keep being read at run time."""
    self_value = next(iter(graph.inputs()))
    owners: dict[int, tuple[str, torch._C.ScriptModule]] = {self_value.unique(): ("", root)}
    getattrs = graph.findAllNodes("prim::GetAttr", True)  # program order: owners first
    for node in getattrs:
        owner = owners.get(node.input().unique())
        if owner is None:
            continue
        path, obj = owner
        name = node.s("name")
        child = obj.getattr(name)
        if isinstance(child, torch._C.ScriptModule):
            owners[node.output().unique()] = (f"{path}.{name}", child)
    assigned = set()
    for node in graph.findAllNodes("prim::SetAttr", True):
        if node.inputsAt(0).unique() in owners:
            assigned.add((owners[node.inputsAt(0).unique()][0], node.s("name")))
    for node in getattrs:
        owner = owners.get(node.input().unique())
        if owner is None or (owner[0], node.s("name")) in assigned:
            continue
        value = owner[1].getattr(node.s("name"))
        if value is not None and type(value) not in _SCALAR_ATTRIBUTE_TYPES:
            continue
        with graph.insert_point_guard(node):
            constant = graph.insertConstant(value)
        node.output().replaceAllUsesWith(constant)
        node.destroy()


def fold_identity_checks(graph: Graph) -> bool:
    """`x is x` is True and `x is not x` False: after inlining, `self_attn(x, x, x)` asks
    `query is key` of one value, and folding it keeps attention on its straight-line path."""
    changed = False
    checks = graph.findAllNodes("aten::__is__", True) + graph.findAllNodes("aten::__isnot__", True)
    for node in checks:
        left, right = node.inputs()
        if not _same_object(left, right):
            continue
        with graph.insert_point_guard(node):
            constant = graph.insertConstant(node.kind() == "aten::__is__")
        node.output().replaceAllUsesWith(constant)
        node.destroy()
        changed = True
    return changed


def _same_object(left: Value, right: Value) -> bool:
    """Whether two values are one object on every path: the same value, or two outputs of one
    `if` whose branches each return one value for both."""
    if left.unique() == right.unique():
        return True
    owner = left.node()
    if owner.kind() != "prim::If" or right.node() != owner:
        return False
    i, j = left.offset(), right.offset()
    return all(
        list(branch.outputs())[i].unique() == list(branch.outputs())[j].unique()
        for branch in owner.blocks()
    )


def rewrite_inplace_ops(graph: Graph) -> None:
    """Turn `aten::relu_(x)` and friends into their out-of-place form when that cannot change
    what the program computes: `x` is a fresh tensor (not a view, parameter, buffer or graph
    input) whose earlier uses made no alias of it. Later uses of `x` read the new value."""
    for node in all_nodes(graph):
        kind = node.kind()
        if not kind.startswith("aten::") or not kind.endswith("_") or kind.endswith("__"):
            continue
        if node.outputsSize() != 1 or node.inputsSize() == 0:
            continue
        target = node.inputsAt(0)
        if not _is_private_tensor(target, node):
            continue
        replacement = graph.create(kind[:-1], list(node.inputs()), 1)
        if replacement.schema() == "(no schema)":  # no out-of-place twin (copy_, fill_, ...)
            replacement.destroy()
            continue
        replacement.insertBefore(node)
        replacement.copyMetadata(node)  # keeps the module hierarchy that names the layer
        replacement.output().setType(node.output().type())
        node.output().replaceAllUsesWith(replacement.output())
        target.replaceAllUsesAfterNodeWith(replacement, replacement.output())
        node.destroy()


def _is_private_tensor(value: Value, mutator: Node) -> bool:
    producer = value.node()
    if not isinstance(value.type(), torch._C.TensorType):
        return False
    kind = producer.kind()
    if not kind.startswith("aten::") or kind.endswith("_") or kind in VIEW_OPS:
        return False
    if producer.owningBlock() != mutator.owningBlock():
        return False
    for use in value.uses():
        user = use.user
        if user == mutator or user.isAfter(mutator):
            continue  # later uses are redirected to the out-of-place result
        user_kind = user.kind()
        if not user_kind.startswith("aten::") or user_kind in VIEW_OPS or user_kind.endswith("_"):
            return False
    return True


def force_batch_statistics(graph: Graph) -> None:
    """BatchNorm (and InstanceNorm with tracked statistics) normalise with the batch's own
    statistics, as in a training step. The running buffers are passed as None so that the
    probe never updates them; with batch statistics the output does not depend on them."""
    for node in _nodes_of_kinds(graph, _BATCH_STAT_FLAG):
        _set_argument(graph, node, _BATCH_STAT_FLAG[node.kind()], True)
        _set_argument(graph, node, "running_mean", None)
        _set_argument(graph, node, "running_var", None)


def disable_dropout(graph: Graph) -> None:
    """Dropout off everywhere, including between stacked RNN layers and inside attention."""
    for node in _nodes_of_kinds(graph, _DROPOUT_FLAG):
        _set_argument(graph, node, _DROPOUT_FLAG[node.kind()], False)
    for node in _nodes_of_kinds(graph, _RNN_OPS):
        _set_argument(graph, node, "dropout", 0.0)
        _set_argument(graph, node, "train", True)
    for node in graph.findAllNodes("aten::scaled_dot_product_attention", True):
        _set_argument(graph, node, "dropout_p", 0.0)


def _set_argument(graph: Graph, node: Node, name: str, value: object) -> None:
    index = argument_index(node, name)
    if index is None or index >= node.inputsSize():
        return
    with graph.insert_point_guard(node):
        constant = graph.insertConstant(value)
    node.replaceInput(index, constant)


def retarget_device_constants(graph: Graph, device: torch.device) -> None:
    """Traced graphs record the tracing device in constants (`aten::zeros(..., device=cpu)` for
    an LSTM's initial state) and tensor constants on that device; move both to `device`."""
    for node in graph.findAllNodes("prim::Constant", True):
        if node.outputsSize() != 1:
            continue
        output = node.output()
        output_type = output.type()
        if output_type.kind() == "DeviceObjType":
            new_value: object = device
        elif isinstance(output_type, torch._C.TensorType) and node.hasAttribute("value"):
            tensor = output.toIValue()
            if not isinstance(tensor, torch.Tensor) or tensor.device == device:
                continue
            new_value = tensor.to(device)
        else:
            continue
        with graph.insert_point_guard(node):
            constant = graph.insertConstant(new_value)
        output.replaceAllUsesWith(constant)
        node.destroy()


def return_observed_values(graph: Graph, values: list[Value]) -> None:
    """Make the graph return `(original output, (observed values...))`. A value computed in
    an `if` branch is passed out through the `if` (None when the other branch runs)."""
    hoisted = [_hoist_out_of_branches(graph, value) for value in values]
    observed = graph.create("prim::TupleConstruct", hoisted, 1)
    observed.output().setType(torch._C.TupleType([v.type() for v in hoisted]))
    graph.appendNode(observed)
    original = graph.return_node().inputsAt(0)
    both = graph.create("prim::TupleConstruct", [original, observed.output()], 1)
    both.output().setType(torch._C.TupleType([original.type(), observed.output().type()]))
    graph.appendNode(both)
    graph.return_node().replaceInput(0, both.output())


def _hoist_out_of_branches(graph: Graph, value: Value) -> Value:
    while (owner := value.node().owningBlock().owningNode()) is not None:
        home = value.node().owningBlock()
        for branch in owner.blocks():
            if branch == home:
                branch.registerOutput(value)
                continue
            with graph.insert_point_guard(branch.returnNode()):
                branch.registerOutput(graph.insertConstant(None))
        value = owner.addOutput()
        value.setType(torch._C.OptionalType.ofTensor())
    return value
