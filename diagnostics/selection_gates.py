"""Where a parameter reaches the output only through a selection the input decides.

`torch.where(input_ids == bos_id, bos_embedding, embeds)` passes a learnt BOS vector on only
at the positions that hold that token; a probe batch of random tokens may hold none, and the
vector then gets exactly zero gradient although the model trains it on every real sequence.
That zero says something about the batch, not the model. This module finds such gates in a
graph written as a list of `FlowNode`s (each loader writes its own): a select whose condition
is computed from an integer input (token ids, a mask), read on every path from the parameter
to the outputs through the slot the condition chooses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# op -> the slots that hold a bound: a min/max takes any operand as the other's bound, a clamp
# reads its bounds after the value it clamps.
BOUNDS: dict[str, tuple[int, ...] | None] = {"minmax": None, "clamp": (1, 2)}
# op -> the slots that hold the value a select writes where its mask says so: GPT-Neo's
# `where(causal_mask, scores, finfo.min)`.
FILLS: dict[str, tuple[int, ...] | None] = {"where": (1, 2), "masked_fill": (2,)}

# op -> (condition slot, slots whose value passes only where the condition says)
GATES: dict[str, tuple[int, tuple[int, ...]]] = {
    "where": (0, (1, 2)),
    "masked_fill": (1, (2,)),
    "masked_scatter": (1, (2,)),
    "index_put": (1, (2,)),
}


@dataclass(frozen=True)
class FlowNode:
    """One step of a graph: the values it reads and writes, by name. `op` is a GATES key for a
    select, a BOUNDS key for a min/max/clamp, anything else otherwise."""

    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class GateGraph:
    """A loaded graph as this module reads it, built once per model: its steps, the values of
    its integer inputs and of its outputs, and the values that carry each parameter."""

    nodes: Sequence[FlowNode]
    integer_inputs: Sequence[str]
    outputs: Sequence[str]
    parameters: Mapping[str, Sequence[str]]  # parameter name -> the values that read it

    def gate(self, name: str) -> str | None:
        """selection_gate for parameter `name`."""
        every = [v for values in self.parameters.values() for v in values]
        return selection_gate(self.nodes, self.parameters.get(name, ()), self.integer_inputs,
                              self.outputs, every)


    def bound_of(self, name: str) -> str | None:
        """The min/max/clamp that parameter `name` only ever bounds (the first, in graph
        order): xIELU's `min(x, eps)`. None when any other step reads it."""
        return self._only_read_by(name, BOUNDS)

    def fill_of(self, name: str) -> str | None:
        """The select that only ever writes parameter `name` where its mask says so (the
        first, in graph order): a masked fill's value. None when any other step reads it."""
        return self._only_read_by(name, FILLS)

    def _only_read_by(self, name: str, slots_of: Mapping[str, tuple[int, ...] | None]
                      ) -> str | None:
        values = set(self.parameters.get(name, ()))
        found = None
        for node in self.nodes:
            slots = [i for i, v in enumerate(node.inputs) if v in values]
            if not slots:
                continue
            if node.op not in slots_of:
                return None
            allowed = slots_of[node.op]
            if allowed is not None and not all(i in allowed for i in slots):
                return None
            found = found or node.name
        return found


def selection_gate(nodes: Sequence[FlowNode], sources: Iterable[str],
                   integer_inputs: Iterable[str], outputs: Iterable[str],
                   parameters: Iterable[str] = ()) -> str | None:
    """The select through which every path from `sources` to `outputs` passes in a slot its
    input-derived condition chooses (the first such, in graph order); None when some path
    avoids every such select, or none leads to the outputs at all. A condition counts as
    input-derived when it is computed from `integer_inputs` without reading any of
    `parameters` (`ids == bos_id`, not a threshold on the embeddings: that one is the model's)."""
    from_integers = _reach(nodes, set(integer_inputs), set(parameters))
    outputs = set(outputs)
    reached = set(sources)
    gates: list[str] = []
    for node in nodes:
        live = [slot for slot, value in enumerate(node.inputs) if value in reached]
        if not live:
            continue
        gate = GATES.get(node.op)
        if gate is not None and gate[0] < len(node.inputs) \
                and node.inputs[gate[0]] in from_integers and all(s in gate[1] for s in live):
            gates.append(node.name)
            continue
        reached.update(node.outputs)
    if reached & outputs or not gates:
        return None
    return gates[0]


def _reach(nodes: Sequence[FlowNode], start: set[str], barrier: set[str]) -> set[str]:
    reached = set(start)
    for node in nodes:  # graph order: one pass sees every path
        if any(v in reached for v in node.inputs) and not any(v in barrier for v in node.inputs):
            reached.update(node.outputs)
    return reached
