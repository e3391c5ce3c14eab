"""Reductions, arg-reductions, TopK and CumSum."""

from __future__ import annotations

import torch

from gradprobe.diagnostics.onnx_ops._common import (
    WIDE_UNSIGNED,
    Attrs,
    Inputs,
    axes_arg,
    norm_axis,
    static_ints,
    unsupported,
)
from gradprobe.diagnostics.onnx_ops.registry import OpContext, register


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_floating_point() else x.to(torch.float64)


def _sum(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    # torch sums integers into int64; ONNX keeps the input type.
    return x.sum(dim=dims, keepdim=keep, dtype=x.dtype)


def _prod(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):  # torch.prod takes one axis at a time
        x = x.prod(dim=d, keepdim=keep, dtype=x.dtype)
    return x


def _extreme(fn, empty_fill: str):  # type: ignore[no-untyped-def]
    def reduce(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
        if any(x.shape[d] == 0 for d in dims):
            # Max/Min over nothing is the reduction's identity (-inf / +inf or the type's end).
            shape = [1 if d in dims else n for d, n in enumerate(x.shape) if keep or d not in dims]
            return torch.full(shape, _identity(x.dtype, empty_fill), dtype=x.dtype,
                              device=x.device)
        if x.dtype == torch.bool:
            return fn(x.to(torch.uint8), dim=dims, keepdim=keep).to(torch.bool)
        return fn(x, dim=dims, keepdim=keep)

    return reduce


def _identity(dtype: torch.dtype, which: str) -> float | int | bool:
    if dtype == torch.bool:
        return which == "high"
    if dtype.is_floating_point:
        return float("inf") if which == "high" else float("-inf")
    info = torch.iinfo(dtype)
    return info.max if which == "high" else info.min


def _mean(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    return _as_float(x).mean(dim=dims, keepdim=keep).to(x.dtype)


def _l1(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    return _sum(x.abs(), dims, keep)


def _l2(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    # vector_norm's backward is finite at an all-zero slice, unlike sqrt(sum(x^2)).
    return torch.linalg.vector_norm(_as_float(x), ord=2, dim=dims, keepdim=keep).to(x.dtype)


def _sum_square(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    return _sum(x * x, dims, keep)


def _log_sum(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    return torch.log(_sum(x, dims, keep))


def _log_sum_exp(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    if any(x.shape[d] == 0 for d in dims):
        return torch.log(_sum(x, dims, keep))  # log(0) = -inf, the empty reduction
    return torch.logsumexp(x, dim=dims, keepdim=keep)


_REDUCTIONS = {
    "ReduceSum": _sum,
    "ReduceMean": _mean,
    "ReduceMax": _extreme(torch.amax, "low"),
    "ReduceMin": _extreme(torch.amin, "high"),
    "ReduceProd": _prod,
    "ReduceL1": _l1,
    "ReduceL2": _l2,
    "ReduceSumSquare": _sum_square,
    "ReduceLogSum": _log_sum,
    "ReduceLogSumExp": _log_sum_exp,
}


def _reduce(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    # Axes moved from attribute to input (ReduceSum at opset 13, the others at 18).
    axes = axes_arg(ctx, inputs, attrs, 1)
    keep = bool(attrs.get("keepdims", 1))
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    if x.dim() == 0:
        x, axes, keep = x.reshape(1), [0], False
    dims = tuple(sorted({norm_axis(a, x.dim(), ctx) for a in axes}))
    wide = x.dtype if x.dtype in WIDE_UNSIGNED else None
    if wide is not None:
        x = x.to(torch.int64)
    out = _REDUCTIONS[ctx.op_type](x, dims, keep)
    return out.to(wide) if wide is not None else out


register(*_REDUCTIONS)(_reduce)


@register("ArgMax", "ArgMin")
def arg_extreme(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    if x.dtype in WIDE_UNSIGNED or x.dtype == torch.bool:
        x = x.to(torch.int64)
    axis = norm_axis(attrs.get("axis", 0), x.dim(), ctx)
    keep = bool(attrs.get("keepdims", 1))
    fn = torch.argmax if ctx.op_type == "ArgMax" else torch.argmin
    if attrs.get("select_last_index", 0):
        # torch picks the first of equal extremes; search the reversed axis to get the last.
        return x.shape[axis] - 1 - fn(x.flip(axis), dim=axis, keepdim=keep)
    return fn(x, dim=axis, keepdim=keep)


@register("TopK")
def top_k(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> list[torch.Tensor]:
    x = inputs[0]
    k = static_ints(inputs[1], ctx, "K")[0] if len(inputs) > 1 and inputs[1] is not None \
        else attrs.get("k")
    if k is None:
        raise unsupported(ctx, "K is missing")
    axis = norm_axis(attrs.get("axis", -1), x.dim(), ctx)
    largest = bool(attrs.get("largest", 1))
    # A stable sort keeps equal values in index order, as ONNX requires; torch.topk does not.
    values, indices = torch.sort(x, dim=axis, descending=largest, stable=True)
    return [values.narrow(axis, 0, k), indices.narrow(axis, 0, k)]


@register("CumSum")
def cum_sum(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    axis = norm_axis(static_ints(inputs[1], ctx, "axis")[0], x.dim(), ctx)
    reverse = bool(attrs.get("reverse", 0))
    if reverse:
        x = x.flip(axis)
    out = torch.cumsum(x, dim=axis, dtype=x.dtype)
    if attrs.get("exclusive", 0) and out.shape[axis] > 0:
        # Shift by one along the axis: each position sums only what came before it.
        head = torch.zeros_like(out.narrow(axis, 0, 1))
        out = torch.cat([head, out.narrow(axis, 0, out.shape[axis] - 1)], dim=axis)
    return out.flip(axis) if reverse else out
