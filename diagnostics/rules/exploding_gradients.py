from __future__ import annotations

from gradprobe.diagnostics.report import Severity
from gradprobe.diagnostics.rules.gradient_trend import GradientTrendRule


class ExplodingGradients(GradientTrendRule):
    """The gradient reaching the early layers is huge compared with the late layers.

    Why it matters: early layers take steps orders of magnitude larger than late ones; a learning
    rate that suits the head throws the first layers around, and the loss diverges.
    Example: 40 linear layers with W = 1.5 * I: the gradient grows 1.5x per layer going backwards.
    Fix: rescale the init (He/Xavier for the nonlinearity), add normalisation; clip gradients
    (`torch.nn.utils.clip_grad_norm_`) as a guard.
    Thresholds: per-entry gradient RMS at each parameterised layer's output (the layers depth_trend
    keeps: no norm-restored layer, nothing behind a global pool, whose 1/HxW would make the verdict
    depend on the probe's resolution, nothing before a BatchNorm over fewer than 8 samples, whose
    gradient rests on those few samples' statistics), a least-squares line in log space, the same with each kind of
    layer compared with itself from block to block, with the layers of each resolution compared
    among themselves, and with the layers of each module (a residual branch, whose LayerScale
    scales every gradient inside it) compared among themselves: the mildest counts, and none
    when they disagree on the direction; a value its neighbours do not pass on (>3 decades off
    both) is left out; warning when early/late >= `ratio` (100; AUTOTRAINER uses 70 during training,
    we allow more at step 0), error from `error_ratio` (1e4).
    """

    name = "exploding-gradients"
    severity = Severity.WARNING
    direction = "explode"
    defaults = {"ratio": 100.0, "error_ratio": 1e4}
    advice = "rescale the init (He/Xavier), add normalisation, clip gradients as a guard"
