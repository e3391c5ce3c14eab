"""Small real architectures, built and exported by the tests themselves.

Sizes are chosen for two slow CPU cores: every model runs forward+backward in well under a
second. Each builder returns a module with its default PyTorch init (healthy), and an example
input tuple via `example_inputs(name)`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import nn

torch.backends.mha.set_fastpath_enabled(False)  # exporters and scripting want the plain path


def mlp(widths: tuple[int, ...] = (16, 32, 32, 8), act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """An MLP under a named attribute, so layer names read `net.0`, `net.2`, ..."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 32, 8), act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.net = mlp(widths, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LinearChain(nn.Module):
    """`depth` bias-free square linear layers with W = scale * I: the seed example.
    Activations scale as scale**depth: 1.5 explodes, 0.5 vanishes, 1.0 is healthy."""

    def __init__(self, depth: int = 40, width: int = 16, scale: float = 1.0):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.copy_(scale * torch.eye(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-style ResNet with He init, two stages of two BasicBlocks."""

    def __init__(self, width: int = 8, num_classes: int = 10, zero_init_residual: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.scale = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale(self.fc2(self.relu(self.fc1(self.avgpool(x)))))


class MobileNetV3Block(nn.Module):
    """Inverted residual: 1x1 expand, depthwise 3x3, squeeze-excite, 1x1 project."""

    def __init__(self, channels: int = 16, expand: int = 48):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(channels, expand, 1, bias=False), nn.BatchNorm2d(expand), nn.Hardswish())
        self.depthwise = nn.Sequential(
            nn.Conv2d(expand, expand, 3, 1, 1, groups=expand, bias=False), nn.BatchNorm2d(expand), nn.Hardswish()
        )
        self.se = SqueezeExcite(expand, 12)
        self.project = nn.Sequential(nn.Conv2d(expand, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.depthwise(self.expand(x))))


class MobileNetV3(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(MobileNetV3Block(), MobileNetV3Block())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(16, 32), nn.Hardswish(), nn.Linear(32, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(x, 1))


class ViT(nn.Module):
    """A small vision transformer: conv patch embedding, class token, pre-norm encoder."""

    def __init__(self, image: int = 16, patch: int = 4, dim: int = 32, depth: int = 2, heads: int = 4,
                 num_classes: int = 10, zero_head: bool = False):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        if zero_head:  # torchvision's ViT starts its classification head at zero
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.encoder(x))
        return self.head(x[:, 0])


class TextEncoder(nn.Module):
    """Token ids (int64) -> embedding -> post-norm transformer encoder -> per-token logits."""

    def __init__(self, vocab: int = 100, dim: int = 32, depth: int = 2, heads: int = 4, seq: int = 12):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, seq, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(self.embed(ids) + self.pos))


class Recurrent(nn.Module):
    """(batch, seq, features) -> LSTM or GRU (2 layers) -> linear head on the last step."""

    def __init__(self, cell: Literal["lstm", "gru"] = "lstm", features: int = 8, hidden: int = 16):
        super().__init__()
        rnn_cls = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def small_std_init(model: nn.Module, std: float = 0.02) -> nn.Module:
    """BERT/GPT-2 (normal) and timm ViT (truncated normal) start every linear and embedding at
    std 0.02 with zero biases — far below Xavier for wide layers — and train well because
    LayerNorm and residual paths keep the signal in range."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention):
            nn.init.trunc_normal_(m.in_proj_weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(m.in_proj_bias)
    return model


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP,
    "resnet": ResNet,
    "mobilenet": MobileNetV3,
    "vit": ViT,
    "text_encoder": TextEncoder,
    "lstm": lambda: Recurrent("lstm"),
    "gru": lambda: Recurrent("gru"),
    # Deliberate zeros: must be reported at most as info.
    "resnet_zero_residual": lambda: ResNet(zero_init_residual=True),
    "vit_zero_head": lambda: ViT(zero_head=True),
    # Transformer-style small-std init: healthy, must raise no scale alarm.
    "vit_timm": lambda: small_std_init(ViT(dim=64, heads=4)),
    "text_encoder_bert": lambda: small_std_init(TextEncoder(dim=64)),
}


def example_inputs(name: str, batch: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    name = {"resnet_zero_residual": "resnet", "vit_zero_head": "vit", "vit_timm": "vit",
            "text_encoder_bert": "text_encoder"}.get(name, name)
    if name in ("mlp",):
        return (torch.randn(batch, 16, generator=g),)
    if name in ("resnet", "mobilenet"):
        return (torch.randn(batch, 3, 16, 16, generator=g),)
    if name == "vit":
        return (torch.randn(batch, 3, 16, 16, generator=g),)
    if name == "text_encoder":
        return (torch.randint(0, 100, (batch, 12), generator=g),)
    if name in ("lstm", "gru"):
        return (torch.randn(batch, 10, 8, generator=g),)
    raise KeyError(name)


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[name]()


def export_onnx(model: nn.Module, args: tuple[torch.Tensor, ...], path: Path, *,
                dynamo: bool = False, train_bn: bool = False) -> Path:
    """Export like a user would. Legacy (dynamo=False) in eval mode folds BatchNorm into the
    preceding Conv; `train_bn=True` keeps BatchNormalization nodes (legacy exporter only)."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, args, str(path), dynamo=True, verbose=False)
        else:
            mode = torch.onnx.TrainingMode.TRAINING if train_bn else torch.onnx.TrainingMode.EVAL
            names = [f"input{i}" for i in range(len(args))]
            torch.onnx.export(model, args, str(path), dynamo=False, training=mode,
                              do_constant_folding=not train_bn, input_names=names,
                              output_names=["output"],
                              dynamic_axes={n: {0: "batch"} for n in names})
    return path


def export_torchscript(model: nn.Module, args: tuple[torch.Tensor, ...], path: Path, *,
                       scripted: bool = False) -> Path:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.script(model) if scripted else torch.jit.trace(model, args)
    torch.jit.save(module, str(path))
    return path

