"""The shared check behind vanishing-activations and exploding-activations."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from gradprobe.diagnostics.init_schemes import scheme_for
from gradprobe.diagnostics.probe import ProbeResult
from gradprobe.diagnostics.report import Finding, Fix, Severity
from gradprobe.diagnostics.rules.base import Rule
from gradprobe.diagnostics.rules.depth_trend import Trend, depth_layers, first_beyond, fit

_INIT_CODE = {
    "he_normal": 'nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")',
    "xavier_uniform": "nn.init.xavier_uniform_(m.weight)",
    "lecun_normal": 'nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")',
}


def whole_model_fix(probe: ProbeResult, layers: Trend, advice: str) -> Fix:
    """One scheme for every layer of the trend, as a loop a user can paste."""
    kinds = Counter(scheme_for(lp.point.nonlinearity) for lp in layers.layers)
    scheme = kinds.most_common(1)[0][0]
    code = ("for m in model.modules():\n"
            "    if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):\n"
            f"        {_INIT_CODE[scheme]}\n"
            "        if m.bias is not None:\n"
            "            nn.init.zeros_(m.bias)")
    return Fix(init=scheme, code=code, advice=advice)  # type: ignore[arg-type]


class ActivationTrendRule(Rule):
    direction: str  # "up" or "down"
    defaults = {"decades": 3.0, "error_decades": 8.0}

    def check(self, probe: ProbeResult) -> Iterator[Finding]:
        layers = depth_layers(probe, "activation")
        trend = fit(layers, [lp.activation.var for lp in layers])  # type: ignore[union-attr]
        if trend is None:
            return
        decades = trend.decades if self.direction == "up" else -trend.decades
        if decades < self.t["decades"]:
            return
        if self.direction == "up" and trend.values[-1] < self.t["min_last_var"]:
            # Growth that ends below unit variance climbs back toward the usual scale from a
            # dip (MobileViT at transformers' init: BatchNorm scales drawn from N(0, 0.02)
            # leave 1e-8 for a LayerNorm whose eps then dominates): nothing is large.
            return
        severity = Severity.ERROR if decades >= self.t["error_decades"] else None
        folded = probe.folded_batchnorm
        if folded:
            # Inference-mode BN folded into the weights rescales every layer; training-mode BN
            # would undo it, so the trend says more about the export than the network.
            severity = Severity.INFO
        where = first_beyond(trend, 10.0 if self.direction == "up" else 0.1)
        word = "grows" if self.direction == "up" else "shrinks"
        msg = (f"activation variance {word} geometrically with depth: x{trend.per_layer:.3g} per "
               f"layer over {len(trend.layers)} layers, {trend.values[0]:.3g} at "
               f"{trend.layers[0].point.layer} to {trend.values[-1]:.3g} at "
               f"{trend.layers[-1].point.layer}; it leaves the healthy range at {where.point.layer}.")
        if folded:
            msg += " BatchNorm was folded at export, so this is measured with inference statistics."
        advice = ("initialise every layer for its nonlinearity (He for ReLU, Xavier for "
                  "tanh/sigmoid/linear, LeCun for SELU), or add normalisation / residual paths")
        yield self.finding(
            where, msg,
            evidence={"per_layer_factor": trend.per_layer, "total_factor": trend.total,
                      "first_var": trend.values[0], "last_var": trend.values[-1],
                      "layers": len(trend.layers)},
            fix=whole_model_fix(probe, trend, advice), severity=severity,
            nodes=[lp.point.node for lp in trend.layers][:50],
            parameters=[lp.point.weight for lp in trend.layers if lp.point.weight][:50])
