"""LSTM, GRU and RNN written out as their ONNX equations in torch ops.

Written step by step (not through torch.nn.LSTM) so that gradients reach W, R, B and P as the
graph's own initializers, and so every ONNX option (gate order, activations, clip, peepholes,
linear_before_reset, layouts, directions, per-sequence lengths) means exactly what the spec
says. The input projection of all time steps is one matmul; only the recurrence loops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradprobe.diagnostics.onnx_ops._common import Attrs, Inputs, align, node_outputs, unsupported
from gradprobe.diagnostics.onnx_ops.registry import OpContext, OpResult, register

Activation = Callable[[torch.Tensor], torch.Tensor]

# name -> (builder from alpha, beta; default alpha; default beta). None: takes no such value.
_ACTIVATIONS: dict[str, tuple[Callable[[float, float], Activation], float | None,
                              float | None]] = {
    "relu": (lambda a, b: torch.relu, None, None),
    "tanh": (lambda a, b: torch.tanh, None, None),
    "sigmoid": (lambda a, b: torch.sigmoid, None, None),
    "affine": (lambda a, b: lambda x: x * a + b, 1.0, 0.0),
    "leakyrelu": (lambda a, b: lambda x: F.leaky_relu(x, a), 0.01, None),
    "thresholdedrelu": (lambda a, b: lambda x: torch.where(x > a, x, torch.zeros_like(x)),
                        1.0, None),
    "scaledtanh": (lambda a, b: lambda x: a * torch.tanh(b * x), 1.0, 1.0),
    "hardsigmoid": (lambda a, b: lambda x: torch.clamp(a * x + b, 0.0, 1.0), 0.2, 0.5),
    "elu": (lambda a, b: lambda x: F.elu(x, a), 1.0, None),
    "softsign": (lambda a, b: F.softsign, None, None),
    "softplus": (lambda a, b: F.softplus, None, None),
}


@dataclass(frozen=True)
class _Kind:
    gates: int
    default_activations: tuple[str, ...]


_KINDS = {
    "LSTM": _Kind(4, ("Sigmoid", "Tanh", "Tanh")),
    "GRU": _Kind(3, ("Sigmoid", "Tanh")),
    "RNN": _Kind(1, ("Tanh",)),
}


def _activations(ctx: OpContext, attrs: Attrs, kind: _Kind, directions: int) -> list[Activation]:
    names = list(attrs.get("activations") or kind.default_activations * directions)
    per_direction = len(kind.default_activations)
    if len(names) == per_direction and directions == 2:
        names = names * 2
    if len(names) != per_direction * directions:
        raise unsupported(ctx, f"{len(names)} activations for {directions} direction(s)")
    alphas, betas = list(attrs.get("activation_alpha", [])), list(attrs.get("activation_beta", []))
    built = []
    for name in names:
        entry = _ACTIVATIONS.get(name.lower())
        if entry is None:
            raise unsupported(ctx, f"activation '{name}'")
        make, default_alpha, default_beta = entry
        # alpha/beta lists are consumed in order by the activations that take them.
        alpha = alphas.pop(0) if default_alpha is not None and alphas else default_alpha
        beta = betas.pop(0) if default_beta is not None and betas else default_beta
        built.append(make(alpha, beta))
    return built


@dataclass
class _Direction:
    """One direction's weights and starting state."""

    w: torch.Tensor  # [gates*H, I]
    r: torch.Tensor  # [gates*H, H]
    wb: torch.Tensor | None  # [gates*H]
    rb: torch.Tensor | None
    h0: torch.Tensor  # [batch, H]
    c0: torch.Tensor | None
    peephole: torch.Tensor | None  # [3H], order i, o, f
    acts: Sequence[Activation]
    reverse: bool


