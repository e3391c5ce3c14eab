"""Geometric trends across depth, shared by the vanishing/exploding rules.

A signal that is multiplied by the same factor at every layer is a straight line in log space; a
least-squares line through log10 of the per-layer values measures that factor while ignoring one-off
bumps (a projection) that a first/last ratio would over-weight. For gradients two more lines compare
each kind of layer with itself and each resolution with itself (`fit` with kinds), the mildest of
the three counts, and values the layers behind them do not show are left out (`without_spikes`). The
depth axis holds only layers whose values the network carries forward (see `depth_layers`): through
a global average pool the per-entry gradient shrinks by the number of positions pooled, a factor set
by the probe's resolution, and a trend across the pool called one small CNN healthy at 8x8 and
vanishing at 64x64.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from gradprobe.diagnostics.probe import LayerProbe, ProbeResult
from gradprobe.diagnostics.rules.symmetry import judge

TINY = 1e-38  # below float32's smallest normal: "exactly zero" for a variance
# BatchNorm over fewer values per channel (samples x positions) passes on no gradient a trend
# can read: over 2 values its outputs are +-1 whatever the input's scale, and the gradient
# behind it is 1/|x1 - x2| (timm's EfficientViM at 64 px, batch 2: a 1x1 last stage).
MIN_BATCH_NORM_VALUES = 8
# Nor over fewer samples than this, however many positions each has: positions of one sample
# are correlated, so the batch statistics rest on the samples, and below ~8 per batch
# BatchNorm's statistics are unreliable (Wu & He, Group Normalization, ECCV 2018). Measured at
# batch 2: timm's efficientvit_b3 reads "129x exploding" at 64 px and 1.5e3x at 128 px,
# gc_efficientnetv2_rw_t 2.3e6x and 1.1e5x (154x at batch 3); both are flat at batch 4 and 8.
MIN_BATCH_NORM_SAMPLES = 8


@dataclass(frozen=True)
class Trend:
    layers: list[LayerProbe]
    values: list[float]
    per_layer: float  # fitted factor per layer (10**slope)
    total: float  # fitted factor from the first to the last layer

    @property
    def decades(self) -> float:
        return math.log10(self.total) if self.total > 0 else -math.inf


def fit(layers: Sequence[LayerProbe], values: Sequence[float],
        kinds: Sequence[str] | None = None) -> Trend | None:
    """None when there are too few layers for a trend (fewer than 3).

    With `kinds` (one per layer, see `layer_kind`) the slope compares each kind of layer with
    itself: a line per kind, one slope shared by all (a fixed-effects fit). Different kinds sit
    at different levels for reasons that are not depth: a query projection's gradient passes
    softmax's Jacobian and is ~100x below the value projection's beside it, a sigmoid gate on a
    position bias (WavLM) gets 1e-5 of the convolutions before it. One line through all of them
    reads a block's pattern, or the last layer's kind, as a drift. Kinds met once carry no
    slope; when fewer than 3 layers share a kind with another, the plain fit is all there is."""
    kept = [i for i, v in enumerate(values) if not math.isnan(v)]
    if len(kept) < 3:
        return None
    ys = [math.log10(min(max(values[i], TINY), 1e300)) for i in kept]
    xs = list(range(len(kept)))
    groups: dict[str, list[int]] = defaultdict(list)
    if kinds is not None:
        for j, i in enumerate(kept):
            groups[kinds[i]].append(j)
    repeated = [g for g in groups.values() if len(g) >= 2]
    if sum(map(len, repeated)) < 3:
        repeated = [xs]
    sxx = sxy = 0.0
    for group in repeated:
        xm = sum(group) / len(group)
        ym = sum(ys[j] for j in group) / len(group)
        sxx += sum((j - xm) ** 2 for j in group)
        sxy += sum((j - xm) * (ys[j] - ym) for j in group)
    slope = sxy / sxx
    n = len(kept)
    return Trend([layers[i] for i in kept], [values[i] for i in kept], 10**slope,
                 10 ** (slope * (n - 1)))


def layer_kind(name: str) -> str:
    """What a layer is, block index left out: `encoder.layer.3.attention.self.query` and
    `encoder.layer.7.attention.self.query` are one kind; `net.0` and `net.4` of a plain stack
    are one kind too."""
    return re.sub(r"\d+", "#", name)


def owning_module(name: str) -> str:
    """The module a layer sits in: `blocks.4.attn.proj` -> `blocks.4.attn`. A residual branch
    is one module, and its layers share the gain at its end (a LayerScale at 1e-5 multiplies
    every gradient inside by 1e-5); `net.0` and `net.4` of a plain stack share `net`."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def without_spikes(layers: Sequence[LayerProbe], values: Sequence[float],
                   decades: float = 3.0) -> tuple[list[LayerProbe], list[float]]:
    """Leave out a layer whose value is more than `decades` off the log-line between its two
    neighbours on the axis, in the same direction as both (largest first, until none is left).
    Backpropagation multiplies the gradient by each layer's factor in turn, so a vanishing or
    exploding gradient reaches the layers behind it; a value the next layer back no longer
    shows did not propagate. It is a local effect at that point: Swin v2's cosine attention at
    64 px divides zero-padded keys by F.normalize's eps, and its `qkv` output gradient reaches
    1e10 on rows whose input is zero, so none of it reaches a weight (eager PyTorch's qkv
    weight gradients grow towards the input there). The axis's two ends have one neighbour
    each and are kept."""
    kept = list(range(len(values)))
    logs = [math.log10(min(max(v, TINY), 1e300)) if not math.isnan(v) else math.nan
            for v in values]
    while True:  # the largest spike first: beside it, its neighbour may look like one
        worst, worst_off = None, decades
        for k in range(1, len(kept) - 1):
            before, here, after = (logs[kept[k - 1]], logs[kept[k]], logs[kept[k + 1]])
            off = here - (before + after) / 2  # NaN anywhere: the comparisons below are False
            if abs(off) > worst_off and (here - before) * (here - after) > 0:
                worst, worst_off = k, abs(off)
        if worst is None:
            break
        del kept[worst]
    return [layers[i] for i in kept], [values[i] for i in kept]


