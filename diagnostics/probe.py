"""Forward a probe batch, backward a fixed cotangent, and measure every probe point.

Statistics are computed on the model's device inside the forward taps and the gradient hooks;
only small stat vectors are kept, and they reach the host in one copy at the end of a pass.

Two passes when the model starts with deliberate zeros: the first pass measures the network
exactly as initialised. A zero layer (zero head, zero-init residual gamma, LoRA B) blocks every
upstream gradient at step 0, which would make healthy layers look dead; so a second "flow" pass
sets those zero tensors to their textbook init — what they look like after the first update —
and measures gradient flow through the rest of the network.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch

from gradprobe.diagnostics.errors import ProbeError
from gradprobe.diagnostics.graph import LoadedModel, ProbePoint
from gradprobe.diagnostics.init_schemes import recommended_init, unit_scale
from gradprobe.diagnostics.report import ActivationStats, GradientStats, ParameterStats

# A sigmoid/tanh entry is saturated when its local derivative is below 1% of its peak
# (sigmoid: |x| > ~4.6, tanh: |x| > ~3.0): less than 1% of the gradient passes through it.
SATURATION_DERIVATIVE = 0.01

_ACT_FIELDS = ("mean", "var", "min", "max", "zero_fraction", "dead_units", "saturation", "nonfinite",
               "sample_var")
_GRAD_FIELDS = ("norm", "rms", "nonfinite")
_PARAM_FIELDS = ("mean", "std", "abs_max", "nonfinite", "grad_norm", "grad_rms", "grad_to_weight",
                 "zero_grad_fraction", "nonfinite_grad", "unit_spread", "constant")


@dataclass
class LayerProbe:
    point: ProbePoint
    activation: ActivationStats | None = None
    gradient: GradientStats | None = None  # from the flow pass
    # Fraction of the value's entries the gradient reaches (non-zero), flow pass. A ReLU
    # passes about half; a max pool to a few cells routes it to the entries each window picked.
    gradient_reach: float | None = None


@dataclass
class ParamProbe:
    stats: ParameterStats  # gradients from the flow pass, except for the unblocked tensors
    layer: str
    # Largest difference between two output units' gradients relative to the largest
    # gradient entry, first pass. 0 means every unit receives the same update: symmetry
    # can never break. Measured for constant (and zero) layer weights only, the ones it
    # judges; None for every other parameter.
    unit_spread: float | None
    unused: bool  # no gradient path from the output at all
    # 2: a tensor whose gradient a zero tensor blocks at init, and which gets one at the
    # second step, once the zeros that receive a gradient at the first have moved. A zero
    # layer weight (a zero-init branch end inside a block whose last BatchNorm scale is zero,
    # as timm's GlobalContext `mlp_add.fc2` sits in ByobNet's blocks) is then judged by that
    # gradient; any other keeps its flow-pass statistics (zero gradient) and only this mark
    # (Doge's `dt_proj`, behind its zero-init `A`).
    judged_at_step: int = 1


@dataclass
class ProbeResult:
    model: LoadedModel
    layers: list[LayerProbe]
    params: dict[str, ParamProbe]
    # Parameters set to their textbook init for the flow pass (deliberate-looking zeros).
    unblocked: list[str] = field(default_factory=list)
    # False when every sample of the batch gives the same output (first pass): the output no
    # longer depends on the input, even where no probed value shows where (a zero scale after
    # the last probe point).
    output_varies: bool = True
    # Samples in the probe batch (the first input's leading axis): what a BatchNorm run on
    # batch statistics averages over.
    samples: int | None = None
    # E[x^2] of the network's output (the smallest over its outputs, first pass): the scale
    # that reaches the output, whatever layers the probe did not see (a hand-written RMSNorm).
    output_power: float | None = None
    # Every output row (last axis) has the same RMS: a norm ends the network (a LayerNorm, an
    # RMSNorm or an L2 normalisation, which gives 1/sqrt(d)), so no scale before it reaches
    # the output, whatever the probe saw of that norm.
    output_normalised: bool = False
    # Every output entry is finite (first pass). A NaN inside the network that a masked fill
    # or a `where` overwrites (a softmax over an attention row masked out entirely) does not
    # reach the output or the loss.
    output_finite: bool = True

    def of_role(self, role: str) -> Iterator[LayerProbe]:
        """Points of a role; "norm" means the norms of the signal (not weight standardisation)."""
        return (lp for lp in self.layers if (lp.point.normalises_signal if role == "norm"
                                             else lp.point.role == role))

    def activations(self, *kinds: str) -> Iterator[LayerProbe]:
        return (lp for lp in self.layers
                if lp.point.role == "activation" and lp.point.nonlinearity in kinds)

    def producer_of(self, activation: LayerProbe) -> LayerProbe | None:
        """The linear layer that feeds this activation directly, if the loader knows one."""
        return next((lp for lp in self.layers
                     if lp.point.role == "linear" and activation.point.node in lp.point.feeds), None)

    def norm_between(self, producer: LayerProbe, activation: LayerProbe) -> LayerProbe | None:
        """The normalisation layer between a linear layer and the activation it feeds (conv ->
        BatchNorm -> ReLU), if any: its shift, not the conv's bias, decides what the ReLU sees."""
        if not producer.point.followed_by_norm:
            return None
        between = [lp for lp in self.layers if lp.point.normalises_signal
                   and producer.point.index < lp.point.index < activation.point.index]
        return between[-1] if between else None

    def signal_cut(self) -> LayerProbe | None:
        """Where the network's output stops depending on its input: the first probed value that
        is identical for every sample of the batch while nothing after it varies again. None when
        the output still varies across the batch (a zero-init residual branch, LoRA's B or a
        ControlNet zero conv go flat on one path while the skip path carries the signal on), and
        when the cut is the last layer (a zero head).

        Table lookups are never the cut: position and token-type embeddings are the same for
        every sample by construction. Nor is a value after which no point is probed while the
        output still varies: attention weights from a zero-initialised query (a uniform softmax,
        the same for every sample) still average input-dependent values into the output."""
        if self.output_varies:
            return None
        varying = [lp for lp in self.layers if lp.activation is not None
                   and not lp.point.is_embedding and not lp.point.on_weights
                   and lp.activation.nonfinite == 0]
        cut = None
        for lp in reversed(varying):
            if lp.activation.sample_var != 0:  # type: ignore[union-attr]
                break
            cut = lp
        if cut is not None and cut.point.role == "linear" and not any(
                lp.point.index > cut.point.index for lp in self.of_role("linear")):
            return None  # a zero head: constant logits at step 0, trains from the first update
        return cut

    def zero_tensors_outside_layers(self) -> list[str]:
        """All-zero tensors that no probed layer owns (not biases): a gate or scale multiplied
        in between probe points or after the last one, the suspects of a signal cut."""
        owned = {n for lp in self.layers for n in (lp.point.weight, lp.point.bias) if n}
        return [name for name, p in self.params.items()
                if p.stats.abs_max == 0 and not p.stats.nonfinite and name not in owned
                and not name.endswith("bias")]

    def normalised_before_next_layer(self, layer: LayerProbe) -> bool:
        """True when a normalisation (BatchNorm, LayerNorm, ...) sits between this layer and the
        next parameterised one, or the layer carries a folded BatchNorm: whatever scale this
        layer's output has, the norm restores it, so its activation and per-entry gradient say
        nothing about the signal that reaches the output."""
        if layer.point.followed_by_norm:
            return True
        for lp in self.layers:
            if lp.point.index <= layer.point.index:
                continue
            if lp.point.role == "linear":
                return False
            if lp.point.normalises_signal:
                return True
        return False

    def starves_next_layer(self, layer: LayerProbe) -> bool:
        """True when every value probed between this layer and the next parameterised one is
        identical across the batch and what it hands on carries nothing: the next layer is fed
        nothing (a zeroed first layer of a residual branch, in front of GELU, norm or ReLU). A
        deliberate zero at the end of a branch is followed by the residual add, whose activation
        still varies.

        Graph order is not data flow: the next layer in the graph need not read these values.
        A value that is exactly zero starves what it multiplies (LLaMA's
        `act(gate_proj(x)) * up_proj(x)` with a zeroed gate_proj: `down_proj` is then fed
        nothing), but not what it is added to: a branch whose last layer starts at zero (its
        BatchNorm scale 0, folded into the conv by an eval-mode ONNX export) hands the shortcut
        on unchanged, and in DarkNet/CSP blocks no activation after the add shows it. So a zero
        starves only when a later layer, before the next norm, is fed nothing. A constant that
        is not zero still weighs or averages input-dependent values (a zero-initialised MoE
        router: sigmoid(0) = 0.5 for every expert, uniform routing, as AFMoE starts), so it
        starves the next layer only when that layer's own output is the same for every sample.

        When nothing is probed in between (a product of two projections: LLaMA's
        `down_proj(act(gate_proj(x)) * up_proj(x))`), the next layer's own output tells: with a
        non-zero weight it varies across the batch whenever its input does."""
        between = []
        # A squeeze-excite branch after the layer pools what it hands on and scales it back:
        # pooled, a deliberate zero at the end of a branch feeds the excitation's projections
        # nothing, and they do not carry the signal on; the next layer on the main path does.
        skip_pooled = not self.behind_global_pool(layer)
        for lp in self.layers:
            if lp.point.index <= layer.point.index or lp.point.on_weights:
                continue
            if lp.point.role == "linear" and skip_pooled and self.behind_global_pool(lp):
                continue
            if lp.point.role == "linear":
                if not between or not all(b.activation is not None
                                          and b.activation.sample_var == 0 for b in between):
                    return not between and self._fed_nothing(lp)
                return self._fed_nothing(lp) or (any(_all_zero(b.activation) for b in between)
                                                  and self._fed_nothing_from(lp, skip_pooled))
            between.append(lp)
        return False

    def behind_global_pool(self, layer: LayerProbe) -> bool:
        """In a network with spatial (or sequence) layers, a parameterised layer that sees one
        position per sample sits behind a global pool: a squeeze-excite branch or the head.
        Its per-entry values are sums over the positions pooled. A plain stack has none.
        ECA's Conv1d slides across the pooled channels, so they count as its positions: the
        loader saw it read the pool."""
        if layer.point.reads_global_pool:
            return True
        sizes = self._positions_per_unit
        fewest = min(sizes.values(), default=0.0)
        mine = sizes.get(layer.point.index)
        return (mine is not None and mine <= fewest
                and any(size > fewest for size in sizes.values()))

    def gradient_reach_after(self, layer: LayerProbe) -> float | None:
        """The fraction of entries the gradient reaches in the nonlinearity this layer feeds
        (the largest, where it feeds several): about 1 where the next layer reads every
        position, ~1/4 behind a strided max pool, ~1% where the value is max-pooled to a few
        cells (timm's BAT attention pools its two channels to 7-cell maps)."""
        reach = [lp.gradient_reach for lp in self.layers
                 if lp.point.node in layer.point.feeds and lp.gradient_reach is not None]
        return max(reach, default=None)

    def positions_per_unit(self, layer: LayerProbe) -> float | None:
        """Samples x positions the layer's output units were measured on: its resolution. A
        per-entry gradient is a sum over the positions downstream of it, so values compare
        between layers at one resolution."""
        return self._positions_per_unit.get(layer.point.index)

    @cached_property
    def _positions_per_unit(self) -> dict[int, float]:
        """Samples x positions each parameterised layer's output unit was measured on."""
        return {lp.point.index: lp.activation.numel / max(lp.activation.units, 1)
                for lp in self.layers if lp.point.role == "linear" and lp.activation is not None}

    def _fed_nothing_from(self, start: LayerProbe, skip_pooled: bool) -> bool:
        """Some parameterised layer from `start` on, before the next norm, is fed nothing
        (leaving out squeeze-excite projections with `skip_pooled`)."""
        for lp in self.layers:
            if lp.point.index < start.point.index:
                continue
            if lp.point.normalises_signal:
                return False
            if lp.point.role == "linear" and self._fed_nothing(lp) and not (
                    skip_pooled and self.behind_global_pool(lp)):
                return True
        return False

    def fed_power(self, layer: LayerProbe) -> float | None:
        """E[x^2] of what this layer was fed, read off its own output: at init a weight is drawn
        independently of its input, so Var(out) ~ fan_in * Var(W) * E[x^2] per output entry.
        This goes by data flow, not graph order: the layer before it in the graph need not be
        what it reads (LLaMA's q_proj reads the RMSNorm of the residual stream, not the
        previous block's down_proj; a hand-written RMSNorm is no probe point). None where the
        weight says nothing (a lookup table, a zero or constant weight, no fan-in)."""
        param = self.params.get(layer.point.weight or "")
        act, fan_in = layer.activation, layer.point.fan_in
        if param is None or act is None or not fan_in or layer.point.is_embedding:
            return None
        s = param.stats
        if s.nonfinite or s.constant or not s.std > 0 or act.nonfinite \
                or not math.isfinite(act.var):
            return None
        return act.var / (fan_in * s.std**2)

    def _fed_nothing(self, layer: LayerProbe) -> bool:
        """A layer with a finite non-zero weight whose output is the same for every sample."""
        param = self.params.get(layer.point.weight or "")
        return (param is not None and param.stats.abs_max > 0 and not param.stats.nonfinite
                and layer.activation is not None and layer.activation.nonfinite == 0
                and layer.activation.sample_var == 0)

    @property
    def has_normalisation(self) -> bool:
        """A norm layer anywhere, or a BatchNorm folded into or following a layer."""
        return any(lp.point.normalises_signal or lp.point.followed_by_norm for lp in self.layers)

    @property
    def folded_batchnorm(self) -> bool:
        return any(lp.point.folded_batchnorm for lp in self.layers)

    @property
    def has_nonfinite(self) -> bool:
        return any(p.stats.nonfinite or p.stats.nonfinite_grad for p in self.params.values()) or any(
            (lp.activation and lp.activation.nonfinite) or (lp.gradient and lp.gradient.nonfinite)
            for lp in self.layers)


