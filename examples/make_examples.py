"""Writes the bundled example models (run via `make examples`; the outputs are committed).

mlp_defects.onnx: a 5-layer ReLU MLP with two planted defects that cost real users days —
a bias of -10 on most units in front of a ReLU, and a hidden layer initialised to zero.
mlp_healthy.onnx: the same network with He init: lints clean.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).parent


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
            nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10),
        )
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def export(model: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(8, 32),), str(path), dynamo=False,
                          input_names=["features"], output_names=["logits"],
                          dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}})


def main() -> None:
    torch.manual_seed(0)
    healthy = MLP()
    export(healthy, HERE / "mlp_healthy.onnx")
    torch.manual_seed(0)
    broken = MLP()
    with torch.no_grad():
        broken.net[2].bias[:56].fill_(-10.0)  # 56 of 64 units after net.2 never fire
        broken.net[6].weight.zero_()  # zero hidden layer: no gradient, its units never differ
    export(broken, HERE / "mlp_defects.onnx")


if __name__ == "__main__":
    main()
