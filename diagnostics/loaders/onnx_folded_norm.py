"""Run a convolution that absorbed an eval-mode BatchNorm as training would: on batch statistics.

An eval-mode export folds BatchNorm into the preceding conv: W' = W * gamma / sqrt(var + eps) and
b' = beta - mean * gamma / sqrt(var + eps). With a fresh model's running statistics (mean 0,
var 1) that is W / sqrt(1 + eps) — the normalisation is gone, and fifty such layers shrink or
grow the signal by orders of magnitude that training-mode BatchNorm would undo (timm
EfficientNet-B0: output std ~4e-6 folded, ~0.15 in training). Training is what the probe
predicts, so the conv's output is normalised over the batch per channel and the folded shift b'
is added back: the shift (beta, a planted BN bias) still decides what the ReLU after it sees,
while the weight's scale, as behind any BatchNorm, only sets its effective learning rate. The
gamma folded into W' cannot be separated from W: it is taken as 1 (its default init).
"""

from __future__ import annotations

from typing import Any

import torch

# torch.nn.BatchNorm2d's default: what a fresh BN divides by.
BN_EPS = 1e-5
FOLDABLE = frozenset({"Conv", "ConvTranspose"})


def batch_renormalised(op: Any) -> Any:
    """Wrap an ONNX Conv/ConvTranspose kernel so that its output is normalised per channel over
    the batch (and positions) before the folded shift is added."""

    def run(ctx: Any, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
        bias = inputs[2] if len(inputs) > 2 else None
        z = op(ctx, inputs[:2], attrs)
        # Training-mode BatchNorm with no running statistics and unit scale is exactly this
        # normalisation plus the shift, in one fused kernel that keeps only the input and two
        # per-channel vectors for backward (the composite kept four full-size tensors). The
        # aten op, not F.batch_norm: one value per channel (batch 1, 1x1 output) normalises to
        # 0 as the composite did, where F.batch_norm refuses it.
        return torch.batch_norm(z, None, bias, None, None, True, 0.0, BN_EPS,
                                torch.backends.cudnn.enabled)

    return run