def _all_zero(act: ActivationStats | None) -> bool:
    return act is not None and act.nonfinite == 0 and act.min == 0 and act.max == 0


# --- statistics -----------------------------------------------------------------------------
# Every statistic is a reduction over a tapped value, and on a GPU each reduction is a kernel
# launch of a few microseconds against a whole ResNet-18 step of a few milliseconds: the number
# of operations, not the bytes, sets the overhead. So the values are measured in batches: a tap
# keeps a reference to its value (and computes the one per-value reduction that has no
# multi-tensor form, the batch mean per position), and once the pending values hold
# `_flush_bytes(device)`, or the pass ends, one set of multi-tensor (`torch._foreach_*`)
# reductions measures them all. Gradients of the parameters are measured the same way after
# the backward pass; the weights themselves once per probe, before the passes (they do not
# depend on the batch: a flow pass would only measure them again).
# Only sums, 2-norms and extremes are computed on the device; they reach the host in the
# pass's single copy, where `_activation_fields`, `_gradient_rows` and `_param_fields` turn them
# into the fields named by _ACT_FIELDS / _GRAD_FIELDS / _PARAM_FIELDS (a new field: a
# reduction here, a formula there).

_F64 = torch.float64
# Pending values are measured together once they hold this much; a flush makes one temporary
# copy of the pending values (for the minimum), so this also bounds the extra memory.
# On a CPU the statistics are memory-bound and a small batch keeps the peak near eager's; on
# a GPU launches cost more than bytes, so batches are larger, but not unbounded: measured on a
# ResNet-18 at batch 8 (H200, and the same on a CPU), 512 MiB held every tapped value and
# gradient to the end of its pass (peak 2.3-2.5x eager's) for 15% fewer statistics kernels
# than 64 MiB (1.6x), and the extra memory is what could push a big model off the card.
_FLUSH_BYTES = {"cpu": 16 << 20, "cuda": 64 << 20}
_DEFAULT_FLUSH_BYTES = 16 << 20


def _flush_bytes(device: torch.device) -> int:
    return _FLUSH_BYTES.get(device.type, _DEFAULT_FLUSH_BYTES)


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _chunks(tensors: Sequence[torch.Tensor], budget: int) -> Iterator[slice]:
    """Consecutive slices of `tensors` holding at most `budget` bytes each (at least one)."""
    start, held = 0, 0
    for i, t in enumerate(tensors):
        if i > start and held + _bytes(t) > budget:
            yield slice(start, i)
            start, held = i, 0
        held += _bytes(t)
    if start < len(tensors):
        yield slice(start, len(tensors))


