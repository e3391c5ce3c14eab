"""Elementwise math, comparisons, logic, casts and variadic Min/Max/Sum/Mean."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from gradprobe.diagnostics.errors import InputSpecError
from gradprobe.diagnostics.onnx_ops._common import (
    Attrs,
    Inputs,
    align,
    unsupported,
    widened,
)
from gradprobe.diagnostics.onnx_ops.registry import OpContext, register
from gradprobe.diagnostics.onnx_ops.tensors import onnx_dtype_to_torch, type_name

_UNARY = {
    "Abs": torch.abs,
    "Neg": torch.neg,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Erf": torch.erf,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Asin": torch.asin,
    "Acos": torch.acos,
    "Atan": torch.atan,
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Asinh": torch.asinh,
    "Acosh": torch.acosh,
    "Atanh": torch.atanh,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # half to even, as ONNX asks
    "Sign": torch.sign,
    "IsNaN": torch.isnan,
    "Not": torch.logical_not,
}


def _unary(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return widened(_UNARY[ctx.op_type])(inputs[0])


register(*_UNARY)(_unary)


def _int_aware_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ONNX integer division truncates toward zero (C semantics), torch's `/` would give floats.
    if a.dtype.is_floating_point or a.dtype.is_complex:
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


_BINARY = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _int_aware_div,
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
    "BitwiseAnd": torch.bitwise_and,
    "BitwiseOr": torch.bitwise_or,
    "BitwiseXor": torch.bitwise_xor,
}


def _binary(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    a, b = align(inputs[0], inputs[1])
    return widened(_BINARY[ctx.op_type])(a, b)


register(*_BINARY)(_binary)


@register("Pow")
def pow_(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    base, exponent = align(inputs[0], inputs[1])
    # The result has the base's type whatever the exponent's type is.
    return widened(torch.pow)(base, exponent).to(base.dtype)


@register("Mod")
def mod(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    a, b = align(inputs[0], inputs[1])
    # fmod=1: sign of the dividend (C fmod); fmod=0: sign of the divisor (Python %).
    fn = torch.fmod if attrs.get("fmod", 0) else torch.remainder
    return widened(fn)(a, b)


@register("BitwiseNot")
def bitwise_not(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return widened(torch.bitwise_not)(inputs[0])


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
              ) -> Callable[..., torch.Tensor]:
    def reduce_all(*tensors: torch.Tensor) -> torch.Tensor:
        return functools.reduce(fn, tensors)

    return reduce_all


@register("Min", "Max", "Sum", "Mean")
def variadic(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    tensors = align(*[t for t in inputs if t is not None])
    if not tensors:
        raise unsupported(ctx, "needs at least one input")
    if ctx.op_type == "Min":
        out = widened(_variadic(torch.minimum))(*tensors)
    elif ctx.op_type == "Max":
        out = widened(_variadic(torch.maximum))(*tensors)
    else:
        out = widened(_variadic(torch.add))(*tensors)
    if ctx.op_type == "Mean":
        out = out / len(tensors)
    return out


@register("Clip")
def clip(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    if ctx.opset < 11:
        low, high = attrs.get("min"), attrs.get("max")
        if low is None and high is None:
            return x
        return torch.clamp(x, min=low, max=high)
    low = inputs[1] if len(inputs) > 1 else None
    high = inputs[2] if len(inputs) > 2 else None
    if low is None and high is None:
        return x
    x, low, high = align(x, low, high)
    if x.dtype in (torch.uint16, torch.uint32, torch.uint64):
        return widened(lambda v, lo, hi: torch.clamp(v, lo, hi))(x, low, high)
    return torch.clamp(x, min=low, max=high)


@register("Where")
def where(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    cond, x, y = align(inputs[0], inputs[1], inputs[2])
    return torch.where(cond.to(torch.bool), x, y)


@register("IsInf")
def is_inf(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    positive, negative = attrs.get("detect_positive", 1), attrs.get("detect_negative", 1)
    if positive and negative:
        return torch.isinf(x)
    if positive:
        return torch.isposinf(x)
    if negative:
        return torch.isneginf(x)
    return torch.zeros_like(x, dtype=torch.bool)


@register("Cast")
def cast(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    if "to" not in attrs:
        raise unsupported(ctx, "attribute 'to' is missing")
    try:
        dtype = onnx_dtype_to_torch(attrs["to"])
    except InputSpecError:
        raise unsupported(ctx, f"cast to {type_name(attrs['to'])}") from None
    return _cast(inputs[0], dtype)


@register("CastLike")
def cast_like(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return _cast(inputs[0], inputs[1].dtype)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if x.dtype == dtype:
        return x
    return x.to(dtype)
