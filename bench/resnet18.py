"""ResNet-18 built by hand (torchvision is not a dependency), same layout and init as torchvision.

The module names match torchvision's (`conv1`, `layer2.0.downsample.0`, `fc`), so the probe
reports the layer names a user of `torchvision.models.resnet18()` would see, and the parameter
count is the same: 11,689,512.
"""

from __future__ import annotations

import torch
from torch import nn

PARAMETER_COUNT = 11_689_512  # torchvision.models.resnet18(): sum of p.numel()


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm; a 1x1 strided conv + BN on the shortcut when the shape
    changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000, zero_init_residual: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._stage(64, 64, stride=1)
        self.layer2 = self._stage(64, 128, stride=2)
        self.layer3 = self._stage(128, 256, stride=2)
        self.layer4 = self._stage(256, 512, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        self._init_like_torchvision(zero_init_residual)

    @staticmethod
    def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))

    def _init_like_torchvision(self, zero_init_residual: bool) -> None:
        # torchvision: He normal with fan_out for convs, BN scale 1 / shift 0, the fc keeps
        # nn.Linear's default; zero_init_residual zeroes each block's last BN scale.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(seed: int = 0, zero_init_residual: bool = False) -> ResNet18:
    """A freshly initialised ResNet-18; the same seed gives the same weights in every process."""
    torch.manual_seed(seed)
    model = ResNet18(zero_init_residual=zero_init_residual)
    count = sum(p.numel() for p in model.parameters())
    if count != PARAMETER_COUNT:  # the benchmark is only meaningful at torchvision's size
        raise AssertionError(f"ResNet-18 has {count} parameters, torchvision's has "
                             f"{PARAMETER_COUNT}")
    return model
