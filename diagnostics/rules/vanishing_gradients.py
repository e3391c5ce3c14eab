from __future__ import annotations

from gradprobe.diagnostics.report import Severity
from gradprobe.diagnostics.rules.gradient_trend import GradientTrendRule


class VanishingGradients(GradientTrendRule):
    """The gradient reaching the early layers is tiny compared with the late layers.

    Why it matters: early layers learn at a fraction of the rate of late ones; with a factor of
    1e-3 or less they effectively stay at their initial values for the whole run.
    Example: ten sigmoid layers with default init: each passes at most 1/4 of the gradient.
    Fix: ReLU-family activations with He init instead of sigmoid/tanh stacks; normalisation;
    residual connections.
    Thresholds: per-entry gradient RMS at each parameterised layer's output (the layers depth_trend
    keeps: no norm-restored layer, nothing behind a global pool, whose 1/HxW would make the verdict
    depend on the probe's resolution, nothing before a BatchNorm over fewer than 8 samples, whose
    gradient rests on those few samples' statistics), a least-squares line in log space from the first to the last
    layer, the same with each kind of layer compared with itself from block to block (a query
    projection with the next block's), with the layers of each resolution compared among
    themselves (a stage's layers), and with the layers of each module compared among themselves
    (a residual branch, whose LayerScale scales every gradient inside it): the mildest of the
    four counts, and none when they disagree on the direction; a value its neighbours do not
    pass on (>3 decades off both) is left out; warning when early/late <= `ratio` (1e-3,
    AUTOTRAINER's vanishing ratio). Measured with deliberate zero layers (zero head, zero-init
    residual) set to their textbook init, as after step one. Always a warning: in our training check
    a twelve-layer sigmoid stack re-initialised with Xavier learns no better than before (the remedy
    is architectural), so the rule cannot promise that a fix restores training; where the
    activations themselves collapse, vanishing-activations reports the error.
    """

    name = "vanishing-gradients"
    severity = Severity.WARNING
    direction = "vanish"
    defaults = {"ratio": 1e-3}  # no error_ratio: never an error (see Thresholds)
    advice = "use ReLU-family activations with He init, add normalisation or residual paths"
