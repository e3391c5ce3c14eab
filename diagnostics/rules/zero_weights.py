from __future__ import annotations

from collections.abc import Iterator

from gradprobe.diagnostics.init_schemes import recommended_init
from gradprobe.diagnostics.probe import ProbeResult
from gradprobe.diagnostics.report import Finding, Severity
from gradprobe.diagnostics.rules.base import Rule
from gradprobe.diagnostics.rules.symmetry import judge


class ZeroWeights(Rule):
    """A layer's weight tensor is all zeros.

    Why it matters: units with identical (zero) weights compute the same value and, if they also
    receive the same gradient, get the same update at every step: the layer never learns more
    than one feature. A zero weight that blocks the gradient (e.g. the first conv of a residual
    branch, in front of a ReLU) never moves at all. Deliberate zeros are judged by their gradient:
    a zero classification head, LoRA's B, ControlNet zero convs and zero-init residual scales
    receive a distinct gradient per unit and train from the first step; they are reported as info.
    Example: `nn.init.zeros_(model.net[0].weight)` on a hidden layer of an MLP.
    Fix: initialise the weight with the scheme that matches the nonlinearity that follows (He for
    the ReLU family, Xavier for tanh/sigmoid/linear, LeCun for SELU); the finding carries the std,
    bound and the PyTorch line.
    Thresholds: every entry exactly 0. Error when the gradient is zero or identical across output
    units (relative spread <= 1e-6), info otherwise. Biases are never reported: zero is their
    standard init.
    """

    name = "zero-weights"
    severity = Severity.ERROR

    def check(self, probe: ProbeResult) -> Iterator[Finding]:
        for lp in probe.layers:
            point = lp.point
            if point.role not in ("linear", "norm") or not point.weight:
                continue
            param = probe.params[point.weight]
            if param.stats.abs_max != 0 or param.stats.nonfinite:
                continue
            verdict = judge(param)
            evidence = {"grad_norm": param.stats.grad_norm, "shape": param.stats.shape}
            if param.unit_spread is not None:
                evidence["unit_grad_spread"] = param.unit_spread
            if verdict.can_train or point.role == "norm":
                what = "a zero scale" if point.role == "norm" else "a zero weight"
                yield self.finding(
                    lp, f"{point.layer} starts with {what} ({point.weight}); {verdict.reason} — "
                        f"a deliberate zero start (zero head, zero-init residual, LoRA B).",
                    evidence=evidence, severity=Severity.INFO, parameters=[point.weight])
                continue
            fix = recommended_init(point)
            yield self.finding(
                lp, f"{point.layer}.weight is all zeros and {verdict.reason}: this layer cannot "
                    f"learn. Initialise it with {fix.init} (std {fix.std:.3g}).",
                evidence=evidence, fix=fix, parameters=[point.weight])
