"""Planted defects, each a small real network with one textbook mistake, and its healthy twin.

Every builder returns (module, example_inputs). Widths are small enough for two slow cores but
wide enough that the statistics are not noise (64 units, batch 8).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from zoo import MLP, LinearChain

BATCH = 8


def _he(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def _x(features: int = 32) -> tuple[torch.Tensor, ...]:
    return (torch.randn(BATCH, features, generator=torch.Generator().manual_seed(1)),)


def relu_mlp() -> nn.Module:
    return _he(MLP((32, 64, 64, 64, 10)))


def healthy_mlp():
    return relu_mlp(), _x()


def zero_hidden():
    m = relu_mlp()
    with torch.no_grad():
        m.net[2].weight.zero_()
    return m, _x()


def zero_head():
    """Deliberate: a zero classification head trains from step one."""
    m = relu_mlp()
    with torch.no_grad():
        m.net[6].weight.zero_()
        m.net[6].bias.zero_()
    return m, _x()


def constant_hidden():
    m = relu_mlp()
    with torch.no_grad():
        m.net[0].weight.fill_(0.05)
        m.net[2].weight.fill_(0.05)
    return m, _x()


def nan_weight():
    m = relu_mlp()
    with torch.no_grad():
        m.net[2].weight[3, 5] = math.nan
    return m, _x()


class SqrtOfNegative(nn.Module):
    """A NaN made by an operation, not a weight: sqrt of a zero-mean pre-activation."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sqrt(self.fc1(x)))


def nan_from_sqrt():
    return SqrtOfNegative(), _x()


def large_init():
    """net.2 at 10x He std (100x the variance) in a ReLU MLP without normalisation."""
    m = relu_mlp()
    with torch.no_grad():
        m.net[2].weight.mul_(10.0)
    return m, _x()


def small_init():
    """net.2 at 1/20 of He std in a ReLU MLP: every later layer is fed a signal 400x too weak."""
    m = relu_mlp()
    with torch.no_grad():
        m.net[2].weight.mul_(0.05)
    return m, _x()


def dead_relu():
    m = relu_mlp()
    with torch.no_grad():
        m.net[2].bias.fill_(-10.0)
    return m, _x()


def tanh_mlp(std: float | None) -> nn.Module:
    m = MLP((32, 64, 64, 64, 10), act=nn.Tanh)
    for layer in m.net:
        if isinstance(layer, nn.Linear):
            if std is None:
                nn.init.xavier_uniform_(layer.weight, gain=nn.init.calculate_gain("tanh"))
            else:
                nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)
    return m


def saturated_tanh():
    return tanh_mlp(1.0), _x()


def healthy_tanh():
    return tanh_mlp(None), _x()


def sigmoid_stack():
    """Twelve sigmoid layers with PyTorch's default init: each passes at most 1/4 of the gradient."""
    torch.manual_seed(0)
    return MLP((32,) + (64,) * 12 + (10,), act=nn.Sigmoid), _x()


class MaskedBranch(nn.Module):
    """fc3's output is multiplied by a zero mask: fc3 receives exactly zero gradient."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 10)
        self.fc3 = nn.Linear(32, 10)
        self.register_buffer("mask", torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) + self.fc3(x) * self.mask


def masked_branch():
    return MaskedBranch(), _x()


def chain(scale: float):
    return LinearChain(depth=40, width=16, scale=scale), (
        torch.randn(BATCH, 16, generator=torch.Generator().manual_seed(1)),)


DEFECTS: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "healthy_mlp": healthy_mlp,
    "zero_hidden": zero_hidden,
    "zero_head": zero_head,
    "constant_hidden": constant_hidden,
    "nan_weight": nan_weight,
    "nan_from_sqrt": nan_from_sqrt,
    "large_init": large_init,
    "small_init": small_init,
    "dead_relu": dead_relu,
    "saturated_tanh": saturated_tanh,
    "healthy_tanh": healthy_tanh,
    "sigmoid_stack": sigmoid_stack,
    "masked_branch": masked_branch,
    "chain_1.5": lambda: chain(1.5),
    "chain_0.5": lambda: chain(0.5),
    "chain_1.0": lambda: chain(1.0),
}
