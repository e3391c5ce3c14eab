"""Geometric trends across depth, shared by the vanishing/exploding rules.

A signal that is multiplied by the same factor at every layer is a straight line in log space.
The factor per layer is the median of the layer-to-layer steps in log10: a geometric trend
moves every step, while a one-off jump is one step whatever its size and does not move the
median. That matters because some jumps scale with the probe, not with the network: through a
global average pool the per-entry gradient shrinks by the number of positions pooled (H x W),
so a least-squares line over a small CNN called the same weights healthy at 8x8 and vanishing
at 64x64. The median step does not change with the input resolution.
"""

from __future__ import annotations

import math
import statistics
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
    slope = statistics.median(b - a for a, b in zip(ys, ys[1:]))
    return Trend([lp for lp, _ in pairs], [v for _, v in pairs], 10**slope,
                 10 ** (slope * (len(ys) - 1)))


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

    Only geometric drift is a trend; exact zeros have causes other rules name. Activations: a
    zero or constant weight that can train (zero head) is left out, and the trend ends at one
    that cannot, or where the signal no longer depends on the input (a dead layer upstream).
    Gradients: the trend is measured behind the last layer whose gradient is exactly zero."""
    out: list[LayerProbe] = []
    for lp in probe.layers:
        if lp.point.role != "linear":
            continue
        if signal == "activation":
            param = probe.params.get(lp.point.weight or "")
            if param is not None and param.stats.constant:
                if not judge(param).can_train:
                    break
                continue
            if lp.activation is None:
                continue
            if lp.activation.sample_var == 0:
                break
        elif lp.gradient is None:
            continue
        out.append(lp)
    if signal == "gradient":
        blocked = [i for i, lp in enumerate(out) if lp.gradient and lp.gradient.rms == 0]
        out = out[blocked[-1] + 1:] if blocked else out
    return out
