"""Draw the values of one tensor for a named init scheme, reproducibly.

Every tensor gets its own CPU generator seeded from the run's seed and the tensor's name, so a
tensor's new values depend only on (seed, name, scheme, shape): the same on every device, and
unchanged when some other tensor is added to or dropped from the repair plan.
"""

from __future__ import annotations

import zlib
from typing import Literal

import torch

Layout = Literal["out_in", "in_out"]


def generator_for(seed: int, name: str) -> torch.Generator:
    # crc32, not hash(): Python salts str hashes per process.
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def as_out_in(shape: torch.Size | tuple[int, ...], layout: Layout) -> tuple[int, int]:
    """The (output units, inputs per unit) matrix a weight of this shape stands for."""
    if len(shape) == 2 and layout == "in_out":
        return shape[1], shape[0]
    rest = 1
    for d in shape[1:]:
        rest *= d
    return shape[0], rest


def from_out_in(matrix: torch.Tensor, shape: torch.Size | tuple[int, ...],
                layout: Layout) -> torch.Tensor:
    if len(shape) == 2 and layout == "in_out":
        return matrix.t().contiguous()
    return matrix.reshape(shape)


def orthogonal(shape: torch.Size | tuple[int, ...], layout: Layout, gain: float,
               gen: torch.Generator) -> torch.Tensor:
    """A (semi-)orthogonal (out, in) matrix laid out as the weight is stored (Saxe et al. 2014)."""
    rows, cols = as_out_in(shape, layout)
    matrix = torch.nn.init.orthogonal_(torch.empty(rows, cols), gain=gain, generator=gen)
    return from_out_in(matrix, shape, layout)


def draw(scheme: str, shape: torch.Size | tuple[int, ...], *, std: float | None = None,
         bound: float | None = None, gain: float = 1.0, layout: Layout = "out_in",
         gen: torch.Generator) -> torch.Tensor:
    """New float32 CPU values: normal(0, std) for the *_normal schemes, uniform(-bound, bound)
    for the *_uniform ones, an orthogonal matrix for 'orthogonal', zeros for 'zeros', `gain` for
    'ones' (a norm scale or gate that cut the signal: 1, see init_schemes.unit_scale)."""
    if scheme == "zeros":
        return torch.zeros(shape)
    if scheme == "ones":
        return torch.full(shape, gain)
    if scheme == "orthogonal":
        return orthogonal(shape, layout, gain, gen)
    if scheme.endswith("_uniform"):
        if bound is None:
            raise ValueError(f"{scheme} needs a bound")
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound
    if scheme == "normal" or scheme.endswith("_normal"):
        if std is None:
            raise ValueError(f"{scheme} needs a std")
        return torch.randn(shape, generator=gen) * std
    raise ValueError(f"unknown init scheme {scheme!r}")
