"""Spectral ONNX operators: DFT (FNet's token mixing, as the dynamo exporter writes torch.fft)."""

from __future__ import annotations

import torch

from gradprobe.diagnostics.onnx_ops._common import (
    Attrs,
    Inputs,
    norm_axis,
    static_ints,
    unsupported,
)
from gradprobe.diagnostics.onnx_ops.registry import OpContext, register


@register("DFT")
def dft(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    """The last axis holds (real) or (real, imaginary); the output holds both, except for an
    inverse one-sided DFT (a real signal). Opset 20 moved `axis` from an attribute (default 1)
    to the third input (default -2)."""
    x = inputs[0]
    if ctx.opset >= 20:
        given = inputs[2] if len(inputs) > 2 else None
        axis = static_ints(given, ctx, "axis")[0] if given is not None else -2
    else:
        axis = attrs.get("axis", 1)
    axis = norm_axis(axis, x.dim(), ctx)
    if axis == x.dim() - 1:
        raise unsupported(ctx, "the DFT axis is the real/imaginary axis")
    length = inputs[1] if len(inputs) > 1 else None
    n = static_ints(length, ctx, "dft_length")[0] if length is not None else None
    inverse, onesided = bool(attrs.get("inverse", 0)), bool(attrs.get("onesided", 0))
    # torch's FFTs take float32/float64 only.
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if inverse and onesided:
        # One-sided spectrum in, real signal out (irfft): n defaults to 2 * (bins - 1).
        if work.shape[-1] != 2:
            raise unsupported(ctx, "an inverse one-sided DFT of a real input")
        signal = torch.view_as_complex(work.contiguous())
        return torch.fft.irfft(signal, n=n, dim=axis).unsqueeze(-1).to(x.dtype)
    if work.shape[-1] == 1:
        signal = work[..., 0]
        if onesided:
            return torch.view_as_real(torch.fft.rfft(signal, n=n, dim=axis)).to(x.dtype)
        signal = torch.complex(signal, torch.zeros_like(signal))
    elif work.shape[-1] == 2:
        signal = torch.view_as_complex(work.contiguous())
    else:
        raise unsupported(ctx, f"a last axis of {work.shape[-1]} (1: real, 2: complex)")
    out = (torch.fft.ifft if inverse else torch.fft.fft)(signal, n=n, dim=axis)
    if onesided:
        out = out.narrow(axis, 0, out.shape[axis] // 2 + 1)
    return torch.view_as_real(out).to(x.dtype)
