"""A synthetic image batch that varies across samples the way real images do.

I.i.d. N(0, 1) pixels are a poor stand-in for images in one measurable way: every sample has the
same statistics, so after a global average pool every sample gives nearly the same vector. A
squeeze-excite block (pool -> 1x1 conv -> ReLU) then sees almost no variation across the batch,
and half its units are silent for the whole batch — on real images they are not (MobileNetV3,
EfficientNet, RegNet). Real images differ per sample in brightness and colour (a per-channel
offset), contrast (a per-sample scale) and low-frequency content (large shapes); the batch here
has all three on top of the pixel noise, and is standardised over the whole batch so the model
still sees the unit-variance, zero-mean input that normalised data gives.
"""

from __future__ import annotations

import torch

IMAGE_CHANNELS = (1, 3, 4)
MIN_SIDE = 8
COARSE_GRID = 4  # the low-frequency content: a 4x4 random field, upsampled


def looks_like_images(shape: list[int] | tuple[int, ...]) -> bool:
    """(batch, channels, height, width) with greyscale/RGB/RGBA channels."""
    return (len(shape) == 4 and shape[1] in IMAGE_CHANNELS
            and shape[2] >= MIN_SIDE and shape[3] >= MIN_SIDE)


def image_batch(shape: list[int] | tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    n, c, h, w = shape
    noise = torch.randn(n, c, h, w, generator=gen)
    coarse = torch.randn(n, c, COARSE_GRID, COARSE_GRID, generator=gen)
    coarse = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear",
                                             align_corners=False)
    contrast = torch.exp(0.35 * torch.randn(n, 1, 1, 1, generator=gen))
    brightness = 0.5 * torch.randn(n, c, 1, 1, generator=gen)
    x = contrast * (0.6 * noise + 0.8 * coarse) + brightness
    return (x - x.mean()) / x.std().clamp_min(1e-12)


NOTE = ("synthetic image batch: pixel noise plus per-sample brightness, contrast and "
        "low-frequency content, so samples differ as real images do (pass --input for real data)")
