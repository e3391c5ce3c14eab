"""Load an ONNX file into a `LoadedModel` that our own interpreter runs with torch.

Everything that does not depend on the inputs is decided here, once: node order, operator
functions, decoded attributes, which float initializers are trainable parameters, value slots
and when each value can be freed. `OnnxModel.run` is then a tight loop over prepared steps.

Exporter habits this loader undoes (observed with torch 2.13):
- Both exporters de-duplicate initializers with identical values. The legacy exporter reaches
  the shared tensor through Identity nodes named after each user's parameter (`net.2.weight`);
  the dynamo exporter lets several layers read one initializer directly (all LayerNorms of a
  fresh transformer read `encoder.layers.0.norm1.weight`). Each layer gets its own Parameter
  (a copy), so each has its own gradient; `shared_parameters` records the sharing.
- BatchNorm running statistics and recurrent initial states are float initializers but not
  trainable: they stay constants.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx.inliner
import onnx.shape_inference
import torch

import gradprobe.diagnostics.onnx_ops  # noqa: F401  (registers every operator)
from gradprobe.diagnostics.errors import (
    GradprobeError,
    InputSpecError,
    ModelLoadError,
    ProbeError,
    UnsupportedOperator,
)
from gradprobe.diagnostics.graph import InputSpec, LoadedModel, ProbePoint, Tap
from gradprobe.diagnostics.loaders.onnx_folded_norm import FOLDABLE, batch_renormalised
from gradprobe.diagnostics.loaders.onnx_naming import ScopeNamer, is_anonymous
from gradprobe.diagnostics.loaders.onnx_exponent_rates import onnx_exponent_rates
from gradprobe.diagnostics.loaders.onnx_norm_scales import onnx_normalised_scales
from gradprobe.diagnostics.loaders.onnx_points import GraphNode, GraphView, PointPlan, build_points
from gradprobe.diagnostics.onnx_ops.attributes import decode_attributes
from gradprobe.diagnostics.onnx_ops.control import OUTER_INPUTS, branch_inputs
from gradprobe.diagnostics.onnx_ops.registry import OpContext, OpFn, lookup
from gradprobe.diagnostics.onnx_ops.tensors import onnx_dtype_to_torch, tensor_from_proto
from gradprobe.diagnostics.selection_gates import FlowNode, GateGraph

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}
# (op, input slot) pairs that read a float tensor as state or configuration, not as a weight.
_STATE_SLOTS = {
    ("BatchNormalization", 3), ("BatchNormalization", 4), ("LSTM", 5), ("LSTM", 6),
    ("GRU", 5), ("RNN", 5), ("Resize", 1), ("Resize", 2), ("Upsample", 1), ("Pad", 2),
    ("Clip", 1), ("Clip", 2), ("Dropout", 1), ("Range", 0), ("Range", 1), ("Range", 2),
    ("Shape", 0), ("Size", 0), ("ConstantOfShape", 0),
}
# (op, input slot) pairs that read a layer's own weight or bias.
_LAYER_SLOTS = {
    ("Conv", 1), ("Conv", 2), ("ConvTranspose", 1), ("ConvTranspose", 2), ("Gemm", 1),
    ("Gemm", 2), ("MatMul", 0), ("MatMul", 1), ("LSTM", 1), ("LSTM", 2), ("LSTM", 3),
    ("LSTM", 7), ("GRU", 1), ("GRU", 2), ("GRU", 3), ("RNN", 1), ("RNN", 2), ("RNN", 3),
    ("PRelu", 1), ("Gather", 0), ("BatchNormalization", 1), ("BatchNormalization", 2),
    ("LayerNormalization", 1), ("LayerNormalization", 2), ("GroupNormalization", 1),
    ("GroupNormalization", 2), ("InstanceNormalization", 1), ("InstanceNormalization", 2),
}
# Operators whose trailing outputs are optional extras (BatchNormalization's running
# statistics, LayerNormalization's mean and inverse deviation): when nothing reads them the op
# is told it has fewer outputs, which lets it take torch's fused kernel.
_OPTIONAL_TAIL = {"BatchNormalization", "LayerNormalization"}
# Shape arithmetic (Shape -> Gather -> Unsqueeze -> Concat -> Reshape chains of the legacy
# exporter) depends only on the input shapes and constants: it is computed once for the
# concrete input shapes and reused while they stay the same. An operator whose output shape
# follows the *values* of some inputs (these slots) keeps a static shape only when those values
# are folded too; data-shaped operators never do, nor anything downstream of them.
_SHAPE_FROM_VALUES = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "ConstantOfShape": (0,),
    "Range": (0, 1, 2), "Resize": (1, 2, 3), "Upsample": (1,), "Pad": (1, 3), "TopK": (1,),
    "OneHot": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "ReduceSum": (1,),
    "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,),
    "ReduceL1": (1,), "ReduceL2": (1,), "ReduceLogSum": (1,), "ReduceLogSumExp": (1,),
    "ReduceSumSquare": (1,), "CenterCropPad": (1,), "MaxUnpool": (2,), "Col2Im": (1, 2),
    "AffineGrid": (1,), "DFT": (1, 2), "STFT": (1, 2, 3),
}
_DATA_SHAPED = {"NonZero", "Unique", "Compress", "NonMaxSuppression", "Loop", "If", "Scan"}
_NEVER_FOLDED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                 "Multinomial", "Bernoulli", "Dropout"}
_INDEX_PATH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Transpose"}
# How selection_gates reads an op: the selects, and the ops whose operands can be bounds. A
# scatter writes its updates (slot 2) only at the indices (slot 1), as aten::index_put does:
# the dynamo exporter writes index_put and masked_scatter so (Higgs Audio's audio-token MLP).
_FLOW_OPS = {"Where": "where", "Min": "minmax", "Max": "minmax", "Clip": "clamp",
             "ScatterND": "index_put", "ScatterElements": "index_put"}
_EXTERNAL_DATA_LIMIT = 1 << 30  # write weights beside the file above ~1 GiB of tensors


def load_onnx(source: Path | bytes, *, base_dir: Path | None = None,
              name: str | None = None, self_contained: bool = False,
              as_exported: bool = False) -> OnnxModel:
    """Read an ONNX model (a path, or the file's bytes) and prepare it for probing.

    External data is read from `base_dir` (default: the file's folder); bytes that refer to
    external data need `base_dir`. `self_contained` refuses external data outright (the server:
    an upload that points at a file would read whatever the server's folder holds). Raises
    ModelLoadError for anything that is not a readable, consistent ONNX model and
    UnsupportedOperator for an operator outside the default domain or the interpreter.
    `as_exported` runs convolutions with a folded BatchNorm exactly as the file says, instead of
    re-normalising them on batch statistics as training would (onnx_folded_norm): what a
    comparison with onnxruntime needs.
    """
    label, model, base_dir, path = _read(source, None if self_contained else base_dir, name,
                                         self_contained)
    return _Builder(label, model, base_dir, path, renormalise_folded=not as_exported).build()


# --- reading --------------------------------------------------------------------------------

def _read(source: Path | bytes, base_dir: Path | None, name: str | None,
          self_contained: bool = False) -> tuple[str, onnx.ModelProto, Path | None, str | None]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or "uploaded model"
        path = None
    else:
        file = Path(source)
        label = name or str(file)
        path = str(file)
        if not file.exists():
            raise ModelLoadError(f"{label}: no such file")
        if file.is_dir():
            raise ModelLoadError(f"{label} is a directory, not an ONNX file")
        try:
            data = file.read_bytes()
        except OSError as err:
            raise ModelLoadError(f"{label}: cannot read the file ({err.strerror})") from None
        if not self_contained:
            base_dir = base_dir if base_dir is not None else file.parent
    if not data:
        raise ModelLoadError(f"{label} is empty, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:  # protobuf raises DecodeError, RuntimeWarning-ish errors, ValueError
        if _starts_like_onnx(data):
            raise ModelLoadError(
                f"{label}: truncated or corrupted ONNX file (it starts like one, but the "
                f"{len(data)} bytes do not parse)"
            ) from None
        raise ModelLoadError(f"{label}: not an ONNX model (the bytes are not an ONNX protobuf)") \
            from None
    del data
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise ModelLoadError(f"{label}: not an ONNX model (no graph or no nodes in it)")
    if not any(op.domain in ("", "ai.onnx") for op in model.opset_import):
        raise ModelLoadError(
            f"{label}: no opset for the default ONNX domain (truncated or not an ONNX model)")
    if self_contained:
        _refuse_external_data(model, label)
    if model.functions:
        _check_function_size(model, label)
        try:
            model = onnx.inliner.inline_local_functions(model)
        except Exception as err:
            raise ModelLoadError(f"{label}: cannot inline its local functions ({_line(err)})") \
                from None
    _check_domains(model.graph, label)
    return label, model, base_dir, path


def _refuse_external_data(model: onnx.ModelProto, label: str) -> None:
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            raise ModelLoadError(
                f"{label}: tensor '{_short(tensor.name)}' is stored in external data "
                f"('{_short(location)}'); this server takes self-contained models only "
                "(the gradprobe client inlines external data before it uploads)")


def _all_tensors(model: onnx.ModelProto):  # noqa: ANN202  (a generator of TensorProto)
    graph = model.graph
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in [*graph.node, *(n for f in model.functions for n in f.node)]:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield attribute.sparse_tensor.values
                yield attribute.sparse_tensor.indices


# Inlining model-local functions multiplies nodes (a function that calls another twice, ten
# levels deep, is a thousand nodes): bound the result before building it.
_MAX_INLINED_NODES = 1_000_000


def _check_function_size(model: onnx.ModelProto, label: str) -> None:
    functions = {(f.domain, f.name): f for f in model.functions}
    sizes: dict[tuple[str, str], int] = {}

    def expanded(key: tuple[str, str], depth: int) -> int:
        if key in sizes:
            return sizes[key]
        if depth > len(functions):  # recursion: the inliner names it
            return 0
        total = sum(expanded((n.domain, n.op_type), depth + 1)
                    if (n.domain, n.op_type) in functions else 1 for n in functions[key].node)
        sizes[key] = min(total, _MAX_INLINED_NODES + 1)
        return sizes[key]

    total = sum(expanded((n.domain, n.op_type), 0) if (n.domain, n.op_type) in functions else 1
                for n in model.graph.node)
    if total > _MAX_INLINED_NODES:
        raise ModelLoadError(f"{label}: its local functions expand to more than "
                             f"{_MAX_INLINED_NODES} nodes")


def _check_domains(graph: onnx.GraphProto, label: str) -> None:
    """Only the default ONNX domain runs: a custom domain is somebody's library."""
    for index, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedOperator(f"{_short(node.domain)}::{_short(node.op_type)}",
                                      _short(node.name or f"{node.op_type}_{index}"),
                                      "only operators of the default ONNX domain run")


def _short(text: str, limit: int = 200) -> str:
    """Names from the file reach error messages: keep them bounded."""
    return text if len(text) <= limit else text[:limit] + "..."


def _starts_like_onnx(data: bytes) -> bool:
    """A ModelProto begins with field 1 (ir_version, a small varint): bytes 0x08, 1..15."""
    return len(data) >= 2 and data[0] == 0x08 and 1 <= data[1] <= 15


def _line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# --- building -------------------------------------------------------------------------------

@dataclass
class _Binding:
    """Where a parameter lives in the file, so `save` can write it back."""

    file_tensor: str  # the initializer it was read from
    identity_node: int | None = None  # Identity node (proto index) whose output it replaces
    retarget: list[tuple[int, int]] = field(default_factory=list)  # (proto node, input slot)


@dataclass(frozen=True)
class _Plan:
    steps: list[tuple[Any, ...]]
    n_slots: int
    slots: dict[str, int]
    input_slots: tuple[int, ...]
    output_slots: tuple[int, ...]
    static: frozenset[int] = frozenset()  # steps computed once per input signature
    dynamic_steps: list[tuple[Any, ...]] = field(default_factory=list)  # the rest


class _Builder:
    def __init__(self, label: str, model: onnx.ModelProto, base_dir: Path | None,
                 path: str | None, renormalise_folded: bool = True) -> None:
        self.label = label
        self.renormalise_folded = renormalise_folded
        self.model = model
        self.graph = model.graph
        self.base_dir = base_dir
        self.path = path
        self.opset = max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))
        self.notes: list[str] = []

    def build(self) -> OnnxModel:
        graph = self.graph
        names = _node_names(graph.node)
        fns = [lookup(n.op_type, n.domain, names[i]) for i, n in enumerate(graph.node)]
        init_types = {t.name: t.data_type for t in graph.initializer}
        init_order = [t.name for t in graph.initializer]
        try:
            attrs = [decode_attributes(n, self.base_dir) for n in graph.node]
            tensors = {t.name: tensor_from_proto(t, self.base_dir) for t in graph.initializer}
        except ModelLoadError as err:
            raise ModelLoadError(f"{self.label}: {err}") from None
        graph.ClearField("initializer")  # the tensors now hold the data; `save` rebuilds these
        skeleton = _skeleton(self.model, tensors, init_types)
        self._check(skeleton)
        inputs = [vi for vi in graph.input if vi.name not in tensors]
        # An If reads the enclosing graph's values inside its branches: they become inputs of
        # the node itself, so ordering and freeing see them.
        outer = {i: branch_inputs(attrs[i]) for i, n in enumerate(graph.node) if n.op_type == "If"}
        for i, names_read in outer.items():
            attrs[i][OUTER_INPUTS] = names_read
        order = _topological_order(graph, {vi.name for vi in inputs} | set(tensors), names,
                                   self.label, outer)

        constants, aliases, run_order = self._fold_static(order, names, fns, attrs, tensors)
        namer = ScopeNamer([graph.node[i] for i in run_order], [*tensors, *aliases])
        nodes = [
            GraphNode(index=k, op_type=graph.node[i].op_type, name=names[i],
                      inputs=[*graph.node[i].input, *outer.get(i, [])],
                      outputs=list(graph.node[i].output),
                      attrs=attrs[i], proto=graph.node[i], scope=namer.scope(k))
            for k, i in enumerate(run_order)
        ]
        params, bindings = self._parameters(nodes, run_order, tensors, init_types, aliases,
                                            constants)
        view = GraphView(nodes=nodes, params=params, constants=constants,
                         ranks=_ranks(skeleton), opset=self.opset)
        plans = build_points(view)
        specs = [_input_spec(vi, view) for vi in inputs]
        outputs = [o.name for o in graph.output]
        for out in outputs:
            if out not in view.producer and out not in params and out not in constants \
                    and out not in {vi.name for vi in inputs}:
                raise ModelLoadError(f"{self.label}: graph output '{out}' is never computed "
                                     "(truncated or broken file)")
        plan = _compile(nodes, [fns[i] for i in run_order], self.opset, plans, params,
                        constants, [vi.name for vi in inputs], outputs,
                        renormalise_folded=self.renormalise_folded)
        self._note_exports(plans, nodes, bindings)
        reader_layers = _reader_layers(bindings, plans, nodes)
        integer_inputs = [spec.name for spec in specs
                          if spec.dtype is not None and not spec.dtype.is_floating_point]
        flow = GateGraph([FlowNode(f"{n.op_type}@{n.scope or n.name}",
                                   _FLOW_OPS.get(n.op_type, ""),
                                   tuple(n.inputs), tuple(n.outputs)) for n in nodes],
                         integer_inputs, outputs, {name: (name,) for name in params})
        return OnnxModel(
            path=self.path, parameters=params, inputs=specs,
            probe_points=[p.point for p in plans],
            shared_parameters=_shared(bindings, reader_layers), parameter_layers=reader_layers,
            notes=self.notes, model=self.model, plan=plan, constants=constants,
            init_order=init_order, init_types=init_types,
            file_tensors={n: t for n, t in tensors.items()  # only what nothing else holds
                          if n not in params and n not in constants},
            bindings=bindings, label=self.label, flow=flow,
            trainable_zero_starts=onnx_normalised_scales(view) | onnx_exponent_rates(view),
        )

    def _check(self, skeleton: onnx.ModelProto) -> None:
        """onnx.checker findings that do not stop the interpreter become notes; what stops it
        (undefined values, cycles, unsupported ops, bad tensors) is an error of its own."""
        try:
            onnx.checker.check_model(skeleton)
        except Exception as err:  # ValidationError, or C++ errors on odd files
            self.notes.append(f"onnx.checker: {_line(err)}")

    def _fold_static(self, order: list[int], names: list[str], fns: list[OpFn],
                     attrs: list[dict[str, Any]], tensors: dict[str, torch.Tensor],
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[int]]:
        """Evaluate Constant nodes once and resolve Identity-of-initializer aliases; what is
        left is what `run` executes."""
        constants: dict[str, torch.Tensor] = {}
        aliases: dict[str, str] = {}  # Identity output -> the initializer it copies
        run_order = []
        for i in order:
            node = self.graph.node[i]
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                ctx = OpContext(names[i], node.op_type, self.opset, len(node.output))
                try:
                    value = fns[i](ctx, [], attrs[i])
                except GradprobeError:
                    raise
                except Exception as err:
                    raise ModelLoadError(f"{self.label}: Constant node '{names[i]}' is "
                                         f"malformed ({_line(err)})") from None
                constants[node.output[0]] = value if isinstance(value, torch.Tensor) else value[0]
                continue
            if node.op_type == "Identity" and len(node.input) == 1 and node.output:
                src = node.input[0]
                root = aliases.get(src, src if src in tensors else None)
                if root is not None:
                    aliases[node.output[0]] = root
                    continue
                if src in constants:
                    constants[node.output[0]] = constants[src]
                    continue
            run_order.append(i)
        return constants, aliases, run_order

    def _parameters(self, nodes: list[GraphNode], run_order: list[int],
                    tensors: dict[str, torch.Tensor], init_types: dict[str, int],
                    aliases: dict[str, str], constants: dict[str, torch.Tensor],
                    ) -> tuple[dict[str, torch.nn.Parameter], dict[str, _Binding]]:
        uses: dict[str, list[tuple[GraphNode, int]]] = {}
        for node in nodes:
            for slot, value in enumerate(node.inputs):
                if value in tensors or value in aliases:
                    uses.setdefault(value, []).append((node, slot))
        identity_of = {self.graph.node[i].output[0]: i for i in range(len(self.graph.node))
                       if self.graph.node[i].output and self.graph.node[i].output[0] in aliases}

        taken = set(tensors) | set(aliases) | {o for n in nodes for o in n.outputs}
        taken |= {vi.name for vi in self.graph.input}
        params: dict[str, torch.nn.Parameter] = {}
        bindings: dict[str, _Binding] = {}
        sources = list(dict.fromkeys(v for n in nodes for v in n.inputs
                                     if v in tensors or v in aliases))  # first-use order
        for source in sources:
            root = aliases.get(source, source)
            tensor = tensors[root]
            if not _is_parameter(source, tensor, init_types[root], uses[source]):
                constants[source] = tensor
                continue
            groups = _group_by_scope(uses[source])
            uniform = tensor.numel() > 1 and bool((tensor == tensor.reshape(-1)[0]).all())
            canonical = _canonical_group(source, groups)
            parts = [(key, part, part_uses) for key, group_uses in groups.items()
                     for part, part_uses in enumerate(_split_repeated_reads(group_uses, uniform))]
            for key, part, group_uses in parts:
                if key == canonical and part == 0:
                    name = source
                    binding = _Binding(root, identity_node=identity_of.get(source))
                else:
                    name = _untied_name(source, key, canonical, taken)
                    taken.add(name)
                    binding = _Binding(root, identity_node=None, retarget=[
                        (run_order[node.index], slot) for node, slot in group_uses])
                    for node, slot in group_uses:
                        node.inputs[slot] = name
                # the first reader of a file tensor shares its memory; copies for the rest
                value = (tensor if key == canonical and part == 0 and source == root
                         else tensor.clone())
                params[name] = torch.nn.Parameter(value, requires_grad=True)
                bindings[name] = binding
        reads = [v for n in nodes for v in n.inputs]  # after untying: list params by first use
        first_use = {v: i for i, v in reversed(list(enumerate(reads)))}
        params = dict(sorted(params.items(), key=lambda item: first_use.get(item[0], 0)))
        for out in self.graph.output:  # an output that is an initializer as is
            root = aliases.get(out.name, out.name)
            if root in tensors and out.name not in params:
                constants.setdefault(out.name, tensors[root])
        return params, bindings

    def _note_exports(self, plans: list[PointPlan], nodes: list[GraphNode],
                      bindings: dict[str, _Binding]) -> None:
        folded = [p.point for p in plans if p.point.folded_batchnorm]
        if folded:
            ops = sorted({p.op for p in folded})
            self.notes.append(
                f"BatchNorm folded into {len(folded)} {'/'.join(ops)} layer(s) at export (eval "
                "mode): the probe re-normalises their outputs with batch statistics (scale 1, "
                "folded shift kept), as training-mode BatchNorm would")
        eval_bn = [n for n in nodes if n.op_type == "BatchNormalization"
                   and not n.attrs.get("training_mode", 0)]
        if eval_bn:
            self.notes.append(
                f"{len(eval_bn)} BatchNormalization node(s) were exported in eval mode: the "
                "probe runs them on batch statistics, as in training")
        untied = {b.file_tensor for name, b in bindings.items() if name != b.file_tensor}
        if untied:
            self.notes.append(
                f"{len(untied)} initializer(s) are shared by several layers in the file "
                "(the exporter merges equal values): each layer gets its own parameter")


def _skeleton(model: onnx.ModelProto, tensors: Mapping[str, torch.Tensor],
              init_types: Mapping[str, int]) -> onnx.ModelProto:
    """The graph without its weights (float initializers become typed inputs), small enough
    to hand to onnx.checker and shape inference whatever the model's size."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for name, tensor in tensors.items():
        elem = init_types[name]
        if elem in _FLOAT_TYPES or tensor.numel() > 4096:
            skeleton.graph.input.append(
                onnx.helper.make_tensor_value_info(name, elem, list(tensor.shape)))
        else:
            skeleton.graph.initializer.append(_tensor_proto(name, tensor, elem))
    return skeleton


def _ranks(skeleton: onnx.ModelProto) -> dict[str, int]:
    """Value ranks from ONNX shape inference; a help for naming axes, never a requirement."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False,
                                                     data_prop=True)
    except Exception:
        inferred = skeleton
    ranks = {}
    g = inferred.graph
    for vi in [*g.value_info, *g.input, *g.output]:
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            ranks[vi.name] = len(tt.shape.dim)
    return ranks


