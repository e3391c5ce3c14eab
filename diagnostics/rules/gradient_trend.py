"""The shared check behind vanishing-gradients and exploding-gradients."""

from __future__ import annotations

from collections.abc import Iterator

from gradprobe.diagnostics.probe import ProbeResult
from gradprobe.diagnostics.report import Finding, Fix, Severity
from gradprobe.diagnostics.rules.activation_trend import whole_model_fix
from gradprobe.diagnostics.rules.base import Rule
from gradprobe.diagnostics.rules.depth_trend import (
    depth_layers,
    fit,
    layer_kind,
    owning_module,
    without_spikes,
)


class GradientTrendRule(Rule):
    direction: str  # "vanish": early layers get far less gradient than late; "explode": more
    advice: str

    def check(self, probe: ProbeResult) -> Iterator[Finding]:
        if probe.has_nonfinite:
            return  # nonfinite-* rules say what happened; a trend through NaN means nothing
        axis = depth_layers(probe, "gradient")
        layers, values = without_spikes(axis, [lp.gradient.rms for lp in axis])  # type: ignore[union-attr]
        # Each fit can be fooled one way: one line through every layer reads a kind's own
        # level (a gate on WavLM's position bias, 1e-5 of the convs) as drift; per-kind lines
        # lose the layers met once (the head that anchors a pre-LN stack whose one oversized
        # block, init-scale's finding, drowns the blocks after it); both read a step where the
        # resolution changes as drift. A per-entry gradient compares between layers at one
        # resolution: timm's EdgeNeXt shrinks its residual stream ~10x at each stage's strided
        # conv (std 0.02), and the LayerNorms that read the stream hand back 1/scale in the
        # gradient, flat within each stage (1.2e-4x "vanishing" over 4 stages, none inside
        # one). A drift all three see is real.
        # Nor does one line see a residual branch's gain: timm's SwiftFormer ends each stage
        # with a block whose branches are scaled by a LayerScale at 1e-5, so every gradient
        # inside them is 1e-5 of the convs before ("1.15e+03x exploding" over 6 layers). The
        # layers of one module share that gain: compared within their module, no drift.
        resolutions = [str(probe.positions_per_unit(lp)) for lp in layers]
        fits = [t for t in (fit(layers, values),
                            fit(layers, values, [layer_kind(lp.point.layer) for lp in layers]),
                            fit(layers, values, resolutions),
                            fit(layers, values, [owning_module(lp.point.layer) for lp in layers]))
                if t is not None and t.total > 0]
        if len(fits) < 4:
            return
        if len({t.decades > 0 for t in fits}) > 1:
            # The fits disagree on the direction: compared within its modules, ZAYA's router
            # MLP gets more gradient towards its output, in one line through the attention
            # before it, less. The mildest reading of that is no drift.
            return
        trend = min(fits, key=lambda t: abs(t.decades))
        # trend.total is last/first in forward order; gradients flow backwards.
        early_to_late = 1 / trend.total
        # A rule without an `error_ratio` threshold is never an error.
        error_ratio = self.t.get("error_ratio")
        if self.direction == "vanish":
            hit = early_to_late <= self.t["ratio"]
            severe = error_ratio is not None and early_to_late <= error_ratio
        else:
            hit = early_to_late >= self.t["ratio"]
            severe = error_ratio is not None and early_to_late >= error_ratio
        if not hit:
            return
        first, last = trend.layers[0], trend.layers[-1]
        word = "smaller" if self.direction == "vanish" else "larger"
        fix = whole_model_fix(probe, trend, self.advice)
        squashing = sum(lp.point.nonlinearity in ("sigmoid", "tanh") for lp in trend.layers)
        if self.direction == "vanish" and squashing * 2 > len(trend.layers):
            # A re-init keeps every sigmoid/tanh derivative <= 1/4 (or 1): measured not to help.
            fix = Fix(advice="replace the sigmoid/tanh activations with ReLU-family ones and "
                             "re-initialise with He; or add normalisation and residual paths",
                      code="# after replacing nn.Sigmoid/nn.Tanh with nn.ReLU:\n" + fix.code)
        yield self.finding(
            first, f"the gradient reaching {first.point.layer} is {early_to_late:.3g}x that at "
                   f"{last.point.layer} (per-entry RMS, fitted over {len(trend.layers)} layers: "
                   f"x{1 / trend.per_layer:.3g} per layer going backwards) — early layers get a "
                   f"{word} update than late ones by that factor.",
            evidence={"early_to_late": early_to_late, "per_layer_factor": 1 / trend.per_layer,
                      "first_rms": trend.values[0], "last_rms": trend.values[-1],
                      "layers": len(trend.layers)},
            fix=fix,
            severity=Severity.ERROR if severe else None,
            nodes=[lp.point.node for lp in trend.layers][:50],
            parameters=[lp.point.weight for lp in trend.layers if lp.point.weight][:50])
