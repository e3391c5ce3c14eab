from __future__ import annotations

from collections.abc import Iterator

from gradprobe.diagnostics.init_schemes import recommended_init
from gradprobe.diagnostics.probe import LayerProbe, ProbeResult
from gradprobe.diagnostics.report import Finding, Fix, Severity
from gradprobe.diagnostics.rules.base import Rule


class SaturatedActivation(Rule):
    """Most outputs of a sigmoid, tanh or hard-sigmoid layer sit on its flat tails.

    Why it matters: on the tails the derivative is nearly zero, so almost no gradient passes the
    layer: the weights before it stop learning, and stacks of saturated layers vanish the gradient.
    Example: tanh after a linear layer initialised with std 1.0 on 256 inputs (pre-activations
    with std ~16).
    Fix: initialise the layer before with Xavier (tanh gain 5/3); normalise its input (LayerNorm /
    BatchNorm); or use ReLU-family activations with He init.
    Thresholds: an entry is saturated when its local derivative is below 1% of the peak (sigmoid
    |x| > ~4.6, tanh |x| > ~3.0; a hard sigmoid at 0 or 1, where it is exactly flat). Warning when
    more than `share` (0.5) of the entries are
    saturated (DeepDiagnosis uses > 50% beyond +-5); error from `error_share` (0.99), where
    effectively no gradient passes. Where the layer before carries a bias averaging beyond
    +-1 (a gate shut by its bias), the fix resets that bias to 0 as well. A layer whose value is
    the network's output (no parameterised layer or norm after it) is info below `error_share`:
    the loss acts on it directly and the unsaturated entries pull the layer before into range
    (transformers' VITS waveform tanh: 76% saturated at init, 0% after 50 AdamW steps on an L1
    target; BCE on a sigmoid output cancels its derivative). Where a select filled the input
    with -inf where a mask says (Llama 4's top-k MoE router scores the unselected experts
    `sigmoid(-inf) = 0`), those entries are on the tail by design: the share is of the others.
    """

    name = "saturated-activation"
    severity = Severity.WARNING
    defaults = {"share": 0.5, "error_share": 0.99}

    def check(self, probe: ProbeResult) -> Iterator[Finding]:
        for lp in probe.activations("sigmoid", "tanh", "hardsigmoid"):
            act = lp.activation
            if act is None or act.nonfinite or act.saturation <= self.t["share"]:
                continue
            producer = probe.producer_of(lp)
            if producer is not None and producer.point.weight:
                w = probe.params[producer.point.weight].stats
                if w.nonfinite:
                    continue
            # A gate shut by its bias (a squeeze-excite fc2 at -200) stays shut whatever the
            # weight: the fix resets the bias too.
            shut = producer is not None and producer.point.bias is not None and abs(
                probe.params[producer.point.bias].stats.mean) >= 1.0
            fix = recommended_init(producer.point, reset_bias=shut) if producer is not None \
                else Fix()
            fix = fix.model_copy(update={"advice": "Xavier init for the layer before, normalise "
                                                   "its input, or use ReLU + He init"})
            severity = Severity.ERROR if act.saturation >= self.t["error_share"] else Severity.WARNING
            source = f" after {producer.point.layer}" if producer is not None else ""
            note = ""
            masked = " (of those a mask did not set to -inf)" \
                if lp.point.reads_minus_infinity_fill else ""
            if severity is Severity.WARNING and _is_output(probe, lp):
                # The loss acts right here: the unsaturated entries pull the layer before back
                # into range within a few steps (VITS' waveform tanh, 76% saturated at
                # transformers' init: 0% after 50 AdamW steps), and BCE on a sigmoid output
                # cancels its derivative altogether. Nothing upstream is starved for good.
                severity = Severity.INFO
                note = (" It is the network's output: the loss's gradient reaches the layer "
                        "before through the unsaturated entries and pulls it into range in the "
                        "first steps.")
            yield self.finding(
                lp, f"{act.saturation:.0%} of the {lp.point.nonlinearity} outputs{source}{masked} "
                    f"are on the flat tails (derivative < 1% of its peak): little gradient passes this "
                    f"layer.{note}",
                evidence={"saturation": act.saturation}, fix=fix, severity=severity,
                parameters=list(producer.point.parameters) if producer is not None else [])


def _is_output(probe: ProbeResult, lp: LayerProbe) -> bool:
    """No parameterised layer or normalisation after it: its value is what the loss sees."""
    return not any(x.point.index > lp.point.index
                   and (x.point.role == "linear" or x.point.normalises_signal)
                   for x in probe.layers)
