"""Small helpers shared by the operator families."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradprobe.diagnostics.errors import UnsupportedOperator
from gradprobe.diagnostics.onnx_ops.registry import OpContext, OpResult

Inputs = list[torch.Tensor | None]
Attrs = dict[str, Any]

# torch has almost no arithmetic kernels for these; ops compute them in int64 and cast back.
# (uint64 values at or above 2**63 would wrap; real models do not carry such tensors.)
WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def unsupported(ctx: OpContext, detail: str) -> UnsupportedOperator:
    return UnsupportedOperator(ctx.op_type, ctx.node, detail)


def static_ints(t: torch.Tensor | None, ctx: OpContext, what: str) -> list[int]:
    """Values of a shape-like integer tensor as Python ints.

    Shape-like tensors (Shape outputs, integer constants) live on the CPU, so this does not
    wait on the accelerator. Float tensors are refused: reading them would sync the device.
    """
    if t is None:
        raise unsupported(ctx, f"input '{what}' is missing")
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise unsupported(ctx, f"input '{what}' must be an integer tensor, got {t.dtype}")
    return [int(v) for v in t.reshape(-1).cpu().tolist()]


def static_scalar(t: torch.Tensor, ctx: OpContext, what: str) -> float | int:
    """A scalar that decides a shape (Range bounds, OneHot depth): read on the host.

    Such scalars come from constants or shape arithmetic and sit on the CPU.
    """
    if t.numel() != 1:
        raise unsupported(ctx, f"input '{what}' must hold one value, got shape {list(t.shape)}")
    return t.reshape(()).cpu().tolist()


def static_floats(t: torch.Tensor, ctx: OpContext, what: str) -> list[float]:
    """Values of a float input that decides output shapes or sampling grids (Resize scales
    and roi). These are constants; read them on the host like shape-like integers."""
    return [float(v) for v in t.detach().reshape(-1).cpu().tolist()]


def axes_arg(ctx: OpContext, inputs: Inputs, attrs: Attrs, index: int) -> list[int] | None:
    """`axes` from input `index` (newer opsets) or from the attribute (older ones)."""
    if len(inputs) > index and inputs[index] is not None:
        return static_ints(inputs[index], ctx, "axes")
    if "axes" in attrs:
        return list(attrs["axes"])
    return None


def norm_axis(axis: int, rank: int, ctx: OpContext) -> int:
    if not -rank <= axis < max(rank, 1):
        raise unsupported(ctx, f"axis {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def device_of(*tensors: torch.Tensor | None) -> torch.device:
    """The device where a combination of tensors runs: the first one off the CPU, if any."""
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            return t.device
    return torch.device("cpu")


def align(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Move CPU tensors (shape arithmetic, constants) to the device of the data they meet."""
    target = device_of(*tensors)
    return [t.to(target) if t is not None and t.device != target else t for t in tensors]


def to_device_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return t if t.device == ref.device else t.to(ref.device)


def widened(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run `fn` on int64 copies of uint16/32/64 inputs and cast those outputs back."""

    def run(*tensors: torch.Tensor) -> Any:
        wide = next((t.dtype for t in tensors if t is not None and t.dtype in WIDE_UNSIGNED),
                    None)
        if wide is None:
            return fn(*tensors)
        args = [t.to(torch.int64) if t is not None and t.dtype == wide else t for t in tensors]
        out = fn(*args)
        if isinstance(out, torch.Tensor):
            return out.to(wide) if out.dtype == torch.int64 else out
        return type(out)(o.to(wide) if o.dtype == torch.int64 else o for o in out)

    return run


def node_outputs(ctx: OpContext, values: Sequence[torch.Tensor]) -> OpResult:
    """The first `ctx.num_outputs` values; a lone tensor when the node declares one output."""
    if ctx.num_outputs <= 1:
        return values[0]
    return list(values[:ctx.num_outputs])


def pairs(values: Sequence[int]) -> list[tuple[int, int]]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] -> [(b1, e1), (b2, e2), ...]."""
    half = len(values) // 2
    return list(zip(values[:half], values[half:], strict=True))
