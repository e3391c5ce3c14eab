from __future__ import annotations

from gradprobe.diagnostics.report import Severity
from gradprobe.diagnostics.rules.activation_trend import ActivationTrendRule


class ExplodingActivations(ActivationTrendRule):
    """Activation variance grows geometrically from the first layer to the last.

    Why it matters: each layer amplifies the signal; deep activations reach values where float32
    loses precision or overflows, softmax/sigmoid heads saturate, and the first optimizer steps
    are huge.
    Example: 40 linear layers with W = 1.5 * I: variance grows 2.25x per layer, ~1e14 at the end.
    Fix: initialise each layer for its nonlinearity (He for ReLU, Xavier for tanh/sigmoid/linear,
    LeCun for SELU); for very deep stacks add normalisation or scale residual branches down.
    Thresholds: a least-squares line through log10 of each parameterised layer's output variance
    rises by at least `decades` (3, i.e. 1000x) from the first to the last layer (layers with a
    trainable weight; a fixed transform such as csatv2's DCT stem is no depth step); error from
    `error_decades` (8). A fresh ResNet-18 exported in inference mode grows ~10x, which stays
    silent. Only info when BatchNorm was folded at export. Silent when the last layer's variance
    is below `min_last_var` (1.0): a rise that ends below unit scale is a recovery from a dip,
    not an explosion (transformers' MobileViT: 3.8e-8 to 0.08, its BatchNorm scales drawn from
    N(0, 0.02)).
    """

    name = "exploding-activations"
    severity = Severity.WARNING
    direction = "up"
    defaults = {"decades": 3.0, "error_decades": 8.0, "min_last_var": 1.0}