def _node_names(nodes: Sequence[onnx.NodeProto]) -> list[str]:
    """Node names, made up (`Relu_12`) where the file has none, and made unique."""
    seen: set[str] = set()
    result = []
    for i, node in enumerate(nodes):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        result.append(name)
    return result


def _topological_order(graph: onnx.GraphProto, available: set[str], names: list[str],
                       label: str, extra_inputs: Mapping[int, list[str]] | None = None,
                       ) -> list[int]:
    """Node indices in an order where every input exists before it is read (file order when
    the file is already sorted, as exporters write it). `extra_inputs`: values a node reads
    besides its inputs (an If's branches read the enclosing graph)."""
    extra_inputs = extra_inputs or {}
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if not out:
                continue
            if out in producer or out in available:
                raise ModelLoadError(f"{label}: value '{out}' is produced twice (node "
                                     f"'{names[i]}'): broken graph")
            producer[out] = i
    waiting: list[int] = []
    dependents: dict[int, list[int]] = {}
    for i, node in enumerate(graph.node):
        count = 0
        for value in {*node.input, *extra_inputs.get(i, [])}:
            if not value or value in available:
                continue
            if value not in producer:
                raise ModelLoadError(
                    f"{label}: node '{names[i]}' reads '{value}', which no node, input or "
                    "initializer provides (truncated or broken file)")
            dependents.setdefault(producer[value], []).append(i)
            count += 1
        waiting.append(count)
    ready = [i for i, c in enumerate(waiting) if c == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in dependents.get(i, ()):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(graph.node):
        stuck = next(names[i] for i, c in enumerate(waiting) if c > 0)
        raise ModelLoadError(f"{label}: the graph has a cycle (at node '{stuck}')")
    return order


def _is_parameter(name: str, tensor: torch.Tensor, elem_type: int,
                  uses: list[tuple[GraphNode, int]]) -> bool:
    """Trainable: a float initializer read as data, not as state (BN running stats, RNN
    initial state), configuration (Clip bounds, Resize scales) or a lone anonymous scalar."""
    if elem_type not in _FLOAT_TYPES or not uses:
        return False
    slots = [(node.op_type, slot) for node, slot in uses]
    if all(s in _STATE_SLOTS for s in slots):
        return False
    # an anonymous scalar is an attention scale or an epsilon the exporter lifted
    lone_scalar = tensor.numel() <= 1 and is_anonymous(name)
    return not lone_scalar or any(s in _LAYER_SLOTS for s in slots)


Uses = list[tuple[GraphNode, int]]


def _group_by_scope(uses: Uses) -> dict[str | None, Uses]:
    """Readers of one tensor by module path: readers in different modules are different
    layers that the exporter made share equal values."""
    groups: dict[str | None, Uses] = {}
    for node, slot in uses:
        groups.setdefault(node.scope, []).append((node, slot))
    if None in groups and len(groups) > 1:  # unknown scope: keep with the first known one
        unknown = groups.pop(None)
        next(iter(groups.values())).extend(unknown)
    return groups


def _split_repeated_reads(uses: Uses, uniform: bool) -> list[Uses]:
    """Exporters store equal constants once, so one module may read one tensor in two roles:
    the dynamo exporter gives nf_seresnet's weight-standardisation BatchNormalization one zero
    tensor as both its scale (the zero-init gain, folded) and its shift, and a GroupNorm's zero
    scale and zero shift one tensor that a Mul and an Add read. Each further slot of one node
    gets its own copy, so resetting the scale leaves the shift alone, and so does each further
    role (op and slot) of a `uniform` tensor (every entry equal: only a constant fill collides
    with another parameter; a random weight read twice, as weight standardisation reads it, is
    one tensor). Reads as state (running statistics) stay with the first."""
    parts: list[Uses] = []
    role_part: dict[tuple[str, int], int] = {}
    slots_taken: dict[int, int] = {}  # node index -> its data slots placed so far
    for node, slot in uses:
        k = 0
        if (node.op_type, slot) not in _STATE_SLOTS:
            if uniform:
                k = role_part.setdefault((node.op_type, slot), len(role_part))
            k = max(k, slots_taken.get(node.index, 0))
            slots_taken[node.index] = k + 1
        while len(parts) <= k:
            parts.append([])
        parts[k].append((node, slot))
    return parts


def _canonical_group(name: str, groups: Mapping[str | None, Any]) -> str | None:
    """The readers that keep the file's name: the module that owns it by name, else the
    first reader."""
    owners = [k for k in groups if k is not None and (k == "" or name.startswith(k + "."))]
    if owners:
        return max(owners, key=len)
    return next(iter(groups))


def _untied_name(name: str, scope: str | None, canonical: str | None, taken: set[str]) -> str:
    """`encoder.layers.0.norm1.weight` read by `encoder.layers.1.norm2` ->
    `encoder.layers.1.norm2.weight`: the parameter that module had before the export."""
    candidate = None
    if scope is not None and not is_anonymous(name):
        if canonical is not None and (canonical == "" or name.startswith(canonical + ".")):
            relative = name[len(canonical) + 1:] if canonical else name
        else:
            relative = name.rsplit(".", 1)[-1]
        candidate = f"{scope}.{relative}" if scope else relative
    if candidate is None or candidate in taken:
        base = candidate or name
        k = 2
        while f"{base}#{k}" in taken:
            k += 1
        candidate = f"{base}#{k}"
    return candidate


def _shared(bindings: dict[str, _Binding],
            layer_of: dict[str, str]) -> dict[str, list[str]]:
    """Parameter -> layers that read one tensor in the file, for tensors read by several."""
    members: dict[str, list[str]] = {}
    for name, binding in bindings.items():
        members.setdefault(binding.file_tensor, []).append(name)
    shared = {}
    for group in members.values():
        if len(group) > 1:
            layers = list(dict.fromkeys(layer_of.get(p, p) for p in group))
            for p in group:
                shared[p] = layers
    return shared


def _reader_layers(bindings: dict[str, _Binding], plans: list[PointPlan],
                   nodes: list[GraphNode]) -> dict[str, str]:
    """Parameter -> the layer that reads it: the probe point that owns it, else the module
    scope of the first node reading it (a legacy export writes GroupNorm as
    InstanceNormalization then a Mul by an anonymous `onnx::Mul_27`, read in `layer_norm`)."""
    layer_of: dict[str, str] = {}
    for plan in plans:
        for param in plan.point.parameters:
            layer_of.setdefault(param, plan.point.layer)
    for node in nodes:
        for value in node.inputs:
            if value in bindings and value not in layer_of:
                layer_of[value] = node.scope or node.name
    return layer_of


def _input_spec(vi: onnx.ValueInfoProto, view: GraphView) -> InputSpec:
    if not vi.type.HasField("tensor_type"):
        raise InputSpecError(f"input '{vi.name}' is not a tensor (sequences and maps are not "
                             "supported)")
    tt = vi.type.tensor_type
    shape = None
    if tt.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tt.shape.dim)
    dtype = onnx_dtype_to_torch(tt.elem_type) if tt.elem_type else None
    value_range = None
    if dtype is not None and not dtype.is_floating_point and dtype != torch.bool:
        size = _index_range(view, vi.name)
        value_range = (0, size) if size else None
    return InputSpec(name=vi.name, shape=shape, dtype=dtype, value_range=value_range)


