"""The training run behind the init-scale label tests: train a student towards a teacher and
measure how far one stage's weights moved, relative to where they started."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Run:
    loss: float  # held-out MSE after training
    stage_movement: float  # |W_T - W_0| / |W_0| over the stage's weights: how far they learned


def train_stage(model: nn.Module, teacher: nn.Module, stage: Sequence[torch.Tensor],
                optimizer: torch.optim.Optimizer, *, steps: int, batch: int,
                features: int) -> Run:
    """`steps` of MSE towards `teacher` on fresh N(0, 1) batches (seeded), then the held-out
    loss (in eval mode) and the stage's relative movement."""
    start = [w.detach().clone() for w in stage]
    gen = torch.Generator().manual_seed(7)
    model.train()
    for _ in range(steps):
        x = torch.randn(batch, features, generator=gen)
        loss = nn.functional.mse_loss(model(x), teacher(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x = torch.randn(1024, features, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        held_out = nn.functional.mse_loss(model(x), teacher(x)).item()
        moved = sum((w - w0).square().sum() for w, w0 in zip(stage, start, strict=True)).sqrt()
        size = sum(w0.square().sum() for w0 in start).sqrt()
    return Run(held_out, (moved / size).item())
