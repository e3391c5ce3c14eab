from __future__ import annotations

from collections.abc import Iterator

from gradprobe.diagnostics.probe import ProbeResult
from gradprobe.diagnostics.report import Finding, Fix, Severity
from gradprobe.diagnostics.rules.base import Rule


class NonfiniteValues(Rule):
    """NaN or Inf first appears in an activation (forward) or a gradient (backward).

    Why it matters: with finite weights and finite inputs, a non-finite value comes from an
    operation: overflow of an exploding activation, a division by zero, sqrt/log of a negative.
    It poisons the loss and every gradient behind it.
    Example: `x / x.sum(-1, keepdim=True)` on a ReLU output that can be all zero.
    Fix: guard the operation named (add an epsilon, clamp, use log-sum-exp), or fix the scale that
    made it overflow (see exploding-activations).
    Thresholds: any non-finite entry. Reported at the first probe point that holds one (forward
    order; backward: the last layer in forward order, where the gradient first arrives). Not
    reported when the layer's own weights are non-finite (nonfinite-weights covers it). Info,
    not an error, when the forward values never reach the output and every parameter gradient
    is finite: a masked fill or a `where` overwrites them (CPM-Ant's softmax over attention rows
    that padding masks out entirely, then filled with 0), so the loss and the step are finite.
    """

    name = "nonfinite-values"
    severity = Severity.ERROR

    def check(self, probe: ProbeResult) -> Iterator[Finding]:
        bad_params = {n for n, p in probe.params.items() if p.stats.nonfinite}
        previous = None
        for lp in probe.layers:
            act = lp.activation
            if act is None:
                continue
            if act.nonfinite:
                where = f"between {previous.point.layer} and {lp.point.layer}" if previous else \
                    f"at or before {lp.point.layer}"
                if not bad_params and _discarded(probe):
                    yield self.finding(
                        lp, f"{act.nonfinite} NaN/Inf value(s) of {act.numel} appear in the "
                            f"forward pass {where} ({lp.point.op}) and are overwritten before "
                            f"the output: the output and every parameter gradient are finite "
                            f"(a masked fill after a softmax over fully masked rows does this).",
                        severity=Severity.INFO,
                        evidence={"nonfinite": act.nonfinite, "numel": act.numel,
                                  "pass": "forward", "reaches_output": False})
                elif not bad_params:
                    yield self.finding(
                        lp, f"{act.nonfinite} NaN/Inf value(s) of {act.numel} first appear in the "
                            f"forward pass {where} ({lp.point.op}); the loss will be NaN.",
                        evidence={"nonfinite": act.nonfinite, "numel": act.numel, "pass": "forward"},
                        fix=Fix(advice="guard the operation that produced it (epsilon, clamp, "
                                       "log-sum-exp) or fix the activation scale that overflowed"))
                return
            previous = lp
        if probe.has_nonfinite and not bad_params:
            for lp in reversed(probe.layers):
                if lp.gradient is not None and lp.gradient.nonfinite:
                    yield self.finding(
                        lp, f"the backward pass produces {lp.gradient.nonfinite} NaN/Inf gradient "
                            f"value(s) at {lp.point.layer} while the forward pass is finite.",
                        evidence={"nonfinite": lp.gradient.nonfinite, "pass": "backward"},
                        fix=Fix(advice="look for an operation with an infinite derivative at its "
                                       "input (sqrt at 0, pow with fractional exponent, norm of 0)"))
                    return


def _discarded(probe: ProbeResult) -> bool:
    """The non-finite values inside never reach the output nor any parameter's gradient."""
    return probe.output_finite and not any(p.stats.nonfinite_grad for p in probe.params.values())