def _index_range(view: GraphView, name: str) -> int | None:
    """Smallest table size an integer input indexes (through casts and reshapes)."""
    sizes = []
    frontier, seen = [name], {name}
    while frontier:
        value = frontier.pop()
        for user, slot in view.consumers.get(value, []):
            node = view.nodes[user]
            if node.op_type == "Gather" and slot == 1 and node.attrs.get("axis", 0) == 0:
                table = node.inputs[0]
                static = view.params.get(table)
                static = static if static is not None else view.constants.get(table)
                if static is not None and static.dim() >= 1:
                    sizes.append(int(static.shape[0]))
            elif node.op_type in _INDEX_PATH and slot == 0:
                for out in node.outputs:
                    if out and out not in seen:
                        seen.add(out)
                        frontier.append(out)
    return min(sizes) if sizes else None


def _compile(nodes: list[GraphNode], fns: list[OpFn], opset: int, plans: list[PointPlan],
             params: Mapping[str, torch.Tensor], constants: Mapping[str, torch.Tensor],
             inputs: list[str], outputs: list[str], *, renormalise_folded: bool = True) -> _Plan:
    """Steps over integer slots: (fn, ctx, attrs, input slots, output slots, taps, frees).
    Slot 0 always holds None (omitted optional inputs); slot 1 takes unnamed outputs."""
    slots: dict[str, int] = {}

    def slot_of(value: str) -> int:
        if not value:
            return 0
        if value not in slots:
            slots[value] = len(slots) + 2
        return slots[value]

    for value in [*params, *constants, *inputs]:
        slot_of(value)
    keep = {slots[v] for v in [*params, *constants]}
    last_use: dict[int, int] = {}
    for node in nodes:
        for value in node.inputs:
            if value:
                last_use[slot_of(value)] = node.index
        for value in node.outputs:
            slot_of(value)
    output_slots = tuple(slot_of(v) for v in outputs)
    keep |= set(output_slots)
    taps: dict[int, list[tuple[ProbePoint, int]]] = {}
    for plan in plans:
        taps.setdefault(plan.step, []).append((plan.point, slots[plan.value]))
    frees: dict[int, list[int]] = {}
    for slot, index in last_use.items():
        if slot not in keep:
            frees.setdefault(index, []).append(slot)
    steps = []
    for node, fn in zip(nodes, fns, strict=True):
        outs = tuple(slot_of(v) if v else 1 for v in node.outputs) or (1,)
        unread = [s for s in outs if s not in last_use and s not in keep]
        num_outputs = len(node.outputs)
        if node.op_type in _OPTIONAL_TAIL:
            while num_outputs > 1 and (not node.outputs[num_outputs - 1]
                                       or outs[num_outputs - 1] in unread):
                num_outputs -= 1
        ctx = OpContext(node=node.name, op_type=node.op_type, opset=opset,
                        num_outputs=num_outputs, training=True)
        if renormalise_folded and node.op_type in FOLDABLE and any(point.folded_batchnorm
                                            for point, _ in taps.get(node.index, ())):
            fn = batch_renormalised(fn)
        steps.append((fn, ctx, node.attrs, tuple(slot_of(v) for v in node.inputs), outs,
                      tuple(taps.get(node.index, ())),
                      tuple(dict.fromkeys(frees.get(node.index, []) + unread))))
    static = _static_steps(nodes, inputs, params, constants, taps)
    return _Plan(steps=steps, n_slots=len(slots) + 2, slots=slots,
                 input_slots=tuple(slots[v] for v in inputs), output_slots=output_slots,
                 static=static, dynamic_steps=_without(steps, static))


