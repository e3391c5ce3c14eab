"""Normalisation layers.

BatchNormalization follows `ctx.training`, not the node's `training_mode`: the probe judges a
network as it will train, so BN normalises with the batch's statistics even in files exported
in eval mode (whose running statistics would shrink or blow up the activations at init).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradprobe.diagnostics.onnx_ops._common import (
    Attrs,
    Inputs,
    align,
    node_outputs,
    norm_axis,
    unsupported,
)
from gradprobe.diagnostics.onnx_ops.registry import OpContext, OpResult, register

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [C] vector shaped to broadcast over x's channel axis (axis 1), in x's dtype."""
    return t.to(x.dtype).reshape(1, -1, *[1] * (x.dim() - 2))


@register("BatchNormalization")
def batch_norm(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> OpResult:
    x, scale, bias, mean, var = align(*inputs[:5])
    eps = attrs.get("epsilon", 1e-5)
    if not ctx.training:
        # Written out: F.batch_norm refuses running statistics that require grad, and the
        # loader makes them Parameters like every float initializer.
        inv = torch.rsqrt(_per_channel(var, x) + eps)
        y = (x - _per_channel(mean, x)) * inv * _per_channel(scale, x) + _per_channel(bias, x)
        return y
    if ctx.num_outputs == 1 and x.numel() > x.shape[1]:
        # The fused kernel; it refuses a single value per channel, handled below.
        return F.batch_norm(x, None, None, scale.to(x.dtype), bias.to(x.dtype), training=True,
                            eps=eps)
    dims = [0, *range(2, x.dim())]
    batch_var, batch_mean = torch.var_mean(x, dim=dims, correction=0)
    inv = torch.rsqrt(batch_var + eps)
    y = (x - _per_channel(batch_mean, x)) * _per_channel(inv * scale.to(x.dtype), x) \
        + _per_channel(bias, x)
    if ctx.num_outputs == 1:
        return y
    momentum = attrs.get("momentum", 0.9)
    running_mean = mean * momentum + batch_mean.to(mean.dtype) * (1 - momentum)
    running_var = var * momentum + batch_var.to(var.dtype) * (1 - momentum)
    # Opset < 14 declared saved mean/variance outputs as well.
    return node_outputs(ctx, [y, running_mean, running_var, batch_mean, batch_var])


@register("LayerNormalization")
def layer_norm(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> OpResult:
    x, scale, bias = align(inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None)
    axis = norm_axis(attrs.get("axis", -1), x.dim(), ctx)
    eps = attrs.get("epsilon", 1e-5)
    normalized = tuple(x.shape[axis:])
    exact_shapes = tuple(scale.shape) == normalized and (bias is None or
                                                        tuple(bias.shape) == normalized)
    if ctx.num_outputs == 1 and exact_shapes:
        # torch's fused kernel accumulates in float32 for half inputs, as stash_type=1 asks.
        bias_x = bias.to(x.dtype) if bias is not None else None
        return F.layer_norm(x, normalized, scale.to(x.dtype), bias_x, eps)
    stash = x.float() if attrs.get("stash_type", 1) == 1 and x.dtype in _LOW_PRECISION else x
    dims = tuple(range(axis, x.dim()))
    var, mean = torch.var_mean(stash, dim=dims, correction=0, keepdim=True)
    inv_std = torch.rsqrt(var + eps)
    y = ((stash - mean) * inv_std).to(x.dtype) * scale.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return node_outputs(ctx, [y, mean, inv_std])


@register("InstanceNormalization")
def instance_norm(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x, scale, bias = align(*inputs[:3])
    eps = attrs.get("epsilon", 1e-5)
    var, mean = torch.var_mean(x, dim=tuple(range(2, x.dim())), correction=0, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps) * _per_channel(scale, x) + _per_channel(bias, x)


@register("GroupNormalization")
def group_norm(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x, scale, bias = align(*inputs[:3])
    groups = attrs.get("num_groups")
    if groups is None:
        raise unsupported(ctx, "attribute 'num_groups' is missing")
    channels = x.shape[1]
    if channels % groups:
        raise unsupported(ctx, f"{channels} channels do not split into {groups} groups")
    if scale.numel() == groups != channels:
        # Opset 18 gave one scale/bias per group (fixed to per channel in opset 21).
        scale = scale.repeat_interleave(channels // groups)
        bias = bias.repeat_interleave(channels // groups)
    compute = x.float() if attrs.get("stash_type", 1) == 1 and x.dtype in _LOW_PRECISION else x
    y = F.group_norm(compute, groups, None, None, attrs.get("epsilon", 1e-5)).to(x.dtype)
    return y * _per_channel(scale, x) + _per_channel(bias, x)


@register("RMSNormalization")
def rms_norm(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x, scale = align(inputs[0], inputs[1])
    axis = norm_axis(attrs.get("axis", -1), x.dim(), ctx)
    compute = x.float() if attrs.get("stash_type", 1) == 1 and x.dtype in _LOW_PRECISION else x
    mean_square = compute.pow(2).mean(dim=tuple(range(axis, x.dim())), keepdim=True)
    y = (compute * torch.rsqrt(mean_square + attrs.get("epsilon", 1e-5))).to(x.dtype)
    return y * scale.to(x.dtype)


@register("LpNormalization")
def lp_norm(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    p = attrs.get("p", 2)
    if p not in (1, 2):
        raise unsupported(ctx, f"p={p}")
    axis = norm_axis(attrs.get("axis", -1), x.dim(), ctx)
    norm = torch.linalg.vector_norm(x, ord=p, dim=axis, keepdim=True)
    # A zero vector stays zero (and its gradient finite) instead of 0/0.
    return x / torch.where(norm == 0, torch.ones_like(norm), norm)


@register("MeanVarianceNormalization")
def mean_variance_norm(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    dims = tuple(attrs.get("axes", [0, 2, 3]))
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    return (x - mean) / (torch.sqrt(var) + 1e-9)
