from __future__ import annotations

import math
from collections.abc import Iterator

from gradprobe.diagnostics.init_schemes import recommended_init
from gradprobe.diagnostics.probe import ProbeResult
from gradprobe.diagnostics.report import Finding, Fix, Severity
from gradprobe.diagnostics.rules.base import Rule


class NonfiniteWeights(Rule):
    """A parameter holds NaN or Inf.

    Why it matters: one NaN weight turns every activation downstream of it into NaN, and with it
    the loss and every gradient: the first optimizer step destroys the whole model.
    Example: a custom init that divides by a zero fan (`std = 1 / sqrt(0)`), or a checkpoint saved
    after a diverged step.
    Fix: re-initialise the tensor (the finding gives the scheme) and find what wrote the NaN: a
    division by zero or log of zero in init code, or a diverged checkpoint.
    Thresholds: any non-finite entry.
    """

    name = "nonfinite-weights"
    severity = Severity.ERROR

    def check(self, probe: ProbeResult) -> Iterator[Finding]:
        points = {p.weight: p for p in probe.model.probe_points if p.weight}
        for name, param in probe.params.items():
            count = param.stats.nonfinite
            if not count:
                continue
            point = points.get(name)
            fix = recommended_init(point) if point else Fix(
                advice="re-initialise this tensor and find the code or checkpoint that wrote NaN/Inf")
            numel = math.prod(param.stats.shape)
            yield self.finding(
                param.layer, f"{name} contains {count} NaN/Inf value(s) of {numel}: every value and "
                             f"gradient downstream becomes NaN on the first step.",
                evidence={"nonfinite": count, "numel": numel}, fix=fix,
                nodes=[point.node] if point else [], parameters=[name])