def first_beyond(trend: Trend, factor: float) -> LayerProbe:
    """The first layer whose value has moved `factor` (>1 up, <1 down) from the first layer's:
    where the trend has become visible. Falls back to the last layer."""
    base = max(trend.values[0], TINY)
    for lp, v in zip(trend.layers, trend.values, strict=True):
        if (factor > 1 and v >= base * factor) or (factor < 1 and v <= base * factor):
            return lp
    return trend.layers[-1]


def depth_layers(probe: ProbeResult, signal: str) -> list[LayerProbe]:
    """Parameterised layers in graph order: the depth axis of a trend of `signal`
    ('activation' or 'gradient').

    Layers whose output a normalisation restores before the next layer (conv -> BatchNorm, a
    transformer's projection before the residual add and LayerNorm) are not on the axis: their
    scale never reaches the output (BatchNorm's gradient is scale-invariant too), so a drift
    across them is not one the network carries. Nor are embedding lookups, nor, in a network
    with spatial layers, the layers behind a global pool (squeeze-excite branches, the head):
    their per-entry values are sums over the positions pooled. A plain stack keeps every layer.
    Only geometric drift is a trend; exact zeros have causes other rules name. Activations: a
    zero or constant weight that can train (zero head) is left out, and the trend ends at one
    that cannot, or where the signal no longer depends on the input (a dead layer upstream); a
    layer whose value is the same for every sample while the output still varies is a side path
    gone flat (csatv2's one-channel attention branch at 64 px), skipped, not the end of the axis.
    Gradients: the trend is measured behind the last layer whose gradient is exactly zero,
    and behind the last BatchNorm over fewer than MIN_BATCH_NORM_VALUES values per channel or
    fewer than MIN_BATCH_NORM_SAMPLES samples (the probe's input size, not the init, decides
    what passes through it), and behind the last norm whose output is flat (every entry equal:
    its input had no variance, and its eps sets the gradient it passes back: MaskFormer's DETR
    decoder, whose first self-attention reads zero queries).
    A layer without a trainable weight (a fixed DCT or Fourier matrix) is not on the
    activation axis: no init sets its output's scale."""
    out: list[LayerProbe] = []
    for lp in probe.layers:
        if lp.point.role != "linear":
            continue
        if lp.point.is_embedding or probe.normalised_before_next_layer(lp):
            continue  # a lookup has no depth; a norm restores its scale before the next layer
        if signal == "activation" and not lp.point.weight:
            continue  # a fixed transform (csatv2's DCT stem): no init sets its output's scale
        if probe.behind_global_pool(lp):
            continue  # a pooled side path (squeeze-excite) or the head of a spatial network
        if signal == "activation":
            param = probe.params.get(lp.point.weight or "")
            if param is not None and param.stats.constant:
                if not judge(param).can_train:
                    break
                continue
            if lp.activation is None:
                continue
            if lp.activation.sample_var == 0:
                if probe.output_varies:
                    continue  # a side path gone flat (csatv2's one-channel attention branch)
                break
        elif lp.gradient is None:
            continue
        out.append(lp)
    if signal == "gradient":
        blocked = [i for i, lp in enumerate(out) if lp.gradient and lp.gradient.rms == 0]
        out = out[blocked[-1] + 1:] if blocked else out
        few_samples = probe.samples is not None and probe.samples < MIN_BATCH_NORM_SAMPLES
        few = [lp.point.index for lp in probe.layers if lp.point.followed_by_norm and (
            few_samples or ((n := probe.positions_per_unit(lp)) is not None
                            and n < MIN_BATCH_NORM_VALUES))]
        out = [lp for lp in out if lp.point.index > max(few)] if few else out
        # A norm whose input is flat (every entry equal: DETR's first decoder self-attention
        # reads its zero queries, and the residual add after it is zero) divides the gradient
        # it passes back by sqrt(eps), not by a scale the init set.
        flat = [lp.point.index for lp in probe.layers if lp.point.normalises_signal
                and lp.activation is not None and lp.activation.var == 0]
        out = [lp for lp in out if lp.point.index > max(flat)] if flat else out
    return out


