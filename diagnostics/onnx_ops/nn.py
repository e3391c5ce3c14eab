"""Linear layers, convolutions and pooling.

ONNX allows asymmetric and "SAME" padding and ceil-mode pooling that torch's functional ops only
cover in their symmetric form; those cases pad explicitly first and then call torch with no
implicit padding, so the window arithmetic stays exactly the spec's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradprobe.diagnostics.onnx_ops._common import Attrs, Inputs, align, static_ints, unsupported
from gradprobe.diagnostics.onnx_ops.registry import OpContext, OpResult, register

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


# ---------------------------------------------------------------- linear algebra


@register("MatMul")
def matmul(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    a, b = align(inputs[0], inputs[1])
    return torch.matmul(a, b)


@register("Gemm")
def gemm(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    a, b, c = align(inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None)
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if c is not None and a.is_floating_point():
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)
    out = torch.matmul(a, b)
    if alpha != 1.0:
        out = out * alpha
    if c is not None:
        out = out + (c * beta if beta != 1.0 else c)
    return out


@register("Einsum")
def einsum(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    equation = attrs["equation"].replace(" ", "")
    return torch.einsum(equation, *align(*inputs))


@register("Dropout")
def dropout(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> OpResult:
    # The probe measures the network as it will train minus the noise: dropout stays off.
    x = inputs[0]
    if ctx.num_outputs <= 1:
        return x
    return [x, torch.ones_like(x, dtype=torch.bool)]


# ---------------------------------------------------------------- window geometry


@dataclass(frozen=True)
class _Window:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begin: tuple[int, ...]  # explicit padding before each spatial axis
    end: tuple[int, ...]  # explicit padding after

    @property
    def extent(self) -> tuple[int, ...]:
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations, strict=True))

    @property
    def symmetric(self) -> bool:
        return self.begin == self.end


def _window(ctx: OpContext, x: torch.Tensor, attrs: Attrs,
            kernel: Sequence[int]) -> _Window:
    spatial = tuple(x.shape[2:])
    n = len(spatial)
    if len(kernel) != n:
        raise unsupported(ctx, f"kernel of rank {len(kernel)} on {n} spatial axes")
    strides = tuple(attrs.get("strides") or [1] * n)
    dilations = tuple(attrs.get("dilations") or [1] * n)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        return _Window(tuple(kernel), strides, dilations, tuple(begin), tuple(end))
    if auto_pad == "VALID":
        zeros = (0,) * n
        return _Window(tuple(kernel), strides, dilations, zeros, zeros)
    if auto_pad not in ("NOTSET", ""):
        raise unsupported(ctx, f"auto_pad '{auto_pad}'")
    pads = list(attrs.get("pads") or [0] * (2 * n))
    return _Window(tuple(kernel), strides, dilations, tuple(pads[:n]), tuple(pads[n:]))


def _torch_pads(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """Per-axis (begin, end) -> F.pad's flat list, last axis first."""
    return [n for b, e in zip(reversed(begin), reversed(end), strict=True) for n in (b, e)]


# ---------------------------------------------------------------- convolutions