def _clamp_min(value: float, low: float) -> float:
    return low if value < low else value  # NaN stays NaN


class _Host(list):  # type: ignore[type-arg]
    """The pass's sums on the host: the scalars, then the vectors from `flat_start` on."""

    flat_start = 0


class _DeviceSums:
    """Device tensors that reach the host together, in the pass's single copy: the 0-d sums
    are stacked once at the end (one op, however many batches queued them)."""

    def __init__(self) -> None:
        self._scalars: list[torch.Tensor] = []
        self._flats: list[torch.Tensor] = []
        self._flat_size = 0

    def add(self, values: Sequence[torch.Tensor]) -> slice:
        """Queue 0-d tensors; returns where they will sit in `fetch()`."""
        where = slice(len(self._scalars), len(self._scalars) + len(values))
        self._scalars.extend(values)
        return where

    def add_flat(self, flat: torch.Tensor) -> slice:
        """Queue a 1-d tensor; returns where it will sit, counted from `_Host.flat_start`."""
        where = slice(self._flat_size, self._flat_size + flat.numel())
        self._flats.append(flat)
        self._flat_size += flat.numel()
        return where

    def fetch(self) -> _Host:
        pieces = ([torch.stack(self._scalars)] if self._scalars else []) + self._flats
        host = _Host()
        if pieces:
            flat = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            host.extend(flat.to(_F64).cpu().tolist())
        host.flat_start = len(self._scalars)
        return host


# Non-finite entries: a NaN or infinite entry makes a tensor's maximum or 2-norm non-finite, so
# when those are finite the fast path reports 0 without counting; a pass that finds one
# non-finite is measured again with `exact` counts (-x + x is 0 for every finite entry and NaN
# for the rest), which cost a temporary copy.
_UNKNOWN = math.nan  # a count the fast path did not take: the pass is measured again


def _negated_max(xs: list[torch.Tensor], exact: bool) -> tuple[list[torch.Tensor],
                                                               list[torch.Tensor]]:
    """Per tensor: max(-x) (minus the minimum) and the count of non-zero entries (the sum of
    sign(x)^2), from one temporary copy. Only reductions with a fast multi-tensor kernel are
    used (max, sum of squares): the p-norms with p != 2 and float64 accumulation take a slow
    per-element path on the CPU. sign(NaN) is 0, so an `exact` pass (non-finite entries
    present) counts with the 0-norm, which counts NaN as non-zero."""
    neg = torch._foreach_neg(xs)
    neg_max = torch._foreach_max(neg)
    if exact:
        return neg_max, torch._foreach_norm(xs, 0, dtype=_F64)
    torch._foreach_sign_(neg)
    return neg_max, torch._foreach_powsum(neg, 2, dtype=_acc(xs))


def _acc(xs: Sequence[torch.Tensor]) -> torch.dtype | None:
    """Accumulate half-precision tensors in float32; float32/64 in their own dtype (a float64
    accumulator on float32 data takes the CPU's slow path)."""
    return None if all(x.dtype in (torch.float32, _F64) for x in xs) else torch.float32


