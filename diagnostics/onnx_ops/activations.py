"""Nonlinearities and the softmax family."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gradprobe.diagnostics.onnx_ops._common import Attrs, Inputs, align, norm_axis, unsupported
from gradprobe.diagnostics.onnx_ops.registry import OpContext, register

# Spec defaults of SELU (the values that make it self-normalising).
_SELU_ALPHA = 1.67326319217681884765625
_SELU_GAMMA = 1.05070102214813232421875


@register("Relu")
def relu(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return torch.relu(inputs[0])


@register("LeakyRelu")
def leaky_relu(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return F.leaky_relu(inputs[0], attrs.get("alpha", 0.01))


@register("PRelu")
def prelu(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x, slope = align(inputs[0], inputs[1])
    # The slope broadcasts onto x (numpy rules), which F.prelu's channel layout does not cover.
    return torch.where(x < 0, x * slope, x)


@register("Elu")
def elu(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return F.elu(inputs[0], attrs.get("alpha", 1.0))


@register("Selu")
def selu(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    alpha, gamma = attrs.get("alpha", _SELU_ALPHA), attrs.get("gamma", _SELU_GAMMA)
    return gamma * F.elu(inputs[0], alpha)


@register("Celu")
def celu(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return F.celu(inputs[0], attrs.get("alpha", 1.0))


@register("ThresholdedRelu")
def thresholded_relu(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    return torch.where(x > attrs.get("alpha", 1.0), x, torch.zeros_like(x))


@register("Sigmoid")
def sigmoid(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return torch.sigmoid(inputs[0])


@register("HardSigmoid")
def hard_sigmoid(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    return torch.clamp(inputs[0] * alpha + beta, 0.0, 1.0)


@register("HardSwish")
def hard_swish(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return F.hardswish(inputs[0])


@register("Tanh")
def tanh(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return torch.tanh(inputs[0])


@register("Gelu")
def gelu(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    approximate = attrs.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise unsupported(ctx, f"approximate='{approximate}'")
    return F.gelu(inputs[0], approximate=approximate)


@register("Softplus")
def softplus(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    # log(1 + exp(x)) without overflow; F.softplus switches to x past a threshold, this is exact.
    return torch.clamp(x, min=0) + torch.log1p(torch.exp(-torch.abs(x)))


@register("Softsign")
def softsign(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return F.softsign(inputs[0])


@register("Mish")
def mish(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return F.mish(inputs[0])


@register("Swish")
def swish(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    return x * torch.sigmoid(x * attrs.get("alpha", 1.0))


@register("Softmax", "LogSoftmax")
def softmax(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    fn = torch.softmax if ctx.op_type == "Softmax" else torch.log_softmax
    if ctx.opset >= 13:
        return fn(x, dim=norm_axis(attrs.get("axis", -1), x.dim(), ctx))
    # Before opset 13 the input is coerced to 2D at `axis` (default 1) and normalised over
    # the flattened trailing block.
    axis = norm_axis(attrs.get("axis", 1), x.dim(), ctx)
    block = x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    return fn(block, dim=1).reshape(x.shape)
