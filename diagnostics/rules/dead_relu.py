from __future__ import annotations

from collections.abc import Iterator

from gradprobe.diagnostics.init_schemes import param_expr, recommended_init
from gradprobe.diagnostics.probe import LayerProbe, ProbeResult
from gradprobe.diagnostics.report import Finding, Fix, Severity
from gradprobe.diagnostics.rules.base import Rule


class DeadRelu(Rule):
    """Most units of a ReLU layer output zero for every sample of the probe batch.

    Why it matters: a unit whose input is negative for every sample passes no gradient, so the
    weights feeding it never change and it never recovers. A layer that is entirely dead also
    blocks every gradient to the layers before it.
    Example: a bias initialised to -10 before a ReLU (`nn.init.constant_(layer.bias, -10)`).
    Fix: reset the bias to 0 and use He init for the layer before; or switch to LeakyReLU, ELU or
    PReLU, which keep a gradient for negative inputs.
    Thresholds: a unit (channel or feature) is dead when it is <= 0 for every sample and position
    of the batch (with a batch of 8 a healthy unit is silent by chance with p = 2^-8). Warning
    when `share` (0.5) of the layer is dead — SageMaker Debugger's DeadRelu uses 50% of the layer;
    error from `error_share` (0.9). Not reported when the layer feeding it has zero, constant or
    non-finite weights (those rules name the cause). Only info when a unit is seen fewer than
    `min_observations` (8) times (samples x positions: a pooled unit on a batch of 2 is silent on
    both samples by chance one time in four), and when the probe batch barely varies
    at this point (variance across samples below `min_sample_share` (1%) of the total variance, as
    behind a global pooling of synthetic noise in a squeeze-excite block): there the weights, not
    the data, decide which units are silent, and real inputs (`--input`) should judge.
    """

    name = "dead-relu"
    severity = Severity.ERROR
    defaults = {"share": 0.5, "error_share": 0.9, "min_sample_share": 0.01,
                "min_observations": 8}

    def check(self, probe: ProbeResult) -> Iterator[Finding]:
        for lp in probe.activations("relu"):
            act = lp.activation
            if act is None or act.dead_units < self.t["share"] or act.nonfinite:
                continue
            producer = probe.producer_of(lp)
            bias_mean, shift = None, None  # the bias that shifts what the ReLU sees
            if producer is not None and producer.point.weight:
                w = probe.params[producer.point.weight].stats
                if w.constant or w.nonfinite:
                    continue  # zero-/constant-/nonfinite-weights names the cause
                if producer.activation is not None and producer.activation.sample_var == 0:
                    continue  # its input carries no signal: the cause is upstream
                norm = probe.norm_between(producer, lp)
                shift = norm.point.bias if norm is not None else producer.point.bias
                if shift:
                    bias_mean = probe.params[shift].stats.mean
            share = act.dead_units
            severity = Severity.ERROR if share >= self.t["error_share"] else Severity.WARNING
            pre = producer.activation if producer is not None and producer.activation else act
            uninformative = pre.var > 0 and pre.sample_var < self.t["min_sample_share"] * pre.var
            observations = act.numel / max(act.units, 1)  # samples x positions per unit
            if observations < self.t["min_observations"]:
                # A pooled unit (squeeze-excite) seen on two samples is silent on both by chance
                # one time in four: too few values to tell a dead unit from a quiet one.
                yield self.finding(
                    lp, f"{share:.0%} of the {act.units} units after {name} are silent on the probe "
                        f"batch, but each unit is seen only {observations:.0f} time(s) (samples x "
                        f"positions): too few to tell a dead unit from chance; probe with a batch "
                        f"of {self.t['min_observations']:.0f} or more to judge.",
                    evidence={**evidence, "observations": observations},
                    severity=Severity.INFO, parameters=[])
                continue
            cause = ""
            if bias_mean is not None and shift and bias_mean < -0.1:
                cause = f" {shift} averages {bias_mean:.3g}."
            blocks = " It blocks every gradient to the layers before it." if share >= 0.999 else ""
            fix = (recommended_init(producer.point, reset_bias=True) if producer is not None
                   else Fix())
            if shift and producer is not None and shift != producer.point.bias:
                fix = fix.model_copy(update={
                    "bias": "zeros",
                    "code": f"{fix.code}\nnn.init.zeros_({param_expr(shift, shift.rsplit('.', 1)[0])})"})
            fix = fix.model_copy(update={"advice": "reset the bias to 0 and use He init; or use "
                                                   "LeakyReLU/ELU/PReLU"})
            evidence = {"dead_units": share, "units": act.units}
            if bias_mean is not None:
                evidence["bias_mean"] = bias_mean
            name = producer.point.layer if producer is not None else lp.point.layer
            if uninformative:
                yield self.finding(
                    lp, f"{share:.0%} of the {act.units} units after {name} are silent on the probe "
                        f"batch, but the batch barely varies here (variance across samples is "
                        f"{pre.sample_var / pre.var:.1%} of the total): lint with real inputs "
                        f"(--input) to judge.",
                    evidence={**evidence, "sample_share": pre.sample_var / pre.var},
                    severity=Severity.INFO, parameters=[])
                continue
            yield self.finding(
                lp, f"{share:.0%} of the {act.units} units after {name} are never active on the "
                    f"probe batch: they get no gradient and will not recover.{cause}{blocks}",
                evidence=evidence, fix=fix, severity=severity,
                parameters=_involved(producer, shift),
                nodes=[lp.point.node] + ([producer.point.node] if producer is not None else []))


def _involved(producer: LayerProbe | None, shift: str | None) -> list[str]:
    names = list(producer.point.parameters) if producer is not None else []
    if shift and shift not in names:
        names.append(shift)
    return names
