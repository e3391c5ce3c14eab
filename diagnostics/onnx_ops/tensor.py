"""Shape, layout and indexing operators.

Shape-like results (Shape, Size, Range over constants, ConstantOfShape) are created on the CPU;
when index tensors meet data on an accelerator they are moved to the data's device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gradprobe.diagnostics.onnx_ops._common import (
    Attrs,
    Inputs,
    align,
    axes_arg,
    norm_axis,
    pairs,
    static_ints,
    static_scalar,
    to_device_of,
    unsupported,
)
from gradprobe.diagnostics.onnx_ops.registry import OpContext, OpResult, register
from gradprobe.diagnostics.onnx_ops.tensors import onnx_dtype_to_torch


@register("Identity")
def identity(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return inputs[0]


@register("Constant")
def constant(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    if "value" in attrs:
        return attrs["value"]
    if "value_float" in attrs:
        return torch.tensor(attrs["value_float"], dtype=torch.float32)
    if "value_floats" in attrs:
        return torch.tensor(attrs["value_floats"], dtype=torch.float32)
    if "value_int" in attrs:
        return torch.tensor(attrs["value_int"], dtype=torch.int64)
    if "value_ints" in attrs:
        return torch.tensor(attrs["value_ints"], dtype=torch.int64)
    kinds = ", ".join(sorted(attrs)) or "no value"
    raise unsupported(ctx, f"constant of kind {kinds}")


@register("ConstantOfShape")
def constant_of_shape(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    shape = static_ints(inputs[0], ctx, "shape")
    value = attrs.get("value")
    if value is None:
        return torch.zeros(shape, dtype=torch.float32)
    return value.reshape([1] * len(shape)).expand(shape).clone()


@register("Shape")
def shape(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    dims = list(inputs[0].shape)
    # Python slicing clamps start/end exactly as the spec asks.
    return torch.tensor(dims[attrs.get("start", 0):attrs.get("end", len(dims))],
                        dtype=torch.int64)


@register("Size")
def size(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return torch.tensor(inputs[0].numel(), dtype=torch.int64)


@register("Reshape")
def reshape(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    target = static_ints(inputs[1], ctx, "shape")
    if not attrs.get("allowzero", 0):
        # 0 copies the input's dimension at the same position.
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


@register("Flatten")
def flatten(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    axis = attrs.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@register("Transpose")
def transpose(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    perm = attrs.get("perm") or list(range(x.dim()))[::-1]
    return x.permute(perm)


@register("Squeeze")
def squeeze(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    axes = axes_arg(ctx, inputs, attrs, 1)
    if axes is None:
        return x.squeeze()
    dims = tuple(norm_axis(a, x.dim(), ctx) for a in axes)
    for d in dims:
        if x.shape[d] != 1:
            raise unsupported(ctx, f"cannot squeeze axis {d} of size {x.shape[d]}")
    return x.squeeze(dims) if dims else x


@register("Unsqueeze")
def unsqueeze(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    axes = axes_arg(ctx, inputs, attrs, 1) or []
    rank = x.dim() + len(axes)
    for axis in sorted(norm_axis(a, rank, ctx) for a in axes):
        x = x.unsqueeze(axis)
    return x


@register("Concat")
def concat(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    tensors = align(*[t for t in inputs if t is not None])
    axis = norm_axis(attrs.get("axis", 0), tensors[0].dim(), ctx)
    return torch.cat(tensors, dim=axis)


@register("Split")
def split(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> OpResult:
    x = inputs[0]
    axis = norm_axis(attrs.get("axis", 0), x.dim(), ctx)
    dim = x.shape[axis]
    if len(inputs) > 1 and inputs[1] is not None:
        sizes = static_ints(inputs[1], ctx, "split")
    elif "split" in attrs:
        sizes = list(attrs["split"])
    elif "num_outputs" in attrs:
        # Chunks of ceil(dim / n); the last one takes the remainder.
        parts = attrs["num_outputs"]
        chunk = -(-dim // parts)
        sizes = [chunk] * (parts - 1) + [dim - chunk * (parts - 1)]
    else:
        parts = ctx.num_outputs
        if dim % parts:
            raise unsupported(ctx, f"axis of size {dim} does not split into {parts} equal parts")
        sizes = [dim // parts] * parts
    if sum(sizes) != dim:
        # Not an operator gradprobe lacks: the sizes were fixed at export for another input
        # (a trace freezes the tokens-per-expert counts of switch_transformers' routing).
        raise ValueError(f"split sizes {sizes} do not add up to {dim}, the size of axis {axis} "
                         f"of its input of shape {list(x.shape)}: the file fixed them for the "
                         f"input it was exported with")
    parts = list(torch.split(x, sizes, dim=axis))
    return parts[0] if len(parts) == 1 else parts


@register("Slice")
def slice_(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    if ctx.opset < 10:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes = attrs.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts = static_ints(inputs[1], ctx, "starts")
        ends = static_ints(inputs[2], ctx, "ends")
        axes = axes_arg(ctx, inputs, {}, 3) or list(range(len(starts)))
        steps = static_ints(inputs[4], ctx, "steps") if len(inputs) > 4 and \
            inputs[4] is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * x.dim()
    reversed_axes = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = norm_axis(axis, x.dim(), ctx)
        dim = x.shape[axis]
        if step == 0:
            raise unsupported(ctx, "slice step 0")
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            index[axis] = slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
        else:
            reversed_axes.append((axis, min(max(start, 0), dim - 1), min(max(end, -1), dim - 1),
                                  step))
    out = x[tuple(index)]
    # torch slicing has no negative steps: pick the positions explicitly.
    for axis, start, end, step in reversed_axes:
        positions = torch.arange(start, end, step, device=out.device)
        out = out.index_select(axis, positions)
    return out


def _wrap_negative(indices: torch.Tensor, dim: int) -> torch.Tensor:
    indices = indices.to(torch.int64)
    return torch.where(indices < 0, indices + dim, indices)


@register("Gather")
def gather(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    axis = norm_axis(attrs.get("axis", 0), x.dim(), ctx)
    indices = _wrap_negative(to_device_of(inputs[1], x), x.shape[axis])
    picked = x.index_select(axis, indices.reshape(-1))
    return picked.reshape((*x.shape[:axis], *indices.shape, *x.shape[axis + 1:]))


@register("GatherElements")
def gather_elements(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    axis = norm_axis(attrs.get("axis", 0), x.dim(), ctx)
    indices = _wrap_negative(to_device_of(inputs[1], x), x.shape[axis])
    return torch.gather(x, axis, indices)


@register("GatherND")
def gather_nd(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    batch = attrs.get("batch_dims", 0)
    indices = to_device_of(inputs[1], x).to(torch.int64)
    depth = indices.shape[-1]
    batch_shape = x.shape[:batch]
    flat_x = x.reshape(math.prod(batch_shape), *x.shape[batch:])
    flat_idx = indices.reshape(math.prod(batch_shape), -1, depth)
    dims = torch.tensor(x.shape[batch:batch + depth], device=x.device)
    flat_idx = torch.where(flat_idx < 0, flat_idx + dims, flat_idx)
    rows = torch.arange(flat_x.shape[0], device=x.device).unsqueeze(1).expand(flat_idx.shape[:2])
    picked = flat_x[(rows, *flat_idx.unbind(-1))]
    return picked.reshape(*indices.shape[:-1], *x.shape[batch + depth:])


@register("Expand")
def expand(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    target = static_ints(inputs[1], ctx, "shape")
    # Bidirectional broadcast: a 1 in `shape` keeps the input's dimension.
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(target)))


@register("Tile")
def tile(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return inputs[0].repeat(static_ints(inputs[1], ctx, "repeats"))


@register("Range")
def range_(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    start = static_scalar(inputs[0], ctx, "start")
    limit = static_scalar(inputs[1], ctx, "limit")
    delta = static_scalar(inputs[2], ctx, "delta")
    count = max(math.ceil((limit - start) / delta), 0)
    dtype = inputs[0].dtype
    if dtype.is_floating_point:
        # start + i * delta, evaluated in double and rounded once to the output type.
        steps = torch.arange(count, dtype=torch.float64) * delta + start
        return steps.to(dtype).to(inputs[0].device)
    return torch.arange(start, start + count * delta, delta, dtype=dtype,
                        device=inputs[0].device)[:count]


@register("Trilu")
def trilu(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    k = static_ints(inputs[1], ctx, "k")[0] if len(inputs) > 1 and inputs[1] is not None else 0
    if x.dtype == torch.bool:
        return trilu(ctx, [x.to(torch.uint8), *inputs[1:]], attrs).to(torch.bool)
    return torch.triu(x, k) if attrs.get("upper", 1) else torch.tril(x, k)


@register("Pad")
def pad(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    mode = attrs.get("mode", "constant")
    value: torch.Tensor | float | None
    if ctx.opset < 11:
        raw, value = list(attrs.get("pads", [])), attrs.get("value", 0.0)
        axes = list(range(x.dim()))
    else:
        raw = static_ints(inputs[1], ctx, "pads")
        value = inputs[2] if len(inputs) > 2 else None
        axes = axes_arg(ctx, inputs, {}, 3) or list(range(x.dim()))
    axes = [norm_axis(a, x.dim(), ctx) for a in axes]
    if len(raw) != 2 * len(axes):
        raise unsupported(ctx, f"{len(raw)} pads for {len(axes)} axes")
    amounts = [(0, 0)] * x.dim()
    for axis, (begin, end) in zip(axes, pairs(raw), strict=True):
        amounts[axis] = (begin, end)
    if mode == "constant":
        return _pad_constant(x, amounts, value)
    if mode not in ("edge", "reflect", "wrap"):
        raise unsupported(ctx, f"pad mode '{mode}'")
    for axis, (begin, end) in enumerate(amounts):
        if begin or end:
            x = x.index_select(axis, _pad_positions(x.shape[axis], begin, end, mode, x.device))
    return x


def _pad_constant(x: torch.Tensor, amounts: list[tuple[int, int]],
                  value: torch.Tensor | float | None) -> torch.Tensor:
    flat = [n for begin_end in reversed(amounts) for n in begin_end]  # torch: last axis first
    if value is None or isinstance(value, float | int):
        return F.pad(x, flat, value=float(value or 0))
    padded = F.pad(x, flat)
    # The fill value may be a device tensor: mark the padding and blend, without reading it.
    inside = F.pad(torch.ones((1,) * x.dim(), dtype=torch.bool, device=x.device)
                   .expand(x.shape), flat, value=False)
    return torch.where(inside, padded, to_device_of(value, x).to(x.dtype).reshape(()))


def _pad_positions(dim: int, begin: int, end: int, mode: str,
                   device: torch.device) -> torch.Tensor:
    """Source index for each output position of one padded axis (negative pads crop)."""
    positions = torch.arange(-begin, dim + end)
    if mode == "edge":
        positions = positions.clamp(0, dim - 1)
    elif mode == "wrap":
        positions = positions.remainder(dim)
    elif dim == 1:  # reflect on a single element repeats it
        positions = torch.zeros_like(positions)
    else:
        period = 2 * (dim - 1)
        positions = positions.remainder(period)
        positions = torch.where(positions >= dim, period - positions, positions)
    return positions.to(device)


@register("DepthToSpace")
def depth_to_space(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    bs = attrs["blocksize"]
    n, c, h, w = x.shape
    if attrs.get("mode", "DCR") == "CRD":
        tmp = x.reshape(n, c // (bs * bs), bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    else:
        tmp = x.reshape(n, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
    return tmp.reshape(n, c // (bs * bs), h * bs, w * bs)


@register("SpaceToDepth")
def space_to_depth(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    bs = attrs["blocksize"]
    n, c, h, w = x.shape
    tmp = x.reshape(n, c, h // bs, bs, w // bs, bs)
    if attrs.get("mode", "DCR") == "CRD":
        tmp = tmp.permute(0, 1, 3, 5, 2, 4)
    else:
        tmp = tmp.permute(0, 3, 5, 1, 2, 4)
    return tmp.reshape(n, c * bs * bs, h // bs, w // bs)


@register("ScatterND")
def scatter_nd(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    data, indices, updates = inputs[0], inputs[1], inputs[2]
    indices = to_device_of(indices, data).to(torch.int64)
    updates = to_device_of(updates, data)
    depth = indices.shape[-1]
    lead = data.shape[:depth]
    # Address the first `depth` axes by one linear index, then scatter whole slices.
    strides = torch.tensor([math.prod(lead[i + 1:]) for i in range(depth)], device=data.device)
    dims = torch.tensor(lead, device=data.device)
    indices = torch.where(indices < 0, indices + dims, indices)
    linear = (indices * strides).sum(-1).reshape(-1)
    flat = data.reshape(math.prod(lead), *data.shape[depth:])
    # an explicit row count: with an empty slice (a shifted-window mask region of width 0
    # in a small Swin3D probe) -1 cannot be inferred
    rows = updates.reshape(linear.numel(), *data.shape[depth:])
    reduction = attrs.get("reduction", "none")
    if reduction == "none":
        out = flat.index_copy(0, linear, rows)
    elif reduction == "add":
        out = flat.index_add(0, linear, rows)
    elif reduction in ("mul", "max", "min"):
        mode = {"mul": "prod", "max": "amax", "min": "amin"}[reduction]
        where = linear.reshape(-1, *[1] * (rows.dim() - 1)).expand_as(rows)
        out = flat.scatter_reduce(0, where, rows, mode, include_self=True)
    else:
        raise unsupported(ctx, f"reduction '{reduction}'")
    return out.reshape(data.shape)


@register("ScatterElements")
def scatter_elements(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    data = inputs[0]
    axis = norm_axis(attrs.get("axis", 0), data.dim(), ctx)
    indices = _wrap_negative(to_device_of(inputs[1], data), data.shape[axis])
    updates = to_device_of(inputs[2], data)
    reduction = attrs.get("reduction", "none")
    if reduction == "none":
        return data.scatter(axis, indices, updates)
    mode = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}.get(reduction)
    if mode is None:
        raise unsupported(ctx, f"reduction '{reduction}'")
    return data.scatter_reduce(axis, indices, updates, mode, include_self=True)


@register("OneHot")
def one_hot(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    indices, depth_t, values = inputs[0], inputs[1], inputs[2]
    depth = int(static_scalar(depth_t, ctx, "depth"))
    indices = to_device_of(indices, values).to(torch.int64)
    indices = torch.where(indices < 0, indices + depth, indices)
    axis = norm_axis(attrs.get("axis", -1), indices.dim() + 1, ctx)
    classes = torch.arange(depth, device=values.device)
    classes = classes.reshape([depth] + [1] * (indices.dim() - axis))
    hot = indices.unsqueeze(axis) == classes  # out-of-range indices match no class
    off, on = values.reshape(-1)[0], values.reshape(-1)[1]
    return torch.where(hot, on, off)


@register("NonZero")
def non_zero(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    # The output size depends on the data: this one op has to wait for the device.
    return torch.nonzero(inputs[0]).T.contiguous()


@register("EyeLike")
def eye_like(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    dtype = onnx_dtype_to_torch(attrs["dtype"]) if "dtype" in attrs else x.dtype
    rows, cols = x.shape
    k = attrs.get("k", 0)
    return torch.ones(rows, cols, dtype=torch.bool, device=x.device).triu(k).tril(k).to(dtype)