@register("Col2Im")
def col2im(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    """Sum sliding blocks back into an image (torch's `fold`; MobileViTv2 written by the
    dynamo exporter), in any of 1 to 3 spatial dimensions: a grouped transposed convolution
    whose kernel puts each block entry at its offset. The spec's image excludes the pads."""
    x = inputs[0]
    image = static_ints(inputs[1] if len(inputs) > 1 else None, ctx, "image_shape")
    block = static_ints(inputs[2] if len(inputs) > 2 else None, ctx, "block_shape")
    n = len(image)
    if n not in _CONV_T or len(block) != n or x.dim() != 3:
        raise unsupported(ctx, f"a {n}-D image with {len(block)}-D blocks")
    strides = list(attrs.get("strides") or [1] * n)
    dilations = list(attrs.get("dilations") or [1] * n)
    pads = list(attrs.get("pads") or [0] * (2 * n))
    padded = [image[i] + pads[i] + pads[i + n] for i in range(n)]
    counts = [(padded[i] - dilations[i] * (block[i] - 1) - 1) // strides[i] + 1 for i in range(n)]
    size = math.prod(block)
    if x.shape[1] % size or x.shape[2] != math.prod(counts):
        raise unsupported(ctx, f"input shape {list(x.shape)} does not hold {size}-entry blocks "
                               f"at {counts} positions")
    channels = x.shape[1] // size
    kernel = torch.eye(size, dtype=x.dtype, device=x.device).reshape(size, 1, *block)
    out = _CONV_T[n](x.reshape(x.shape[0], channels * size, *counts),
                     kernel.repeat(channels, 1, *([1] * n)), None, strides, 0, 0, channels,
                     dilations)
    # Positions no block reaches stay zero; the pads are cut away.
    short = [padded[i] - out.shape[2 + i] for i in range(n)]
    if any(short):
        out = F.pad(out, _torch_pads([0] * n, short))
    return out[(..., *(slice(pads[i], pads[i] + image[i]) for i in range(n)))]



@register("Conv")
def conv(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x, w, b = align(inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None)
    n = x.dim() - 2
    if n not in _CONV:
        raise unsupported(ctx, f"{n}-D convolution")
    win = _window(ctx, x, attrs, attrs.get("kernel_shape") or w.shape[2:])
    groups = attrs.get("group", 1)
    if win.symmetric:
        return _CONV[n](x, w, b, win.strides, list(win.begin), win.dilations, groups)
    x = F.pad(x, _torch_pads(win.begin, win.end))
    return _CONV[n](x, w, b, win.strides, 0, win.dilations, groups)


@register("ConvTranspose")
def conv_transpose(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x, w, b = align(inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None)
    n = x.dim() - 2
    if n not in _CONV_T:
        raise unsupported(ctx, f"{n}-D transposed convolution")
    spatial = x.shape[2:]
    kernel = list(attrs.get("kernel_shape") or w.shape[2:])
    strides = list(attrs.get("strides") or [1] * n)
    dilations = list(attrs.get("dilations") or [1] * n)
    out_pad = list(attrs.get("output_padding") or [0] * n)
    groups = attrs.get("group", 1)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    full = [s * (i - 1) + (k - 1) * d + 1
            for i, k, s, d in zip(spatial, kernel, strides, dilations, strict=True)]

    wanted = attrs.get("output_shape")
    if wanted is None and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        wanted = [i * s for i, s in zip(spatial, strides, strict=True)]
    if wanted is not None:
        wanted = list(wanted)[-n:]
        total = [f + p - o for f, p, o in zip(full, out_pad, wanted, strict=True)]
        if auto_pad == "SAME_UPPER":
            begin, end = [t // 2 for t in total], [t - t // 2 for t in total]
        else:
            begin, end = [t - t // 2 for t in total], [t // 2 for t in total]
    elif auto_pad == "VALID":
        begin, end = [0] * n, [0] * n
    else:
        pads = list(attrs.get("pads") or [0] * (2 * n))
        begin, end = pads[:n], pads[n:]

    fits_torch = begin == end and all(
        0 <= p < max(s, d) for p, s, d in zip(out_pad, strides, dilations, strict=True)
    ) and min(begin) >= 0
    if fits_torch:
        return _CONV_T[n](x, w, b, strides, begin, out_pad, groups, dilations)
    # Full transposed convolution, then crop (or zero-extend) each axis to the asked window.
    y = _CONV_T[n](x, w, None, strides, 0, 0, groups, dilations)
    size = [f + p - bg - e for f, p, bg, e in zip(full, out_pad, begin, end, strict=True)]
    y = F.pad(y, _torch_pads([-bg for bg in begin],
                             [s - (f - bg) for s, f, bg in zip(size, full, begin, strict=True)]))
    if b is not None:
        y = y + b.reshape(1, -1, *[1] * n)
    return y


# ---------------------------------------------------------------- pooling


def _pool_output(win: _Window, spatial: Sequence[int], ceil_mode: bool) -> list[int]:
    sizes = []
    for i, size in enumerate(spatial):
        span = size + win.begin[i] + win.end[i] - win.extent[i]
        out = (-(-span // win.strides[i]) if ceil_mode else span // win.strides[i]) + 1
        # A window must start inside the input or its leading padding.
        if ceil_mode and (out - 1) * win.strides[i] >= size + win.begin[i]:
            out -= 1
        sizes.append(out)
    return sizes


def _ceil_extra(win: _Window, spatial: Sequence[int], out: Sequence[int]) -> list[int]:
    """Padding past the explicit one that ceil mode's last windows reach into."""
    return [max((o - 1) * s + e - (size + b + en), 0) for o, s, e, size, b, en in
            zip(out, win.strides, win.extent, spatial, win.begin, win.end, strict=True)]


def _pool_setup(ctx: OpContext, x: torch.Tensor,
                attrs: Attrs) -> tuple[_Window, list[int], list[int]]:
    if x.dim() - 2 not in _MAX_POOL:
        raise unsupported(ctx, f"{x.dim() - 2}-D pooling")
    if "kernel_shape" not in attrs:
        raise unsupported(ctx, "attribute 'kernel_shape' is missing")
    win = _window(ctx, x, attrs, attrs["kernel_shape"])
    spatial = list(x.shape[2:])
    out = _pool_output(win, spatial, bool(attrs.get("ceil_mode", 0)))
    return win, out, _ceil_extra(win, spatial, out)


def _crop(y: torch.Tensor, out: Sequence[int]) -> torch.Tensor:
    return y[(slice(None), slice(None), *(slice(0, o) for o in out))]


@register("MaxPool")
def max_pool(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> OpResult:
    x = inputs[0]
    win, out, extra = _pool_setup(ctx, x, attrs)
    n = x.dim() - 2
    want_indices = ctx.num_outputs > 1
    torch_pads_ok = win.symmetric and not any(extra) and all(
        p <= k // 2 for p, k in zip(win.begin, win.kernel, strict=True))
    if torch_pads_ok:
        padded, pads = x, list(win.begin)
    else:
        fill = float("-inf") if x.is_floating_point() else torch.iinfo(x.dtype).min
        end = [e + ex for e, ex in zip(win.end, extra, strict=True)]
        padded, pads = F.pad(x, _torch_pads(win.begin, end), value=fill), [0] * n
    result = _MAX_POOL[n](padded, win.kernel, win.strides, pads, win.dilations,
                          return_indices=want_indices)
    if not want_indices:
        return _crop(result, out)
    y, flat = result
    y, flat = _crop(y, out), _crop(flat, out)
    offsets = [0] * n if torch_pads_ok else list(win.begin)
    return [y, _onnx_pool_indices(flat, x.shape, padded.shape, offsets,
                                  attrs.get("storage_order", 0))]


def _onnx_pool_indices(flat: torch.Tensor, shape: Sequence[int], padded_shape: Sequence[int],
                       offsets: Sequence[int], storage_order: int) -> torch.Tensor:
    """torch's per-plane indices (into the padded input) -> ONNX's indices into the whole input."""
    spatial, padded = list(shape[2:]), list(padded_shape[2:])
    coords = []
    rest = flat
    for size in reversed(padded):
        coords.append(rest.remainder(size))
        rest = torch.div(rest, size, rounding_mode="floor")
    coords = [c - off for c, off in zip(reversed(coords), offsets, strict=True)]
    index = torch.zeros_like(flat)
    order = range(len(spatial)) if storage_order == 0 else reversed(range(len(spatial)))
    for axis in order:
        index = index * spatial[axis] + coords[axis]
    planes = torch.arange(shape[0] * shape[1], device=flat.device).reshape(
        shape[0], shape[1], *[1] * len(spatial))
    return index + planes * math.prod(spatial)


@contextmanager
def _full_precision_convolution(device: torch.device) -> Iterator[None]:
    """cuDNN convolutions in IEEE float32 for the duration. A window sum computed as a
    convolution must be as exact as the pooling it stands for, and cuDNN rounds float32
    operands to TF32 (10-bit mantissa) by default: a relative error of ~1e-3."""
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        previous = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = previous
        return
    previous_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous_tf32


@register("AveragePool")
def average_pool(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    win, out, extra = _pool_setup(ctx, x, attrs)
    n = x.dim() - 2
    include_pad = bool(attrs.get("count_include_pad", 0))
    if win.symmetric and not any(extra) and set(win.dilations) == {1} and all(
            p <= k // 2 for p, k in zip(win.begin, win.kernel, strict=True)):
        return _crop(_AVG_POOL[n](x, win.kernel, win.strides, list(win.begin),
                                  count_include_pad=include_pad), out)
    # Window sums by a ones-kernel convolution (handles dilation), divided by how many of
    # the window's positions count: input always, explicit padding if count_include_pad.
    end = [e + ex for e, ex in zip(win.end, extra, strict=True)]
    padded = F.pad(x, _torch_pads(win.begin, end))
    ones = torch.ones((1, 1, *win.kernel), dtype=x.dtype, device=x.device)
    planes = padded.reshape(-1, 1, *padded.shape[2:])
    with _full_precision_convolution(x.device):
        sums = _CONV[n](planes, ones, None, win.strides, 0, win.dilations)
    mask = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    mask = F.pad(mask, _torch_pads(win.begin, win.end), value=1.0 if include_pad else 0.0)
    mask = F.pad(mask, _torch_pads([0] * n, extra))
    counts = _CONV[n](mask, ones, None, win.strides, 0, win.dilations)
    y = (sums / counts).reshape(*x.shape[:2], *sums.shape[2:])
    return _crop(y, out)


@register("GlobalAveragePool")
def global_average_pool(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@register("GlobalMaxPool")
def global_max_pool(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)
