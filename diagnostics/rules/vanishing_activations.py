from __future__ import annotations

from gradprobe.diagnostics.report import Severity
from gradprobe.diagnostics.rules.activation_trend import ActivationTrendRule


class VanishingActivations(ActivationTrendRule):
    """Activation variance shrinks geometrically from the first layer to the last.

    Why it matters: when every layer multiplies the signal's variance by a factor below one, the
    deep layers see inputs that are numerically zero; their outputs carry no information about the
    input and their weight gradients (which scale with their inputs) vanish too.
    Example: 40 linear layers with W = 0.5 * I: variance falls by 4x per layer, 1e-24 at the end.
    Fix: initialise each layer for its nonlinearity so that fan_in * Var(W) * gain^2 = 1 (He for
    ReLU, Xavier for tanh/sigmoid/linear, LeCun for SELU); add normalisation or residual paths for
    very deep stacks.
    Thresholds: a least-squares line through log10 of each parameterised layer's output variance
    falls by at least `decades` (3, i.e. 1000x) from the first to the last layer (layers with a
    trainable weight; a fixed transform such as csatv2's DCT stem is no depth step); error from
    `error_decades` (8). A healthy ResNet drifts by ~10x; the seed examples move 1e14 and more.
    Only info when BatchNorm was folded into the weights at export (inference statistics).
    """

    name = "vanishing-activations"
    severity = Severity.WARNING
    direction = "down"
