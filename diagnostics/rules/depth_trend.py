"""Geometric trends across depth, shared by the vanishing/exploding rules.

A signal that is multiplied by the same factor at every layer is a straight line in log space;
a least-squares line through log10 of the per-layer values measures that factor while ignoring
one-off bumps (a projection) that a first/last ratio would over-weight. The depth axis holds
only layers whose values the network carries forward (see `depth_layers`): through a global
average pool the per-entry gradient shrinks by the number of positions pooled, a factor set by
the probe's resolution, and a trend across the pool called one small CNN healthy at 8x8 and
vanishing at 64x64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gradprobe.diagnostics.probe import LayerProbe, ProbeResult
from gradprobe.diagnostics.rules.symmetry import judge

TINY = 1e-38  # below float32's smallest normal: "exactly zero" for a variance


@dataclass(frozen=True)
class Trend:
    layers: list[LayerProbe]
    values: list[float]
    per_layer: float  # fitted factor per layer (10**slope)
    total: float  # fitted factor from the first to the last layer

    @property
    def decades(self) -> float:
        return math.log10(self.total) if self.total > 0 else -math.inf


def fit(layers: Sequence[LayerProbe], values: Sequence[float]) -> Trend | None:
    """None when there are too few layers for a trend (fewer than 3)."""
    pairs = [(lp, v) for lp, v in zip(layers, values) if not math.isnan(v)]
    if len(pairs) < 3:
        return None
    ys = [math.log10(min(max(v, TINY), 1e300)) for _, v in pairs]
    n = len(ys)
    xm, ym = (n - 1) / 2, sum(ys) / n
    sxx = sum((i - xm) ** 2 for i in range(n))
    slope = sum((i - xm) * (y - ym) for i, y in enumerate(ys)) / sxx
    return Trend([lp for lp, _ in pairs], [v for _, v in pairs], 10**slope, 10 ** (slope * (n - 1)))


def first_beyond(trend: Trend, factor: float) -> LayerProbe:
    """The first layer whose value has moved `factor` (>1 up, <1 down) from the first layer's:
    where the trend has become visible. Falls back to the last layer."""
    base = max(trend.values[0], TINY)
    for lp, v in zip(trend.layers, trend.values):
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
    Gradients: the trend is measured behind the last layer whose gradient is exactly zero.
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
    return out


