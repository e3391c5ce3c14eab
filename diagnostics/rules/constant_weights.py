from __future__ import annotations

import math
from collections.abc import Iterator

from gradprobe.diagnostics.init_schemes import recommended_init
from gradprobe.diagnostics.probe import ProbeResult
from gradprobe.diagnostics.report import Finding, Severity
from gradprobe.diagnostics.rules.base import Rule
from gradprobe.diagnostics.rules.symmetry import judge


class ConstantWeights(Rule):
    """Every entry of a layer's weight has the same non-zero value.

    Why it matters: all output units compute the same function of the input. If they also receive
    the same gradient they stay identical forever, and the layer is worth one unit.
    Example: `nn.init.constant_(layer.weight, 0.1)` on consecutive hidden layers.
    Fix: use a random init matched to the following nonlinearity (He, Xavier or LeCun); the finding
    gives the exact std and the PyTorch line.
    Thresholds: standard deviation exactly 0 with a non-zero mean, on tensors with more than one
    entry. Error when the gradient is zero or identical across output units; otherwise a warning
    for a matrix or kernel (2-D or more: it starts rank-1 even though symmetry breaks through the
    layers around it) and info for a 1-D weight.
    """

    name = "constant-weights"
    severity = Severity.ERROR

    def check(self, probe: ProbeResult) -> Iterator[Finding]:
        for lp in probe.of_role("linear"):
            point = lp.point
            if not point.weight:
                continue
            param = probe.params[point.weight]
            s = param.stats
            numel = math.prod(s.shape)
            if numel < 2 or not s.constant or s.abs_max == 0 or s.nonfinite:
                continue
            verdict = judge(param)
            evidence = {"value": s.mean, "grad_norm": s.grad_norm}
            if param.unit_spread is not None:
                evidence["unit_grad_spread"] = param.unit_spread
            fix = recommended_init(point)
            if verdict.can_train:
                if len(s.shape) >= 2:
                    # Whatever the gradient does later, the layer starts rank-1: every output
                    # unit computes the same function (fill_(0.02) where normal_(0, 0.02) was meant).
                    yield self.finding(
                        lp, f"{point.layer}.weight is constant ({s.mean:.3g} everywhere): the layer "
                            f"starts rank-1 and all its {s.shape[0]} output units compute the same "
                            f"function, although {verdict.reason}. Initialise it with {fix.init} "
                            f"(std {fix.std:.3g}).",
                        evidence=evidence, fix=fix, severity=Severity.WARNING,
                        parameters=[point.weight])
                    continue
                yield self.finding(
                    lp, f"{point.layer}.weight is constant ({s.mean:.3g}) but {verdict.reason}.",
                    evidence=evidence, fix=fix, severity=Severity.INFO, parameters=[point.weight])
                continue
            yield self.finding(
                lp, f"{point.layer}.weight is constant ({s.mean:.3g} everywhere) and {verdict.reason}: "
                    f"its units can never differ. Initialise it with {fix.init} (std {fix.std:.3g}).",
                evidence=evidence, fix=fix, parameters=[point.weight])