def _nonfinite_counts(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return torch._foreach_norm(torch._foreach_sub(xs, xs), 0, dtype=_F64)


# On a CPU the statistics are measured one tensor at a time: there the multi-tensor kernels
# other than max and the 2-norm take a per-element slow path, and each temporary copy is
# mapped afresh from the kernel (its page faults cost more than the arithmetic), while a
# single-tensor reduction (aminmax, sum, count_nonzero) reads its tensor once, with no copy,
# and the few temporaries left go into one reused buffer. Per-tensor calls cost nothing on a
# CPU; on a GPU each is a launch, so there the multi-tensor form stays.
_PER_TENSOR = {"cpu": True}


def _one_at_a_time(xs: Sequence[torch.Tensor]) -> bool:
    return bool(xs) and _PER_TENSOR.get(xs[0].device.type, False)


class _Scratch:
    """A small reused buffer (one per dtype) for the temporaries of per-tensor statistics:
    values are measured through it in blocks, so it stays in the cache and is mapped once."""

    BLOCK = 1 << 18  # entries

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def block(self, rows: int, width: int, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
        buffer = self._buffers.get((dtype, device))
        if buffer is None or buffer.numel() < rows * width:
            buffer = torch.empty(max(rows * width, self.BLOCK), dtype=dtype, device=device)
            self._buffers[(dtype, device)] = buffer
        return buffer[:rows * width].view(rows, width)


def _copy_chunks(xs: Sequence[torch.Tensor]) -> Iterator[slice]:
    """Slices of `xs` for reductions that make temporary copies: the whole list on a CPU, which
    measures one tensor at a time without a copy; on a GPU, chunks whose copies stay within twice
    the device's statistics batch (the tensors themselves are alive anyway)."""
    if not xs:
        return iter(())
    if _one_at_a_time(xs):
        return iter([slice(0, len(xs))])
    return _chunks(xs, 2 * _flush_bytes(xs[0].device))


def _extremes_and_nonzero(xs: list[torch.Tensor], exact: bool, count: bool = True,
                          scratch: _Scratch | None = None) -> tuple[
        list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per tensor: the maximum, minus the minimum, and (`count`) the number of non-zero
    entries (NaN counts as non-zero where counted exactly; a fast pass that meets one is
    measured again)."""
    if _one_at_a_time(xs):
        maxima, neg_minima = [], []
        for x in xs:
            low, high = torch.aminmax(x)
            maxima.append(high)
            neg_minima.append(torch.neg(low))
        return maxima, neg_minima, _nonzero_counts(xs, exact, scratch) if count else []
    neg_max, nonzero = _negated_max(xs, exact)
    return list(torch._foreach_max(xs)), list(neg_max), list(nonzero)


def _deviation_norms(xs: list[torch.Tensor], centres: Sequence[torch.Tensor],
                     scratch: _Scratch) -> list[torch.Tensor]:
    """The 2-norm of each x - centre, where the centre is a 0-d tensor, a tensor of x's shape,
    or one of x.shape[1:] (a mean over the batch axis)."""
    acc = _acc(xs)
    if _one_at_a_time(xs):
        return [_blocked_deviation_norm(x, c, scratch, acc) for x, c in zip(xs, centres,
                                                                            strict=True)]
    return list(torch._foreach_norm(torch._foreach_sub(xs, list(centres)), 2, dtype=acc))


def _blocked_deviation_norm(x: torch.Tensor, centre: torch.Tensor, scratch: _Scratch,
                            acc: torch.dtype | None) -> torch.Tensor:
    """||x - centre||, block by block through the scratch buffer (no copy of x)."""
    if centre.dim() == 0 or centre.shape == x.shape:
        rows = x.reshape(1, -1)
    else:
        rows = x.reshape(x.shape[0], -1)
    centre = centre.reshape(1, -1)
    count, length = rows.shape
    width = max(1, scratch.BLOCK // count)
    dtype = torch.result_type(x, centre)
    norms = []
    for start in range(0, length, width):
        stop = min(start + width, length)
        out = scratch.block(count, stop - start, dtype, x.device)
        part = centre if centre.shape[1] == 1 else centre[:, start:stop]
        torch.sub(rows[:, start:stop], part, out=out)
        norms.append(torch.linalg.vector_norm(out, 2, dtype=acc))
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), 2)


def _norms(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The 2-norm per tensor (a CPU's per-tensor reduction accumulates in blocks, the
    multi-tensor kernel in one running sum)."""
    if _one_at_a_time(xs):
        return [torch.linalg.vector_norm(x, 2, dtype=_acc(xs)) for x in xs]
    return list(torch._foreach_norm(xs, 2, dtype=_acc(xs)))


def _signed_sums(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """sum(x) per tensor. The multi-tensor reductions have no signed sum: there it is
    sum|x| - 2 sum|min(x, 0)|, exact to float32 rounding of the entries' magnitude."""
    acc = _acc(xs)
    if _one_at_a_time(xs):
        return [x.sum(dtype=acc) for x in xs]
    abs_sum = torch._foreach_norm(xs, 1, dtype=acc)
    neg_sum = torch._foreach_norm(torch._foreach_clamp_max(xs, 0.0), 1, dtype=acc)
    return list(torch._foreach_add(abs_sum, neg_sum, alpha=-2))


def _nonzero_counts(xs: list[torch.Tensor], exact: bool,
                    scratch: _Scratch | None = None) -> list[torch.Tensor]:
    """Non-zero entries per tensor; an `exact` count also counts NaN (sign(NaN) is 0)."""
    if _one_at_a_time(xs):
        if exact:
            return [torch.count_nonzero(x) for x in xs]
        scratch = scratch or _Scratch()
        return [_blocked_nonzero_count(x, scratch) for x in xs]
    if exact:
        return list(torch._foreach_norm(xs, 0, dtype=_F64))
    signs = torch._foreach_sign(xs)
    return list(torch._foreach_powsum(signs, 2, dtype=_acc(xs)))


def _blocked_nonzero_count(x: torch.Tensor, scratch: _Scratch) -> torch.Tensor:
    """sum |sign(x)|, block by block through the scratch buffer: on a CPU 6-10x faster than
    count_nonzero (measured on ResNet-18's activations), and exact: a block holds 2^18 entries,
    so its float32 count is an exact integer, and the blocks add up in float64."""
    if not x.is_contiguous():  # a flat view would be a copy
        return torch.count_nonzero(x)
    flat = x.reshape(-1)
    dtype = x.dtype if x.dtype in (torch.float32, _F64) else torch.float32
    counts = []
    for start in range(0, max(flat.numel(), 1), scratch.BLOCK):  # an empty x: one empty block
        part = flat[start:start + scratch.BLOCK]
        out = scratch.block(1, part.numel(), dtype, x.device).view(-1)
        if out.dtype == x.dtype:
            torch.sign(part, out=out)
        else:  # half precision: counted in float32, where 2^18 is exact
            out.copy_(part).sign_()
        counts.append(out.abs_().sum())
    return counts[0] if len(counts) == 1 else torch.stack(counts).sum(dtype=_F64)


def _count_or_unknown(exact_count: float | None, *sums: float) -> float:
    if exact_count is not None:
        return exact_count
    return 0.0 if all(math.isfinite(v) for v in sums) else _UNKNOWN


# --- activations ---

@dataclass
class _PendingActivation:
    index: int
    value: torch.Tensor
    version: int  # value._version at the tap: an in-place op later would change what we read
    batch_mean: torch.Tensor  # mean over the batch axis per position (our copy: centred in place)
    single: bool  # no batch axis to average over: sample_var is the variance itself
    unit_max: torch.Tensor | None  # ReLU: the largest entry of each unit
    saturated: torch.Tensor | None  # sigmoid/tanh: saturated fraction


def _pending_activation(index: int, value: torch.Tensor, point: ProbePoint) -> _PendingActivation:
    """What a tap computes at once: the reductions that have no multi-tensor form."""
    x = value
    acc = _F64 if x.dtype == _F64 else torch.float32
    single = x.dim() == 0 or x.shape[0] <= 1
    # One sample (or a value without a batch axis, like BERT's (1, seq, hidden) position
    # embeddings): the value is its own batch mean, in its own shape so that it broadcasts.
    batch_mean = x.to(acc, copy=True) if single else x.mean(dim=0, dtype=acc)
    kind = point.nonlinearity if point.role == "activation" else None
    unit_max = None
    if kind == "relu":  # only a ReLU's silent units are dead: elsewhere it would be noise
        if x.dim() >= 2:
            axis = point.channel_axis % x.dim()
            unit_max = x.amax(dim=[d for d in range(x.dim()) if d != axis])
        else:  # a vector, or a 0-d value (a ReLU on a scalar): one unit
            unit_max = x.reshape(-1).amax(dim=0, keepdim=True)
    saturated = None
    if kind in ("sigmoid", "tanh"):
        xf = x.float()
        low = (xf * (1 - xf)) < 0.25 * SATURATION_DERIVATIVE if kind == "sigmoid" \
            else (1 - xf * xf) < SATURATION_DERIVATIVE
        if point.reads_minus_infinity_fill:
            # The entries a mask set to -inf come out exactly at the lower end (Llama 4's
            # router: the experts top-k did not pick) by design: the share is of the others.
            kept = xf != (0.0 if kind == "sigmoid" else -1.0)
            saturated = (low & kept).float().sum() / kept.float().sum().clamp_min(1.0)
        else:
            saturated = low.float().mean()
    elif kind == "hardsigmoid":  # flat, derivative exactly 0, at and beyond 0 and 1
        saturated = ((x <= 0) | (x >= 1)).float().mean()
    return _PendingActivation(index, x, x._version, batch_mean, single, unit_max, saturated)


# Per-value sums measured on the device; `_activation_fields` turns them into _ACT_FIELDS.
_ACT_SUMS = ("dev_norm", "nonzero", "max", "neg_max", "nonfinite", "mean_sum", "mean_dev_norm")


@dataclass
class _ActivationBatch:
    """Pending values measured together: where their sums will sit in the host copy."""

    names: tuple[str, ...]  # _ACT_SUMS, without "nonfinite" unless counted exactly
    indices: list[int]
    numel: list[int]
    positions: list[int]
    single: list[bool]
    sums: slice
    saturated: dict[int, slice]  # position in the batch -> host slot
    unit_max: dict[int, tuple[int, int]]  # position in the batch -> (host offset, units)

    @staticmethod
    def measure(sums: _DeviceSums, pend: list[_PendingActivation], exact: bool = False,
                scratch: _Scratch | None = None) -> _ActivationBatch:
        """Moments from sums of squared deviations (two passes, as exact as float32 allows
        even when the mean dwarfs the spread); the batch means are centred in place."""
        xs = [p.value for p in pend]
        means = [p.batch_mean for p in pend]
        positions = [m.numel() for m in means]
        scratch = scratch or _Scratch()
        maxima, neg_max, nonzero = _extremes_and_nonzero(xs, exact, scratch=scratch)
        nonfinite = _nonfinite_counts(xs) if exact else []
        scalars = _deviation_norms(xs, means, scratch)
        scalars += [*nonzero, *maxima, *neg_max, *nonfinite]
        totals = _signed_sums(means)
        centre = torch._foreach_div(totals, [float(p) for p in positions])
        torch._foreach_sub_(means, centre)
        scalars += [*totals, *_norms(means)]
        scalars += [p.saturated for p in pend if p.saturated is not None]
        where = sums.add(scalars)
        saturated, unit_max = {}, {}
        names = _ACT_SUMS if exact else tuple(n for n in _ACT_SUMS if n != "nonfinite")
        offset = where.start + len(names) * len(pend)
        for i, p in enumerate(pend):
            if p.saturated is not None:
                saturated[i] = slice(offset, offset + 1)
                offset += 1
        maxima = [p.unit_max for p in pend if p.unit_max is not None]
        if maxima:
            offset = sums.add_flat(torch.cat(maxima) if len(maxima) > 1 else maxima[0]).start
            for i, p in enumerate(pend):
                if p.unit_max is not None:
                    unit_max[i] = (offset, p.unit_max.numel())
                    offset += p.unit_max.numel()
        return _ActivationBatch(names, [p.index for p in pend], [p.value.numel() for p in pend],
                                positions, [p.single for p in pend], where, saturated, unit_max)

    def rows(self, host: _Host) -> dict[int, dict[str, float]]:
        k = len(self.indices)
        values = host[self.sums]
        out = {}
        for i, index in enumerate(self.indices):
            s = {name: values[j * k + i] for j, name in enumerate(self.names)}
            s["nonfinite"] = _count_or_unknown(s.get("nonfinite"), s["max"], s["neg_max"])
            saturation = host[self.saturated[i]][0] if i in self.saturated else 0.0
            dead = 0.0
            if i in self.unit_max:
                offset, units = self.unit_max[i]
                start = host.flat_start + offset
                dead = sum(1 for v in host[start:start + units] if v <= 0) / units
            out[index] = _activation_fields(s, self.numel[i], self.positions[i], self.single[i],
                                            dead, saturation)
        return out


# Relative spread across the batch below which samples count as equal: a few float32 ulps.
_ROUNDING_SPREAD = 1e-6


def _activation_fields(s: dict[str, float], numel: int, positions: int, single: bool,
                       dead: float, saturation: float) -> dict[str, float]:
    # Law of total variance: the variance of all entries is the mean variance across the batch
    # (sample_var) plus the variance of the per-position batch means.
    sample_var = s["dev_norm"] ** 2 / numel
    var = sample_var + s["mean_dev_norm"] ** 2 / positions
    mean = s["mean_sum"] / positions
    if sample_var <= _ROUNDING_SPREAD ** 2 * (var + mean * mean):
        # Samples that differ only by float rounding are the same value: a batched matmul may
        # round each row its own way (RegNet's squeeze-excite gates behind a zeroed stem
        # BatchNorm differ by ~1 ulp across the batch on some CPUs, and the signal cut was
        # then placed at the last block instead of the stem).
        sample_var = 0.0
    fields = {
        "mean": mean, "var": var,
        "min": -s["neg_max"], "max": s["max"], "zero_fraction": (numel - s["nonzero"]) / numel,
        "dead_units": dead, "saturation": saturation, "nonfinite": s["nonfinite"],
        "sample_var": var if single else sample_var,
    }
    return {f: fields[f] for f in _ACT_FIELDS}


def _activation_row(value: torch.Tensor, point: ProbePoint, exact: bool = True) -> torch.Tensor:
    """_ACT_FIELDS of one value, through the batched path (tests, tools)."""
    sums = _DeviceSums()
    with torch.no_grad():
        batch = _ActivationBatch.measure(sums, [_pending_activation(0, value, point)], exact)
    row = batch.rows(sums.fetch())[0]
    return torch.tensor([row[f] for f in _ACT_FIELDS], dtype=_F64)


# --- gradients of the tapped values ---

@dataclass
class _GradientBatch:
    indices: list[int]
    sums: slice  # k 2-norms, k non-zero counts, then (exact) k non-finite counts
    exact: bool

    @staticmethod
    def measure(sums: _DeviceSums, indices: list[int], grads: list[torch.Tensor],
                exact: bool = False) -> _GradientBatch:
        scalars = list(torch._foreach_norm(grads, 2, dtype=_acc(grads)))
        scalars += _nonzero_counts(grads, exact)
        if exact:
            scalars += _nonfinite_counts(grads)
        return _GradientBatch(indices, sums.add(scalars), exact)


def _gradient_rows(batches: list[_GradientBatch], numel: dict[int, int],
                   host: _Host) -> dict[int, dict[str, float]]:
    """A value read by several consumers gets one hook call per path on some graphs: the
    squared norms and counts of all calls add up per point (the non-zero counts to an upper
    bound on the entries their sum reaches)."""
    total: dict[int, list[float]] = {}
    for batch in batches:
        values = host[batch.sums]
        k = len(batch.indices)
        for i, index in enumerate(batch.indices):
            acc = total.setdefault(index, [0.0, 0.0, 0.0])
            acc[0] += values[i] ** 2  # float64 on the host: no overflow
            acc[1] += values[k + i]
            acc[2] += _count_or_unknown(values[2 * k + i] if batch.exact else None, values[i])
    out = {}
    for index, (sum_sq, nonzero, nonfinite) in total.items():
        norm, size = math.sqrt(sum_sq), max(numel[index], 1)
        fields = {"norm": norm, "rms": norm / math.sqrt(size), "nonfinite": nonfinite,
                  "reach": min(nonzero / size, 1.0)}
        out[index] = {f: fields[f] for f in (*_GRAD_FIELDS, "reach")}
    return out


def _gradient_row(grad: torch.Tensor, exact: bool = True) -> torch.Tensor:
    sums = _DeviceSums()
    with torch.no_grad():
        batch = _GradientBatch.measure(sums, [0], [grad], exact)
    row = _gradient_rows([batch], {0: grad.numel()}, sums.fetch())[0]
    return torch.tensor([row[f] for f in _GRAD_FIELDS], dtype=_F64)


# --- parameters ---

def _unit_rows(shape: torch.Size, point: ProbePoint | None) -> int | None:
    """How many output units a layer weight of this shape has, else None."""
    if point is None or len(shape) < 2:
        return None
    return math.prod(shape[1:]) if point.weight_layout == "in_out" else shape[0]


def _first_unit(g: torch.Tensor, point: ProbePoint) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient as units and its first unit, broadcastable against each other."""
    if point.weight_layout == "in_out":
        units = g.reshape(g.shape[0], -1)
        return units, units[:, :1]
    return g, g[:1]


# Per-parameter sums; a parameter that lacks one (empty, no gradient, not a layer weight)
# reads the default. The non-finite counts are measured only by an `exact` pass.
# The weights' sums do not depend on the batch: the probe measures them once, before the
# passes (`_measure_weights`); a pass measures only the gradients.
_WEIGHT_SUMS = {"w_sum": 0.0, "w_norm": 0.0, "w_dev_norm": 0.0, "w_max": 0.0, "w_neg_max": 0.0,
                "w_nonfinite": None}
_GRAD_SUMS = {"g_norm": 0.0, "g_nonzero": 0.0, "g_nonfinite": None, "unit_diff": math.nan,
              "unit_max": math.nan}

_Found = dict[str, list[tuple[int, int]]]  # sum name -> (parameter, host slot)


def _recorder(sums: _DeviceSums, found: _Found):  # noqa: ANN202 - a small closure
    def record(where: list[int], columns: dict[str, Sequence[torch.Tensor]]) -> None:
        slots = sums.add([v for values in columns.values() for v in values])
        offset = slots.start
        for key, values in columns.items():
            found.setdefault(key, []).extend(zip(where, range(offset, offset + len(values)),
                                                 strict=True))
            offset += len(values)
    return record


def _weight_sums(sums: _DeviceSums, params: list[torch.Tensor], exact: bool = False) -> _Found:
    """Queue every weight's sums (keys of _WEIGHT_SUMS). On a GPU, reductions that read a tensor
    as it is run once over the whole list and those that need a temporary copy run over chunks
    (the parameters are all alive anyway: only the copies count against the memory); on a CPU,
    one tensor at a time (see _PER_TENSOR)."""
    found: _Found = {}
    record = _recorder(sums, found)
    full = [i for i, p in enumerate(params) if p.numel()]
    ws = [params[i] for i in full]
    if not ws:
        return found
    acc = _acc(ws)
    with torch.no_grad():
        record(full, {"w_norm": torch._foreach_norm(ws, 2, dtype=acc)})
        if _one_at_a_time(ws):
            maxima, neg_minima, _ = _extremes_and_nonzero(ws, exact, count=False)
            totals = _signed_sums(ws)
            record(full, {"w_max": maxima, "w_neg_max": neg_minima, "w_sum": totals})
            if exact:
                record(full, {"w_nonfinite": _nonfinite_counts(ws)})
        else:
            w_abs = torch._foreach_norm(ws, 1, dtype=acc)
            record(full, {"w_max": torch._foreach_max(ws)})
            neg_sums: list[torch.Tensor] = []
            for part in _copy_chunks(ws):
                neg = torch._foreach_neg(ws[part])
                columns = {"w_neg_max": torch._foreach_max(neg)}
                torch._foreach_clamp_min_(neg, 0.0)  # sum(w) = sum|w| - 2 sum max(-w, 0)
                neg_sums += torch._foreach_norm(neg, 1, dtype=acc)
                del neg
                if exact:
                    columns["w_nonfinite"] = _nonfinite_counts(ws[part])
                record(full[part], columns)
            totals = list(torch._foreach_add(w_abs, neg_sums, alpha=-2))
            record(full, {"w_sum": totals})
        # The spread about the mean, second pass: exact even when the mean dwarfs it.
        means = torch._foreach_div(totals, [float(w.numel()) for w in ws])
        scratch = _Scratch()
        for part in _copy_chunks(ws):
            record(full[part], {"w_dev_norm": _deviation_norms(ws[part], means[part], scratch)})
    return found


def _grad_sums(sums: _DeviceSums, params: list[torch.Tensor], grads: list[torch.Tensor | None],
               owners: list[ProbePoint | None], spread_of: set[int] | None = None,
               exact: bool = False) -> _Found:
    """Queue every gradient's sums and, for the parameters in `spread_of` (None: all) that are a
    layer's weight, the unit spread (keys of _GRAD_SUMS)."""
    found: _Found = {}
    record = _recorder(sums, found)
    with torch.no_grad():
        with_grad = [i for i, g in enumerate(grads) if g is not None and g.numel()]
        gs = [grads[i] for i in with_grad]
        if gs:
            record(with_grad, {"g_norm": torch._foreach_norm(gs, 2, dtype=_acc(gs))})
        scratch = _Scratch()
        for part in _copy_chunks(gs):  # type: ignore[arg-type]
            columns = {"g_nonzero": _nonzero_counts(gs[part], exact,  # type: ignore[arg-type]
                                                    scratch)}
            if exact:
                columns["g_nonfinite"] = _nonfinite_counts(gs[part])
            record(with_grad[part], columns)
        # Unit spread: how far apart two output units' gradients are, relative to the largest
        # entry (0: every unit gets the same update, symmetry never breaks).
        units, firsts, where = [], [], []
        for i, (p, g, owner) in enumerate(zip(params, grads, owners, strict=True)):
            rows = _unit_rows(p.shape, owner)
            if rows is None or rows < 2 or (spread_of is not None and i not in spread_of):
                continue
            if g is None or not g.numel():
                found.setdefault("unit_diff", []).append((i, -1))  # no gradient: spread 0
                found.setdefault("unit_max", []).append((i, -1))
                continue
            u, first = _first_unit(g, owner)  # type: ignore[arg-type]
            units.append(u)
            firsts.append(first)
            where.append(i)
        for part in _chunks(units, 2 * _flush_bytes(units[0].device)) if units else ():
            diffs = torch._foreach_sub(units[part], firsts[part])
            torch._foreach_abs_(diffs)
            columns = {"unit_diff": torch._foreach_max(diffs)}
            del diffs
            magnitudes = torch._foreach_abs(units[part])
            columns["unit_max"] = torch._foreach_max(magnitudes)
            del magnitudes
            record(where[part], columns)
    return found


def _sums_table(found: _Found, count: int, host: _Host,
                defaults: dict[str, float | None]) -> list[dict[str, float | None]]:
    table: list[dict[str, float | None]] = [dict(defaults) for _ in range(count)]
    for key, slots in found.items():
        for i, slot in slots:
            table[i][key] = 0.0 if slot < 0 else host[slot]
    return table


def _param_fields(table: list[dict[str, float | None]],
                  numel: list[int]) -> list[dict[str, float]]:
    """_PARAM_FIELDS from the sums of _WEIGHT_SUMS and _GRAD_SUMS, per parameter."""
    rows = []
    for s, count in zip(table, numel, strict=True):
        n = max(count, 1)
        mean = s["w_sum"] / count if count else math.nan
        std = s["w_dev_norm"] / math.sqrt(count) if count else math.nan
        wnorm, gnorm = s["w_norm"], s["g_norm"]
        if wnorm > 0:
            ratio = gnorm / wnorm
        else:
            ratio = math.inf if gnorm > 0 else (gnorm if math.isnan(gnorm) else 0.0)
        fields = {
            "mean": mean, "std": std, "abs_max": max(s["w_max"], s["w_neg_max"]),
            "nonfinite": _count_or_unknown(s["w_nonfinite"], s["w_max"], s["w_neg_max"]),
            "grad_norm": gnorm, "grad_rms": gnorm / math.sqrt(n), "grad_to_weight": ratio,
            "zero_grad_fraction": (count - s["g_nonzero"]) / n,
            "nonfinite_grad": _count_or_unknown(s["g_nonfinite"], s["g_norm"]),
            "unit_spread": s["unit_diff"] / _clamp_min(s["unit_max"], 1e-30),
            "constant": float(s["w_max"] == -s["w_neg_max"]),  # largest == smallest
        }
        rows.append({f: fields[f] for f in _PARAM_FIELDS})
    return rows


def _measure_weights(params: list[torch.Tensor]) -> tuple[list[dict[str, float | None]],
                                                          list[dict[str, float]]]:
    """The weights' sums (_WEIGHT_SUMS), in one host copy before the passes, and the
    _PARAM_FIELDS they give with no gradient yet; measured again with exact non-finite counts
    when a sum says there are some."""
    for exact in (False, True):
        sums = _DeviceSums()
        found = _weight_sums(sums, params, exact)
        table = _sums_table(found, len(params), sums.fetch(), _WEIGHT_SUMS)
        fields = _param_fields([{**_GRAD_SUMS, **s} for s in table], [p.numel() for p in params])
        if not any(math.isnan(f["nonfinite"]) for f in fields):
            break
    return table, fields


def _param_row(p: torch.Tensor, grad: torch.Tensor | None, owner: ProbePoint | None,
               exact: bool = True) -> torch.Tensor:
    sums = _DeviceSums()
    weight_found = _weight_sums(sums, [p], exact)
    grad_found = _grad_sums(sums, [p], [grad], [owner], None, exact)
    host = sums.fetch()
    table = [{**_sums_table(weight_found, 1, host, _WEIGHT_SUMS)[0],
              **_sums_table(grad_found, 1, host, _GRAD_SUMS)[0]}]
    row = _param_fields(table, [p.numel()])[0]
    return torch.tensor([row[f] for f in _PARAM_FIELDS], dtype=_F64)


@dataclass
class _PassResult:
    activations: dict[int, dict[str, float]]
    sizes: dict[int, tuple[int, int]]
    gradients: dict[int, dict[str, float]]
    params: dict[str, dict[str, float]]
    unused: set[str]
    # Whether any output differs across the samples of the batch (see ProbeResult).
    output_varies: bool = True
    output_power: float | None = None
    output_normalised: bool = False
    output_finite: bool = True


class _Collector:
    """Taps and hooks that measure every point on the device, in batches (see above).

    `exact` measures each value as it arrives and counts its non-finite entries: the fallback
    when a pending value was changed in place before its batch was measured (an in-place op a
    TorchScript graph kept) or when a non-finite sum says there are entries to count.
    """

    def __init__(self, sums: _DeviceSums, exact: bool = False, activations: bool = True,
                 gradients: bool = True) -> None:
        self.sums = sums
        self.exact = exact
        self.activations = activations  # measure the tapped values
        self.gradients = gradients  # measure their gradients
        self._scratch = _Scratch()  # reused by every flush of the pass
        self.sizes: dict[int, tuple[int, int]] = {}  # (units, numel), from shapes: no sync
        self.stale = False  # a pending value changed before it was measured
        self._acts: list[_PendingActivation] = []
        self._act_bytes = 0
        self._act_batches: list[_ActivationBatch] = []
        self._grads: list[tuple[int, torch.Tensor, int]] = []  # (index, grad, version)
        self._grad_bytes = 0
        self._grad_batches: list[_GradientBatch] = []

    def tap(self, point: ProbePoint, value: torch.Tensor) -> None:
        if not value.is_floating_point() or value.numel() == 0:
            return
        units = value.shape[point.channel_axis] if value.dim() >= 2 else 1
        self.sizes[point.index] = (int(units), value.numel())
        if self.gradients and value.requires_grad:
            value.register_hook(lambda g, i=point.index: self._on_grad(i, g))
        if not self.activations:
            return
        with torch.no_grad():
            self._acts.append(_pending_activation(point.index, value, point))
        self._act_bytes += _bytes(value)
        if self.exact or self._act_bytes >= _flush_bytes(value.device):
            self.flush_activations()

    def _on_grad(self, index: int, grad: torch.Tensor) -> None:
        self._grads.append((index, grad, grad._version))
        self._grad_bytes += _bytes(grad)
        if self.exact or self._grad_bytes >= _flush_bytes(grad.device):
            self.flush_gradients()

    def flush_activations(self) -> None:
        if not self._acts:
            return
        pend, self._acts, self._act_bytes = self._acts, [], 0
        self.stale |= any(p.value._version != p.version for p in pend)
        with torch.no_grad():
            self._act_batches.append(_ActivationBatch.measure(self.sums, pend, self.exact,
                                                              self._scratch))

    def flush_gradients(self) -> None:
        if not self._grads:
            return
        pend, self._grads, self._grad_bytes = self._grads, [], 0
        self.stale |= any(g._version != v for _, g, v in pend)
        with torch.no_grad():
            self._grad_batches.append(_GradientBatch.measure(
                self.sums, [i for i, _, _ in pend], [g for _, g, _ in pend], self.exact))

    def activation_rows(self, host: _Host) -> dict[int, dict[str, float]]:
        rows: dict[int, dict[str, float]] = {}
        for batch in self._act_batches:
            rows.update(batch.rows(host))
        return rows

    def gradient_rows(self, host: _Host) -> dict[int, dict[str, float]]:
        return _gradient_rows(self._grad_batches, {i: s[1] for i, s in self.sizes.items()}, host)


@dataclass(frozen=True)
class _PassPlan:
    """What one pass measures. Alone, a pass measures everything. Before a flow pass, the
    first pass measures the activations as initialised and only the gradients the flow pass
    cannot stand for: the unblocked tensors' own and the constant weights' (their unit spread),
    so its backward stops where those are reached (behind a zero head: at once). The flow pass
    measures gradients only."""

    activations: bool = True
    tap_gradients: bool = True
    grads_of: tuple[str, ...] | None = None  # the parameters to backpropagate to; None: all
    spread_of: frozenset[str] = frozenset()  # the weights whose unit spread is measured


def _one_pass(model: LoadedModel, inputs: list[torch.Tensor], seed: int,
              owners: dict[str, ProbePoint], weights: list[dict[str, float | None]],
              plan: _PassPlan, exact: bool = False) -> _PassResult:
    for p in model.parameters.values():
        p.grad = None
    sums = _DeviceSums()
    collector = _Collector(sums, exact, plan.activations, plan.tap_gradients)
    outputs = model.run(inputs, tap=collector.tap)
    collector.flush_activations()  # before the backward pass: the pending values can go
    differentiable = [o for o in outputs if o.is_floating_point() and o.requires_grad]
    if not differentiable:
        kinds = ", ".join(str(o.dtype).replace("torch.", "") for o in outputs)
        raise ProbeError(
            f"the model's outputs ({kinds}) carry no gradient: gradprobe needs a floating-point "
            f"output that depends on the parameters to backpropagate"
        )
    # Largest difference of any output from the first sample's: 0 when every sample gives the
    # same output (the network no longer depends on its input).
    batched = [o.detach() for o in differentiable if o.dim() > 0 and o.shape[0] > 1
               and plan.activations]
    spread = sums.add([torch.stack([(o - o[:1]).abs().amax().float() for o in batched]).amax()]
                      ) if batched else None
    power = sums.add([torch.stack([o.float().square().mean() for o in batched]).amin()]
                     ) if batched else None
    rows = [o for o in batched if o.dim() >= 2 and o.shape[-1] >= 2]
    normalised = sums.add([torch.stack([_rows_share_rms(o) for o in rows]).all().float()]
                          ) if rows and len(rows) == len(batched) else None
    # Read from the first pass only, like the output's power and norm above.
    finite = sums.add([torch.stack([torch.isfinite(o).all() for o in differentiable]).all()
                       .float()]) if plan.activations else None
    gen = torch.Generator().manual_seed(seed + 1)
    cotangents = [torch.randn(o.shape, generator=gen).to(device=o.device, dtype=o.dtype)
                  for o in differentiable]
    # One scalar, sum(output * cotangent), backpropagates exactly the cotangents (the sum's
    # gradient is 1, the product's is the cotangent), without the lazy import autograd makes
    # on the first backward given explicit gradients (torch.fx symbolic shapes, sympy: about
    # as long as the whole probe of a small model).
    loss = sum((o * c).sum() for o, c in zip(differentiable, cotangents, strict=True))
    targets = None if plan.grads_of is None else [
        model.parameters[n] for n in plan.grads_of if model.parameters[n].requires_grad]
    try:
        if targets is None or targets:  # an empty `inputs` would mean every leaf
            torch.autograd.backward([loss], inputs=targets)
    except RuntimeError as exc:
        raise ProbeError(f"backward pass failed: {str(exc).splitlines()[0]}") from None
    collector.flush_gradients()
    if collector.stale and not exact:
        # A value changed in place after its tap: measure again, each value as it comes.
        return _one_pass(model, inputs, seed, owners, weights, plan, exact=True)

    names = list(model.parameters)
    tensors = list(model.parameters.values())
    spread_of = {i for i, n in enumerate(names) if n in plan.spread_of}
    found = _grad_sums(sums, tensors, [p.grad for p in tensors], [owners.get(n) for n in names],
                       spread_of, exact)
    unused = {n for n, p in model.parameters.items() if p.grad is None}
    host = sums.fetch()  # the single device-to-host copy of the pass
    table = [{**w, **g} for w, g in zip(weights, _sums_table(found, len(names), host, _GRAD_SUMS),
                                        strict=True)]
    params = dict(zip(names, _param_fields(table, [p.numel() for p in tensors]), strict=True))
    varies = spread is None or not host[spread.start] == 0  # NaN counts as varying
    result = _PassResult(collector.activation_rows(host), collector.sizes,
                         collector.gradient_rows(host), params, unused, varies,
                         None if power is None else float(host[power.start]),
                         normalised is not None and host[normalised.start] == 1,
                         finite is None or host[finite.start] == 1)
    counts = [r["nonfinite"] for r in (*result.activations.values(), *result.gradients.values(),
                                       *result.params.values())]
    counts += [r["nonfinite_grad"] for r in result.params.values()]
    if not exact and any(math.isnan(c) for c in counts):
        # Non-finite entries somewhere: measure again, counting them.
        return _one_pass(model, inputs, seed, owners, weights, plan, exact=True)
    return result


def _rows_share_rms(output: torch.Tensor) -> torch.Tensor:
    """Whether every row of `output` (its last axis) has the same RMS, device-side: within
    0.5/sqrt(d) of the largest, at most 5%. Rows of d independent entries spread ~4/sqrt(d)
    from smallest to largest over a batch; a norm's rows differ only by its eps."""
    rms = output.float().square().mean(-1).sqrt().flatten()
    tolerance = min(0.05, 0.5 / math.sqrt(output.shape[-1]))
    return (rms.amax() - rms.amin()) <= tolerance * rms.amax()


def _weight_owners(model: LoadedModel) -> dict[str, ProbePoint]:
    owners: dict[str, ProbePoint] = {}
    for point in model.probe_points:
        if point.weight and point.role == "linear":
            owners.setdefault(point.weight, point)
    return owners


def _layer_of(model: LoadedModel) -> dict[str, str]:
    layer: dict[str, str] = {}
    for point in model.probe_points:
        for name in point.parameters:
            layer.setdefault(name, point.layer)
    for name in model.parameters:
        layer.setdefault(name, model.parameter_layers.get(name)
                         or (name.rsplit(".", 1)[0] if "." in name else name))
    return layer


def _blocking_zeros(model: LoadedModel,
                    weights: dict[str, dict[str, float]]) -> list[tuple[str, ProbePoint]]:
    """Zero weights (linear layers) and zero scales (norm layers) that stop gradients."""
    found = []
    for point in model.probe_points:
        if point.role not in ("linear", "norm") or not point.weight:
            continue
        stats = weights.get(point.weight)
        if stats and stats["abs_max"] == 0:
            found.append((point.weight, point))
    return found


def _unblocked_value(param: torch.Tensor, point: ProbePoint, seed: int) -> torch.Tensor:
    if point.role == "norm":
        return torch.full_like(param, unit_scale(point))
    std = recommended_init(point).std or 0.02
    gen = torch.Generator().manual_seed(seed + 7)
    return (torch.randn(param.shape, generator=gen) * std).to(param)


@contextmanager
def _substituted(model: LoadedModel, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """The model's parameters replaced by `values` for the duration, restored after."""
    saved = {}
    with torch.no_grad():
        for name, value in values.items():
            saved[name] = model.parameters[name].detach().clone()
            model.parameters[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                model.parameters[name].copy_(value)


def _first_steps(model: LoadedModel, flow: _PassResult,
                 layer_zeros: Iterable[str]) -> dict[str, torch.Tensor]:
    """The zero tensors outside the layers' weights and scales (Doge's dynamic-mask `A`, a
    ReZero gate, zero biases) that get a gradient in the flow pass, at their value after a
    small step against it: after the first step they are no longer zero. Read while the flow
    pass's gradients are still on the parameters. In an ONNX file, layers' biases and the
    zeros the graph shows to be trainable starts (`LoadedModel.trainable_zero_start`) only."""
    # An ONNX file stores buffers as it stores parameters: a zero mask buffer (`fc3(x) * mask`)
    # would look like a zero-init gate that trains. A layer's bias is a parameter all the same
    # (DETR's first values, `v_proj(zeros)`, are its bias). TorchScript tells them apart.
    # So is the gain of a normalisation the exporter wrote out as arithmetic (EvoNorm's zero
    # `weight` closing a residual branch), and a rate inside an exponential (Doge's `A`): a
    # mask there would zero nothing.
    only = ({p.bias for p in model.probe_points if p.bias}
            | {n for n in model.parameters if model.trainable_zero_start(n)}
            if model.format == "onnx" else None)
    skip = set(layer_zeros)
    steps = {}
    for name, param in model.parameters.items():
        row = flow.params[name]
        if name in skip or (only is not None and name not in only) \
                or param.grad is None or row["abs_max"] != 0 \
                or not (row["grad_norm"] > 0 and math.isfinite(row["grad_norm"])):
            continue
        steps[name] = -1e-2 * torch.sign(param.grad.detach())
    return steps


def _second_step(model: LoadedModel, inputs: list[torch.Tensor], seed: int,
                 owners: dict[str, ProbePoint], weights: list[dict[str, float | None]],
                 first: _PassResult, flow: _PassResult, unblocked: dict[str, torch.Tensor],
                 constant: frozenset[str]) -> _PassResult | None:
    """The gradients of the tensors that got none at the first step, as the second step sees
    them: the zero tensors that did get one have moved (a layer's to its `unblocked` value, the
    textbook init the flow pass used; any other by a small step, `steps`), the others are
    still zero. Two kinds are asked: zero layer weights blocked by another zero (timm's
    GlobalContext behind a zero BatchNorm scale), and non-zero tensors a zero blocks (Doge's
    `dt_proj` behind its zero `A`). Only those that now get a gradient are kept: a zero in
    front of a ReLU still gets none and stays an error. None when nothing is blocked by a zero
    that moves. The small steps (`_first_steps`) are taken only when something is stuck."""
    stuck = [name for name in unblocked if first.params[name]["grad_norm"] == 0]
    # A 1-D shift in a network with normalisation gets exactly zero gradient when a norm
    # follows it (a conv bias before BatchNorm), whatever moves: not worth a pass.
    norm = any(p.normalises_signal or p.followed_by_norm for p in model.probe_points)
    # Zero ones too (ZAYA's zero conv biases behind its zero-init key scale `temp`), except
    # the bias of a zero layer, which that layer's own verdict covers.
    of_zero_layers = {p.bias for p in model.probe_points if p.bias and p.weight in unblocked}
    stuck += [name for name, row in flow.params.items()
              if name not in unblocked and name not in flow.unused and row["grad_norm"] == 0
              and math.isfinite(row["abs_max"]) and name not in of_zero_layers
              and not (norm and model.parameters[name].dim() <= 1)]
    if not stuck:
        return None
    # Only now, with something stuck: the flow pass's gradients are still on the parameters.
    steps = _first_steps(model, flow, unblocked)
    moved = {name: value for name, value in unblocked.items() if name not in stuck}
    moved |= {name: value for name, value in steps.items() if name not in stuck}
    if not moved:
        return None
    with _substituted(model, moved):
        second = _one_pass(model, inputs, seed, owners, weights, _PassPlan(
            activations=False, tap_gradients=False, grads_of=tuple(stuck),
            spread_of=constant & frozenset(stuck)))
    second.params = {name: row for name, row in second.params.items()
                     if name in stuck and row["grad_norm"] > 0}
    return second if second.params else None


# What a graph raises when values it was not traced with change sizes it froze (the ONNX
# interpreter names the node in a ProbeError). Caught only for passes after the first, which
# ran the same graph on the same inputs.
_VALUE_SHAPED_FAILURES = (ProbeError, RuntimeError, ValueError, IndexError)


def probe(model: LoadedModel, inputs: list[torch.Tensor], seed: int = 0) -> ProbeResult:
    owners = _weight_owners(model)
    names = list(model.parameters)
    weights, fields = _measure_weights(list(model.parameters.values()))
    weight_fields = dict(zip(names, fields, strict=True))
    # Only a constant (or zero) weight is judged by its unit spread: units that start equal
    # stay equal when their updates are equal.
    constant = frozenset(n for n in owners if n in weight_fields and weight_fields[n]["constant"])
    zeros = _blocking_zeros(model, weight_fields)
    if zeros:
        own_grads = {name for name, _ in zeros} | constant
        plan = _PassPlan(tap_gradients=False, spread_of=constant,
                         grads_of=tuple(n for n in names if n in own_grads))
    else:
        plan = _PassPlan(spread_of=constant)
    first = _one_pass(model, inputs, seed, owners, weights, plan)
    flow, values = first, {}
    if zeros:
        values = {name: _unblocked_value(model.parameters[name], point, seed)
                  for name, point in zeros}
        try:
            with _substituted(model, values):
                flow = _one_pass(model, inputs, seed, owners, weights,
                                 _PassPlan(activations=False))
        except _VALUE_SHAPED_FAILURES as exc:
            # The graph froze sizes that depend on values (a traced mixture-of-experts' tokens
            # per expert): other weights route other tokens, and the file cannot run them. The
            # gradients are then measured at the file's own values.
            values = {}
            model.notes.append(
                "the zero tensors could not be set to their textbook init for the gradient "
                "pass (the graph fixes sizes from the values it routes: "
                f"{str(exc).splitlines()[0][:120]}); gradients are measured at the file's values")
            flow = _one_pass(model, inputs, seed, owners, weights, _PassPlan(activations=False))
    unblocked = list(values)
    try:
        second = _second_step(model, inputs, seed, owners, weights, first, flow, values,
                              constant)
    except _VALUE_SHAPED_FAILURES:
        second = None  # as above: moved tensors route other tokens than the file can run

    layer_of = _layer_of(model)
    params: dict[str, ParamProbe] = {}
    for name, param in model.parameters.items():
        own = first.params[name]
        # The unblocked tensors' own gradients are judged as initialised (first pass), or
        # at the second step where another zero blocked them at the first.
        at_second = second is not None and name in second.params
        own_pass = second if at_second and name in unblocked else first
        src = own_pass if name in unblocked else flow
        row = {**own, **{k: src.params[name][k] for k in
                         ("grad_norm", "grad_rms", "grad_to_weight", "zero_grad_fraction", "nonfinite_grad")}}
        stats = ParameterStats(
            name=name, layer=layer_of[name], shape=list(param.shape),
            mean=row["mean"], std=row["std"], abs_max=row["abs_max"], nonfinite=int(row["nonfinite"]),
            grad_norm=row["grad_norm"], grad_rms=row["grad_rms"], grad_to_weight=row["grad_to_weight"],
            zero_grad_fraction=row["zero_grad_fraction"], nonfinite_grad=int(row["nonfinite_grad"]),
            constant=bool(row["constant"]),
        )
        spread = own_pass.params[name]["unit_spread"] if name in owners else None
        params[name] = ParamProbe(stats, layer_of[name],
                                  None if spread is None or math.isnan(spread) else spread,
                                  name in src.unused, 2 if at_second else 1)

    layers = []
    for point in model.probe_points:
        act = first.activations.get(point.index)
        grad = flow.gradients.get(point.index)
        activation = None
        if act is not None:
            units, numel = first.sizes[point.index]
            activation = ActivationStats(**{**act, "nonfinite": int(act["nonfinite"])},
                                         units=units, numel=numel)
        gradient = None
        if grad is not None:
            gradient = GradientStats(norm=grad["norm"], rms=grad["rms"], nonfinite=int(grad["nonfinite"]))
        layers.append(LayerProbe(point, activation, gradient,
                                 None if grad is None else grad["reach"]))
    samples = int(inputs[0].shape[0]) if inputs and inputs[0].dim() > 0 else None
    return ProbeResult(model, layers, params, unblocked, first.output_varies, samples,
                       first.output_power, first.output_normalised, first.output_finite)
