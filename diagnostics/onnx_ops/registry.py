"""ONNX operator -> torch function table.

Each operator is a plain function `fn(ctx, inputs, attrs) -> Tensor | sequence of Tensor`:
- `inputs` are torch tensors in the node's input order; an omitted optional input is None.
- `attrs` are the node's attributes decoded to Python values (ints, floats, str, lists,
  torch tensors for TENSOR attributes); absent attributes are absent (use attrs.get with the
  spec's default).
- the function returns the node's outputs in order (a single tensor for one output).

Functions must be differentiable torch code (gradients flow to initializers), device-agnostic
(take device and dtype from the data inputs, never `.cpu()` a float tensor), and must not
sync with the device: shape-like integer tensors (outputs of Shape, int Constants) live on the
CPU, so reading them with `.tolist()` is free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from gradprobe.diagnostics.errors import UnsupportedOperator

OpResult = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass(frozen=True)
class OpContext:
    node: str  # node name, for error messages
    op_type: str
    opset: int  # the model's opset for the default domain
    num_outputs: int  # how many outputs the node declares (some ops return optional outputs)
    training: bool = True  # BatchNormalization on batch statistics; Dropout stays off regardless


OpFn = Callable[[OpContext, list[Union[torch.Tensor, None]], dict[str, Any]], OpResult]

_OPS: dict[tuple[str, str], OpFn] = {}


def register(*op_types: str, domain: str = "") -> Callable[[OpFn], OpFn]:
    def add(fn: OpFn) -> OpFn:
        for op_type in op_types:
            _OPS[(domain, op_type)] = fn
        return fn

    return add


def lookup(op_type: str, domain: str, node: str) -> OpFn:
    domain = "" if domain in ("", "ai.onnx") else domain
    try:
        return _OPS[(domain, op_type)]
    except KeyError:
        where = f"{domain}::{op_type}" if domain else op_type
        raise UnsupportedOperator(where, node) from None


def supported_operators() -> list[str]:
    return sorted(op for domain, op in _OPS if domain == "")
