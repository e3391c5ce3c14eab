from __future__ import annotations

import math
from collections.abc import Iterator

import torch

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
    Thresholds: any non-finite entry. Info for a tensor no layer reads as a weight whose only
    non-finite entries are -inf: a mask a dynamo ONNX file stores as an initializer (the
    `full_like(logits, -inf)` of Llama 4's top-k router, an additive causal mask).
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
            numel = math.prod(param.stats.shape)
            if not any(name in p.parameters for p in probe.model.probe_points) \
                    and _only_minus_infinity(probe.model.parameters.get(name)):
                yield self.finding(
                    param.layer, f"{name} holds -inf in {count} of {numel} entries and no layer "
                                 f"reads it as a weight: a mask (additive attention mask, the "
                                 f"fill of a top-k router) that the exporter stored as an "
                                 f"initializer, not a parameter.",
                    evidence={"nonfinite": count, "numel": numel}, severity=Severity.INFO,
                    parameters=[name])
                continue
            fix = recommended_init(point) if point else Fix(
                advice="re-initialise this tensor and find the code or checkpoint that wrote NaN/Inf")
            yield self.finding(
                param.layer, f"{name} contains {count} NaN/Inf value(s) of {numel}: every value and "
                             f"gradient downstream becomes NaN on the first step.",
                evidence={"nonfinite": count, "numel": numel}, fix=fix,
                nodes=[point.node] if point else [], parameters=[name])


def _only_minus_infinity(tensor: torch.Tensor | None) -> bool:
    """Every entry is finite or -inf: a mask's fill, never a NaN or +inf."""
    if tensor is None:
        return False
    with torch.no_grad():
        return bool(((tensor == -math.inf) | torch.isfinite(tensor)).all())
