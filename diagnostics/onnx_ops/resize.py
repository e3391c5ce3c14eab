"""Resize (and the older Upsample) as separable per-axis resampling.

Each resized axis gets a small [out, in] resampling matrix built on the host from the ONNX
formulas (coordinate transformation, neighbour window, nearest/linear/cubic coefficients,
antialias, exclude_outside); the data is then multiplied by it on its own device, so the
result is differentiable and needs no device sync. Nearest mode gathers instead of
multiplying, which keeps integer tensors exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gradprobe.diagnostics.onnx_ops._common import (
    Attrs,
    Inputs,
    norm_axis,
    static_floats,
    static_ints,
    unsupported,
)
from gradprobe.diagnostics.onnx_ops.registry import OpContext, register

Coefficients = Callable[[torch.Tensor, float], torch.Tensor]  # ratios [out], scale -> [out, n]


@dataclass(frozen=True)
class _Options:
    mode: str
    transform: str
    nearest_mode: str
    cubic_a: float
    exclude_outside: bool
    antialias: bool
    extrapolation: float


@register("Resize", "Upsample")
def resize(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    rank = x.dim()
    options = _options(ctx, attrs)
    axes = [norm_axis(a, rank, ctx) for a in attrs.get("axes", range(rank))]
    roi, scales, sizes = _targets(ctx, inputs)
    if scales is None and sizes is None and "scales" in attrs:  # Upsample-7 attribute
        scales = list(attrs["scales"])
    out_sizes, axis_scales = _plan(ctx, x, axes, scales, sizes,
                                   attrs.get("keep_aspect_ratio_policy", "stretch"))
    roi_full = _full_roi(roi, axes, rank) if options.transform == "tf_crop_and_resize" else None
    y = x
    for axis in axes:
        identity = out_sizes[axis] == x.shape[axis] and math.isclose(axis_scales[axis], 1.0) \
            and (roi_full is None or (roi_full[axis] == 0.0 and roi_full[axis + rank] == 1.0))
        if identity:
            continue
        axis_roi = (roi_full[axis], roi_full[axis + rank]) if roi_full is not None else None
        y = _resize_axis(y, axis, out_sizes[axis], axis_scales[axis], axis_roi, options)
    return y


def _options(ctx: OpContext, attrs: Attrs) -> _Options:
    mode = attrs.get("mode", "nearest")
    if mode not in ("nearest", "linear", "cubic", "bilinear", "trilinear"):
        raise unsupported(ctx, f"mode '{mode}'")
    mode = "linear" if mode in ("bilinear", "trilinear") else mode
    if ctx.opset < 11 or ctx.op_type == "Upsample":
        # Resize-10 and Upsample index the input as out / scale and take the floor.
        transform, nearest_mode = "asymmetric", "floor"
    else:
        transform = attrs.get("coordinate_transformation_mode", "half_pixel")
        nearest_mode = attrs.get("nearest_mode", "round_prefer_floor")
    return _Options(mode, transform, nearest_mode, attrs.get("cubic_coeff_a", -0.75),
                    bool(attrs.get("exclude_outside", 0)), bool(attrs.get("antialias", 0)),
                    attrs.get("extrapolation_value", 0.0))


def _targets(ctx: OpContext,
             inputs: Inputs) -> tuple[list[float], list[float] | None, list[int] | None]:
    def present(i: int) -> torch.Tensor | None:
        t = inputs[i] if len(inputs) > i else None
        return t if t is not None and t.numel() > 0 else None

    if ctx.op_type == "Upsample" or ctx.opset < 11:
        scales_t, roi_t, sizes_t = present(1), None, None
    else:
        roi_t, scales_t, sizes_t = present(1), present(2), present(3)
    roi = static_floats(roi_t, ctx, "roi") if roi_t is not None else []
    scales = static_floats(scales_t, ctx, "scales") if scales_t is not None else None
    sizes = static_ints(sizes_t, ctx, "sizes") if sizes_t is not None else None
    return roi, scales, sizes


def _plan(ctx: OpContext, x: torch.Tensor, axes: list[int], scales: list[float] | None,
          sizes: list[int] | None, policy: str) -> tuple[list[int], list[float]]:
    """Output size and scale factor of every axis."""
    rank = x.dim()
    shape = list(x.shape)
    given = sizes if sizes is not None else scales
    if given is None:
        raise unsupported(ctx, "neither scales nor sizes is given")
    if len(given) != len(axes):
        raise unsupported(ctx, f"{len(given or [])} scales/sizes for {len(axes)} axes")
    if sizes is None:
        axis_scales = [1.0] * rank
        for axis, scale in zip(axes, scales or [], strict=True):
            axis_scales[axis] = scale
        return [int(shape[a] * axis_scales[a]) for a in range(rank)], axis_scales
    out = list(shape)
    for axis, size in zip(axes, sizes, strict=True):
        out[axis] = size
    axis_scales = [out[a] / shape[a] if shape[a] else 1.0 for a in range(rank)]
    if policy == "stretch":
        return out, axis_scales
    if policy not in ("not_larger", "not_smaller"):
        raise unsupported(ctx, f"keep_aspect_ratio_policy '{policy}'")
    chosen = [axis_scales[a] for a in axes]
    scale = min(chosen) if policy == "not_larger" else max(chosen)
    axis_scales = [scale if a in axes else 1.0 for a in range(rank)]
    # Sizes follow the common scale, rounded half up.
    out = [int(scale * shape[a] + 0.5) if a in axes else shape[a] for a in range(rank)]
    return out, axis_scales


def _full_roi(roi: list[float], axes: list[int], rank: int) -> list[float]:
    full = [0.0] * rank + [1.0] * rank
    if not roi:
        return full
    count = len(roi) // 2
    targets = axes if count == len(axes) else list(range(rank))
    for i, axis in enumerate(targets):
        full[axis], full[rank + axis] = roi[i], roi[count + i]
    return full


# ---------------------------------------------------------------- one axis


def _source_coordinates(transform: str, out_size: int, in_size: int, scale: float,
                        roi: tuple[float, float] | None) -> torch.Tensor:
    """Position in the input that each output position samples (float64, host)."""
    y = torch.arange(out_size, dtype=torch.float64)
    out_length = scale * in_size  # the unrounded output length
    if transform == "align_corners":
        return torch.zeros_like(y) if out_length == 1 else y * (in_size - 1) / (out_length - 1)
    if transform == "asymmetric":
        return y / scale
    if transform == "pytorch_half_pixel":
        return torch.full_like(y, -0.5) if out_length == 1 else (y + 0.5) / scale - 0.5
    if transform == "half_pixel":
        return (y + 0.5) / scale - 0.5
    if transform == "half_pixel_symmetric":
        offset = in_size / 2 * (1 - out_size / out_length)
        return offset + (y + 0.5) / scale - 0.5
    if transform == "tf_crop_and_resize" and roi is not None:
        start, end = roi
        if out_length == 1:
            coords = torch.full_like(y, (end - start) * (in_size - 1) / 2)
        else:
            coords = y * (end - start) * (in_size - 1) / (out_length - 1)
        return coords + start * (in_size - 1)
    raise ValueError(transform)


def _nearest(nearest_mode: str) -> Coefficients:
    def coefficients(ratio: torch.Tensor, scale: float) -> torch.Tensor:
        exact = ratio == 1.0  # an integer position takes the right-hand neighbour, itself
        if nearest_mode == "round_prefer_floor":
            right = ratio > 0.5
        elif nearest_mode == "round_prefer_ceil":
            right = ratio >= 0.5
        elif nearest_mode == "floor":
            right = torch.zeros_like(exact)
        else:  # ceil
            right = torch.ones_like(exact)
        right = right | exact
        return torch.stack([~right, right], dim=1).to(torch.float64)

    return coefficients


def _linear(antialias: bool) -> Coefficients:
    def coefficients(ratio: torch.Tensor, scale: float) -> torch.Tensor:
        if not antialias:
            return torch.stack([1 - ratio, ratio], dim=1)
        # Downsampling widens the triangle filter to 1/scale input pixels.
        scale = min(scale, 1.0)
        start = math.floor(-1 / scale) + 1
        taps = torch.arange(start, start + 2 - 2 * start, dtype=torch.float64)
        weights = (1 - ((taps[None, :] - ratio[:, None]) * scale).abs()).clamp(0, 1)
        return weights / weights.sum(dim=1, keepdim=True)

    return coefficients


def _cubic(a: float, antialias: bool) -> Coefficients:
    def kernel(t: torch.Tensor) -> torch.Tensor:
        t = t.abs()
        near = ((a + 2) * t - (a + 3)) * t * t + 1
        far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))

    def coefficients(ratio: torch.Tensor, scale: float) -> torch.Tensor:
        if not antialias:
            taps = torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
            return kernel(taps[None, :] - ratio[:, None])
        scale = min(scale, 1.0)
        start = math.floor(-2 / scale) + 1
        taps = torch.arange(start, 2 - start, dtype=torch.float64)
        weights = kernel(scale * (taps[None, :] - ratio[:, None]))
        return weights / weights.sum(dim=1, keepdim=True)

    return coefficients


def _neighbours(coords: torch.Tensor, taps: int) -> torch.Tensor:
    """The `taps` input positions around each coordinate, ties going to the lower window."""
    pad = math.ceil(taps / 2)
    shifted = coords + pad
    base = torch.floor(shifted)
    frac = shifted - base
    if taps % 2 == 0:
        offset = torch.where(frac == 0, -(taps // 2), -(taps // 2) + 1)
    else:
        first = -((taps - 1) // 2)
        offset = torch.where(frac <= 0.5, first, first + 1)
    start = base.to(torch.int64) + offset.to(torch.int64)
    return start[:, None] + torch.arange(taps)[None, :] - pad


def _resize_axis(x: torch.Tensor, axis: int, out_size: int, scale: float,
                 roi: tuple[float, float] | None, options: _Options) -> torch.Tensor:
    in_size = x.shape[axis]
    coords = _source_coordinates(options.transform, out_size, in_size, scale, roi)
    floor = torch.floor(coords)
    ratio = torch.where(coords == floor, torch.ones_like(coords), coords - floor)
    if options.mode == "nearest":
        maker = _nearest(options.nearest_mode)
    elif options.mode == "linear":
        maker = _linear(options.antialias)
    else:
        maker = _cubic(options.cubic_a, options.antialias)
    weights = maker(ratio, scale)
    positions = _neighbours(coords, weights.shape[1])
    if options.exclude_outside:
        outside = (positions < 0) | (positions >= in_size)
        weights = torch.where(outside, torch.zeros_like(weights), weights)
        total = weights.sum(dim=1, keepdim=True)
        weights = weights / torch.where(total == 0, torch.ones_like(total), total)
    positions = positions.clamp(0, in_size - 1)  # edge padding

    if options.mode == "nearest":
        picked = positions.gather(1, weights.argmax(dim=1, keepdim=True)).reshape(-1)
        y = x.index_select(axis, picked.to(x.device))
    else:
        matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
        matrix.scatter_add_(1, positions, weights)
        compute = x if x.is_floating_point() else x.to(torch.float32)
        moved = compute.movedim(axis, -1)
        y = torch.matmul(moved, matrix.to(compute.dtype).to(x.device).t()).movedim(-1, axis)
        y = y.to(x.dtype)
    if options.transform == "tf_crop_and_resize":
        # Samples outside the input take the extrapolation value, as in TF's CropAndResize.
        outside = ((coords < 0) | (coords > in_size - 1)).to(x.device)
        outside = outside.reshape(-1, *[1] * (x.dim() - axis - 1))
        y = torch.where(outside, torch.full((), options.extrapolation, dtype=y.dtype,
                                            device=y.device), y)
    return y