def _static_steps(nodes: list[GraphNode], inputs: list[str], params: Mapping[str, torch.Tensor],
                  constants: Mapping[str, torch.Tensor], taps: Mapping[int, Any]) -> frozenset[int]:
    """Steps whose outputs depend only on the input shapes and constants."""
    shaped = {*inputs, *params, *constants}  # shape fixed by the input shapes
    folded = set(constants)  # value fixed by the input shapes
    static = set()
    for k, node in enumerate(nodes):
        ins = [v for v in node.inputs if v]
        value_slots = [node.inputs[i] for i in _SHAPE_FROM_VALUES.get(node.op_type, ())
                       if i < len(node.inputs) and node.inputs[i]]
        if node.op_type in _DATA_SHAPED or not all(v in shaped for v in ins) \
                or not all(v in folded for v in value_slots):
            continue
        shaped.update(o for o in node.outputs if o)
        reads_values = node.op_type not in ("Shape", "Size") or \
            node.proto.domain not in ("", "ai.onnx")
        if k in taps or node.op_type in _NEVER_FOLDED or \
                (reads_values and not all(v in folded for v in ins)):
            continue
        folded.update(o for o in node.outputs if o)
        static.add(k)
    return frozenset(static)


def _without(steps: list[tuple[Any, ...]], static: frozenset[int]) -> list[tuple[Any, ...]]:
    """The steps left once the static ones are folded; a skipped step's frees move to the
    step before it (its inputs were last read there at the latest)."""
    kept: list[tuple[Any, ...]] = []
    carried: tuple[int, ...] = ()
    for k, step in enumerate(steps):
        if k in static:
            if kept:
                prev = kept[-1]
                kept[-1] = (*prev[:6], tuple(dict.fromkeys(prev[6] + step[6])))
            else:
                carried += step[6]
            continue
        if carried:
            step = (*step[:6], tuple(dict.fromkeys(carried + step[6])))
            carried = ()
        kept.append(step)
    return kept


