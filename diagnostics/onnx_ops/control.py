"""Control flow: If.

The legacy exporter writes an If for Python control flow on sizes it could not fold (timm's
SAM2 Hiera pads its window position embedding `if pad > 0`, a size computed from the input's
shape). Each branch is a small graph that may read values of the enclosing graph by name. The
loader makes those outer values ordinary inputs of the If node (after the condition, in the
order of `Subgraph.outer`), so the main loop schedules and frees them as for any node; the If
then runs the branch its condition picks, operator by operator, with the same registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import torch

from gradprobe.diagnostics.onnx_ops.registry import OpContext, OpResult, lookup, register

OUTER_INPUTS = "outer_inputs"  # attribute the loader adds: names of the If's inputs after cond


class Subgraph:
    """A branch body, decoded once: its steps, its own tensors and the outer values it reads."""

    def __init__(self, graph: onnx.GraphProto, base_dir: Path | None = None) -> None:
        from gradprobe.diagnostics.onnx_ops.attributes import decode_attributes
        from gradprobe.diagnostics.onnx_ops.tensors import tensor_from_proto

        self.name = graph.name
        self.initializers = {t.name: tensor_from_proto(t, base_dir) for t in graph.initializer}
        self.steps = []
        for index, node in enumerate(graph.node):
            name = node.name or f"{graph.name}/{node.op_type}_{index}"
            self.steps.append((lookup(node.op_type, node.domain, name), node.op_type, name,
                               list(node.input), list(node.output),
                               decode_attributes(node, base_dir)))
        self.outputs = [o.name for o in graph.output]
        self.outer = outer_names(graph)

    def run(self, outer: dict[str, torch.Tensor | None], opset: int) -> list[torch.Tensor]:
        values: dict[str, Any] = {**outer, **self.initializers, "": None}
        for fn, op_type, name, inputs, outputs, attrs in self.steps:
            if op_type == "If":
                inputs = inputs + attrs.get(OUTER_INPUTS, [])
            ctx = OpContext(node=name, op_type=op_type, opset=opset, num_outputs=len(outputs))
            result = fn(ctx, [values[v] for v in inputs], attrs)
            results = [result] if isinstance(result, torch.Tensor) else list(result)
            values.update(zip(outputs, results, strict=False))
        return [values[v] for v in self.outputs]


def outer_names(graph: onnx.GraphProto) -> list[str]:
    """Values a graph reads but does not define (nested bodies included), in first-read order."""
    defined = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {""}
    read: list[str] = []
    for node in graph.node:
        reads = list(node.input)
        for attr in node.attribute:
            bodies = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for body in bodies:
                reads += outer_names(body)
        read += [v for v in reads if v not in defined]
        defined.update(node.output)
    read += [o.name for o in graph.output if o.name not in defined]
    return list(dict.fromkeys(read))


def branch_inputs(attrs: dict[str, Any]) -> list[str]:
    """The outer values either branch of an If reads: what the loader appends to its inputs."""
    names: list[str] = []
    for key in ("then_branch", "else_branch"):
        branch = attrs.get(key)
        if isinstance(branch, Subgraph):
            names += branch.outer
    return list(dict.fromkeys(names))


@register("If")
def if_(ctx: OpContext, inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> OpResult:
    condition = inputs[0]
    if condition is None or condition.numel() != 1:
        raise ValueError(f"If at '{ctx.node}': the condition must hold exactly one value")
    outer = dict(zip(attrs.get(OUTER_INPUTS, []), inputs[1:], strict=False))
    # A condition computed from sizes lives on the host, so reading it costs no device sync.
    branch = attrs["then_branch"] if bool(condition.reshape(())) else attrs["else_branch"]
    return branch.run(outer, ctx.opset)
