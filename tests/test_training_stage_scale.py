"""A whole stage initialised far above the other stages is a defect even where nothing shows
it at the first step: backed by training on timm's ConvNeXt.

convnext_atto's third stage holds 6 of its 12 blocks, each branch ending in a LayerScale at
1e-6; drawn at 10x He std (the planted-defect sweep's `stage_10x`), its outputs reach neither
the residual stream nor the logits at step 0, and its own blocks are no yardstick for each
other. init-scale compares it with the same layers in the other stages. Training says why
that matters: AdamW takes steps of about the learning rate whatever the weight's size, so a
weight 100x the library's std moves ~100x less relative to itself, and the stage stays near its
random start while the library's stage learns.
"""

from __future__ import annotations

import copy

import library_defects as defects
import library_zoo as zoo
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.training

STEPS, BATCH = 10, 8


def relative_moves(model: nn.Module, prefix: str) -> dict[str, float]:
    """|w_end - w_start| / |w_start| of each weight under `prefix` after STEPS AdamW steps on a
    fixed batch."""
    torch.manual_seed(0)
    x, y = torch.randn(BATCH, 3, 64, 64), torch.randint(0, 10, (BATCH,))
    model = copy.deepcopy(model).train()
    start = {n: p.detach().clone() for n, p in model.named_parameters()
             if n.startswith(prefix) and p.dim() > 1}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(STEPS):
        loss = nn.functional.cross_entropy(model(x)[:, :10], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = dict(model.named_parameters())
    return {n: float((weights[n].detach() - w).norm() / w.norm()) for n, w in start.items()}


@pytest.mark.slow
def test_stage_at_10x_he_barely_moves_under_adamw():
    library = zoo.build("timm", "convnext_atto").module.model
    planted = copy.deepcopy(library)
    defects.plant(planted, "stage_10x", "stages.2")
    stock = relative_moves(library, "stages.2.blocks.0.")
    slow = relative_moves(planted, "stages.2.blocks.0.")
    ratios = {n: stock[n] / slow[n] for n in stock}
    assert all(r > 20 for r in ratios.values()), ratios
