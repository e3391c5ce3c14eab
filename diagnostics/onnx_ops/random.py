"""Random draws (RandomUniform/Normal and their *Like forms): a masked-autoencoder ViT draws its
patch mask with RandomUniformLike, so the graph needs them to run at all.

The probe must be reproducible, so every draw comes from a CPU generator seeded by the node's
`seed` attribute (0 when the file gives none) and is then moved to the model's device: the same
values on every device and every run.
"""

from __future__ import annotations

import torch

from gradprobe.diagnostics.onnx_ops.registry import OpContext, register
from gradprobe.diagnostics.onnx_ops.tensors import onnx_dtype_to_torch

Inputs = list[torch.Tensor | None]
Attrs = dict


def _draw(attrs: Attrs, shape: list[int], like: torch.Tensor | None, normal: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(attrs.get("seed", 0.0)))
    if "dtype" in attrs:
        dtype = onnx_dtype_to_torch(attrs["dtype"])
    else:
        dtype = like.dtype if like is not None else torch.float32
    if normal:
        value = torch.randn(shape, generator=gen) * attrs.get("scale", 1.0) + attrs.get("mean", 0.0)
    else:
        low, high = attrs.get("low", 0.0), attrs.get("high", 1.0)
        value = torch.rand(shape, generator=gen) * (high - low) + low
    device = like.device if like is not None else None
    return value.to(device=device, dtype=dtype)


@register("RandomUniformLike")
def random_uniform_like(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return _draw(attrs, list(inputs[0].shape), inputs[0], normal=False)


@register("RandomNormalLike")
def random_normal_like(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return _draw(attrs, list(inputs[0].shape), inputs[0], normal=True)


@register("RandomUniform")
def random_uniform(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return _draw(attrs, list(attrs["shape"]), None, normal=False)


@register("RandomNormal")
def random_normal(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return _draw(attrs, list(attrs["shape"]), None, normal=True)