@register("LSTM", "GRU", "RNN")
def recurrent(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> OpResult:
    kind = _KINDS[ctx.op_type]
    padded = list(inputs) + [None] * (8 - len(inputs))
    x, w, r, b, lens, h0, c0, peephole = align(*padded[:8])
    if ctx.op_type != "LSTM":
        c0 = peephole = None
    layout = attrs.get("layout", 0)
    if layout:  # batch-major -> time-major, and back at the end
        x = x.transpose(0, 1)
        h0 = h0.transpose(0, 1) if h0 is not None else None
        c0 = c0.transpose(0, 1) if c0 is not None else None
    seq, batch = x.shape[0], x.shape[1]
    direction = attrs.get("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise unsupported(ctx, f"direction '{direction}'")
    directions = 2 if direction == "bidirectional" else 1
    hidden = attrs.get("hidden_size") or r.shape[-1]
    if attrs.get("input_forget", 0) and ctx.op_type == "LSTM":
        raise unsupported(ctx, "input_forget=1 (coupled input and forget gates)")
    acts = _activations(ctx, attrs, kind, directions)
    per = len(kind.default_activations)
    valid = _valid_steps(lens, seq, x)
    g = kind.gates * hidden

    ys, hs, cs = [], [], []
    for d in range(directions):
        zeros = x.new_zeros(batch, hidden)
        state = _Direction(
            w=w[d], r=r[d],
            wb=b[d, :g] if b is not None else None, rb=b[d, g:] if b is not None else None,
            h0=h0[d] if h0 is not None else zeros,
            c0=(c0[d] if c0 is not None else zeros) if ctx.op_type == "LSTM" else None,
            peephole=peephole[d] if peephole is not None else None,
            acts=acts[d * per:(d + 1) * per],
            reverse=direction == "reverse" or d == 1,
        )
        y, h_last, c_last = _run_direction(ctx, attrs, x, state, valid)
        ys.append(y)
        hs.append(h_last)
        cs.append(c_last)

    y = torch.stack(ys, dim=1)  # [seq, dirs, batch, H]
    y_h = torch.stack(hs, dim=0)  # [dirs, batch, H]
    outputs = [y, y_h]
    if ctx.op_type == "LSTM":
        outputs.append(torch.stack(cs, dim=0))
    if layout:
        outputs = [y.permute(2, 0, 1, 3)] + [o.transpose(0, 1) for o in outputs[1:]]
    return node_outputs(ctx, outputs)


def _valid_steps(lens: torch.Tensor | None, seq: int, x: torch.Tensor) -> torch.Tensor | None:
    """[seq, batch, 1] mask of the steps inside each sequence; None when all are full length."""
    if lens is None:
        return None
    if lens.device.type == "cpu" and bool((lens == seq).all()):
        return None
    steps = torch.arange(seq, device=x.device).reshape(seq, 1, 1)
    return steps < lens.to(x.device).reshape(1, -1, 1)


def _run_direction(ctx: OpContext, attrs: Attrs, x: torch.Tensor, state: _Direction,
                   valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor,
                                                        torch.Tensor | None]:
    clip = attrs.get("clip")
    projected = torch.matmul(x, state.w.t())  # [seq, batch, gates*H]
    if state.wb is not None:
        projected = projected + state.wb
    step = {"LSTM": _lstm_step, "GRU": _gru_step, "RNN": _rnn_step}[ctx.op_type]
    lbr = bool(attrs.get("linear_before_reset", 0))
    h, c = state.h0, state.c0
    outputs: list[torch.Tensor] = [x.new_empty(0)] * x.shape[0]
    order = range(x.shape[0] - 1, -1, -1) if state.reverse else range(x.shape[0])
    # A step past a sequence's length keeps its state and outputs zero; running the reverse
    # direction over the padded tail first therefore starts each sequence at its own end.
    for t in order:
        h_new, c_new = step(projected[t], h, c, state, clip, lbr)
        if valid is not None:
            h_new = torch.where(valid[t], h_new, h)
            c_new = torch.where(valid[t], c_new, c) if c is not None else None
            outputs[t] = torch.where(valid[t], h_new, torch.zeros_like(h_new))
        else:
            outputs[t] = h_new
        h, c = h_new, c_new
    return torch.stack(outputs, dim=0), h, c


def _clip(v: torch.Tensor, clip: float | None) -> torch.Tensor:
    return torch.clamp(v, -clip, clip) if clip is not None else v


def _recur(h: torch.Tensor, state: _Direction, rows: slice) -> torch.Tensor:
    out = torch.matmul(h, state.r[rows].t())
    return out + state.rb[rows] if state.rb is not None else out


def _lstm_step(xw: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, state: _Direction,
               clip: float | None, lbr: bool) -> tuple[torch.Tensor, torch.Tensor]:
    f, g, h_act = state.acts
    gates = xw + _recur(h, state, slice(None))
    i, o, fg, cand = gates.chunk(4, dim=-1)  # ONNX gate order: input, output, forget, cell
    if state.peephole is not None:
        p_i, p_o, p_f = state.peephole.chunk(3)
        i, fg = i + p_i * c, fg + p_f * c
    i, fg, cand = f(_clip(i, clip)), f(_clip(fg, clip)), g(_clip(cand, clip))
    c_new = fg * c + i * cand
    if state.peephole is not None:
        o = o + p_o * c_new
    o = f(_clip(o, clip))
    return o * h_act(c_new), c_new


def _gru_step(xw: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, state: _Direction,
              clip: float | None, lbr: bool) -> tuple[torch.Tensor, None]:
    f, g = state.acts
    hidden = h.shape[-1]
    x_z, x_r, x_h = xw.chunk(3, dim=-1)  # ONNX gate order: update, reset, hidden
    h_zr = _recur(h, state, slice(0, 2 * hidden))
    h_z, h_r = h_zr.chunk(2, dim=-1)
    z = f(_clip(x_z + h_z, clip))
    r = f(_clip(x_r + h_r, clip))
    rows = slice(2 * hidden, 3 * hidden)
    # linear_before_reset applies the reset gate after the recurrent matmul (cuDNN's form).
    candidate = x_h + (r * _recur(h, state, rows) if lbr else _recur(r * h, state, rows))
    h_tilde = g(_clip(candidate, clip))
    return (1 - z) * h_tilde + z * h, None


def _rnn_step(xw: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, state: _Direction,
              clip: float | None, lbr: bool) -> tuple[torch.Tensor, None]:
    (f,) = state.acts
    return f(_clip(xw + _recur(h, state, slice(None)), clip)), None