def _tensor_proto(name: str, tensor: torch.Tensor, elem_type: int) -> onnx.TensorProto:
    """A torch tensor as an ONNX initializer of `elem_type`, bytes as stored (little-endian)."""
    t = tensor.detach().to("cpu", onnx_dtype_to_torch(elem_type)).contiguous()
    proto = onnx.TensorProto()
    proto.name = name
    proto.data_type = elem_type
    proto.dims.extend(int(d) for d in t.shape)
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return proto  # no bytes (an empty array read from the file may carry stride 0)
    if flat.stride(0) != 1:  # a size-1 axis may carry any stride, so contiguous() kept it
        flat = flat.clone(memory_format=torch.contiguous_format)
    proto.raw_data = flat.view(torch.uint8).numpy().tobytes()
    return proto


# --- the model ------------------------------------------------------------------------------

class OnnxModel(LoadedModel):
    """An ONNX graph run by our interpreter: BatchNorm on batch statistics, dropout off."""

    def __init__(self, *, path: str | None, parameters: dict[str, torch.nn.Parameter],
                 inputs: list[InputSpec], probe_points: list[ProbePoint],
                 shared_parameters: dict[str, list[str]], parameter_layers: dict[str, str],
                 notes: list[str], model: onnx.ModelProto, plan: _Plan,
                 constants: dict[str, torch.Tensor], init_order: list[str],
                 init_types: dict[str, int], file_tensors: dict[str, torch.Tensor],
                 bindings: dict[str, _Binding], label: str, flow: GateGraph,
                 trainable_zero_starts: frozenset[str] = frozenset()) -> None:
        super().__init__(format="onnx", path=path, parameters=parameters, inputs=inputs,
                         probe_points=probe_points, shared_parameters=shared_parameters,
                         parameter_layers=parameter_layers, notes=notes)
        self._model = model  # the file without its initializers (the tensors hold them)
        self._plan = plan
        self._constants = constants
        self._init_order = init_order
        self._init_types = init_types
        self._file_tensors = file_tensors
        self._bindings = bindings
        self._label = label
        self._flow = flow
        self._trainable_zero_starts = trainable_zero_starts
        self._template: list[torch.Tensor | None] = []
        # Outputs of the static steps for the input signature they were computed for.
        self._folded_for: tuple[Any, ...] | None = None
        self._folded: list[tuple[int, Any]] = []
        self._fill_template()

    def copies_of(self, name: str) -> list[str]:
        binding = self._bindings.get(name)
        if binding is None:
            return [name]
        return [n for n, b in self._bindings.items() if b.file_tensor == binding.file_tensor]

    def selection_gate(self, name: str) -> str | None:
        return self._flow.gate(name)

    def bound_of(self, name: str) -> str | None:
        return self._flow.bound_of(name)

    def fill_of(self, name: str) -> str | None:
        return self._flow.fill_of(name)

    def trainable_zero_start(self, name: str) -> bool:
        return name in self._trainable_zero_starts

    def _fill_template(self) -> None:
        template: list[torch.Tensor | None] = [None] * self._plan.n_slots
        slots = self._plan.slots
        for name, tensor in self._constants.items():
            if name in slots:
                template[slots[name]] = tensor
        for name, param in self.parameters.items():
            template[slots[name]] = param
        self._template = template

    def run(self, inputs: Sequence[torch.Tensor], tap: Tap | None = None) -> list[torch.Tensor]:
        plan = self._plan
        if len(inputs) != len(plan.input_slots):
            raise InputSpecError(
                f"{self._label} takes {len(plan.input_slots)} input(s) "
                f"({', '.join(s.name for s in self.inputs)}), got {len(inputs)}")
        values = list(self._template)
        for slot, value in zip(plan.input_slots, inputs, strict=True):
            values[slot] = value
        steps, record = plan.steps, ()
        if plan.static:
            signature = tuple((tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor)
                              else None for t in inputs)
            if signature == self._folded_for:
                steps = plan.dynamic_steps
                for slot, value in self._folded:
                    values[slot] = value
            else:
                record = plan.static
                folded: list[tuple[int, Any]] = []
        tensor = torch.Tensor
        for k, (fn, ctx, attrs, ins, outs, taps, frees) in enumerate(steps):
            try:
                result = fn(ctx, [values[i] for i in ins], attrs)
            except GradprobeError:
                raise
            except Exception as err:
                raise ProbeError(
                    f"node '{ctx.node}' ({ctx.op_type}) failed: {_line(err)}") from err
            if isinstance(result, tensor):
                values[outs[0]] = result
            else:
                for slot, value in zip(outs, result, strict=False):
                    values[slot] = value
            if taps and tap is not None:
                for point, slot in taps:
                    tap(point, values[slot])
            if record and k in record:
                folded += [(slot, values[slot]) for slot in outs if slot > 1]
            for slot in frees:
                values[slot] = None
        if record:
            self._folded, self._folded_for = folded, signature
        return [values[s] for s in plan.output_slots]

    def to(self, device: torch.device) -> OnnxModel:
        device = torch.device(device)
        with torch.no_grad():
            for name, param in self.parameters.items():
                moved = param.data.to(device)
                # like nn.Module.to: keep the Parameter object where the tensor types allow
                if torch._has_compatible_shallow_copy_type(param, moved):
                    param.data = moved
                else:
                    self.parameters[name] = torch.nn.Parameter(moved, param.requires_grad)
        for name, tensor in self._constants.items():
            if tensor.is_floating_point():  # integer constants are shapes/indices: CPU
                self._constants[name] = tensor.to(device)
        self._folded_for, self._folded = None, []  # computed from the constants just moved
        self._fill_template()
        return self

    def save(self, path: Path, values: Mapping[str, torch.Tensor]) -> None:
        unknown = [name for name in values if name not in self.parameters]
        if unknown:
            raise ValueError(f"no parameter named {', '.join(repr(n) for n in unknown)}")
        for name, value in values.items():
            if tuple(value.shape) != tuple(self.parameters[name].shape):
                raise ValueError(f"parameter '{name}' has shape "
                                 f"{list(self.parameters[name].shape)}, got {list(value.shape)}")
        model = onnx.ModelProto()
        model.CopyFrom(self._model)
        graph = model.graph

        def current(name: str) -> torch.Tensor:
            return values[name] if name in values else self.parameters[name]

        for name in self._init_order:
            if name in self.parameters:
                value = current(name)
            else:
                # not .get(name, default): the default would be evaluated (and fail) eagerly
                value = self._constants[name] if name in self._constants else \
                    self._file_tensors[name]
            graph.initializer.append(_tensor_proto(name, value, self._init_types[name]))

        # Parameters untied from a shared tensor get initializers of their own once any of
        # them changes; unchanged groups stay shared as in the file.
        changed = {self._bindings[name].file_tensor for name in values}
        dropped: set[int] = set()
        for name, binding in self._bindings.items():
            if binding.file_tensor not in changed or name == binding.file_tensor:
                continue
            graph.initializer.append(
                _tensor_proto(name, current(name), self._init_types[binding.file_tensor]))
            if binding.identity_node is not None:
                dropped.add(binding.identity_node)
            for node_index, slot in binding.retarget:
                graph.node[node_index].input[slot] = name
        for index in sorted(dropped, reverse=True):
            del graph.node[index]

        path = Path(path)
        size = sum(len(t.raw_data) for t in graph.initializer)
        if size > _EXTERNAL_DATA_LIMIT:
            onnx.save_model(model, str(path), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=f"{path.name}.data")
        else:
            onnx.save_model(model, str(path))
