"""Closed-form initialisation schemes and the exact numbers for one layer.

He/Kaiming (ReLU family): Var(W) = gain^2 / fan_in, gain^2 = 2 for ReLU, 2/(1+a^2) for
LeakyReLU with slope a. Xavier/Glorot (tanh, sigmoid, linear): Var(W) = gain^2 * 2/(fan_in+fan_out),
tanh gain 5/3. LeCun (SELU): Var(W) = 1/fan_in. Normal std = sqrt(Var); uniform bound = sqrt(3 Var).
"""

from __future__ import annotations

import math
import re

from gradprobe.diagnostics.graph import ProbePoint
from gradprobe.diagnostics.report import Fix

RELU_FAMILY = {"relu", "leaky_relu", "prelu", "elu", "gelu", "silu", "mish", "hardswish", "softplus"}
LEAKY_SLOPE = 0.01


_NAME_PART = re.compile(r"[A-Za-z_]\w*|\d+")


def module_expr(layer: str) -> str:
    """'layer3.0.conv1' -> 'model.layer3[0].conv1' — the line a user pastes into their code."""
    parts = layer.split(".")
    if not layer or not all(_NAME_PART.fullmatch(p) for p in parts):
        return f'model.get_submodule("{layer}")'
    return "model" + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in parts)


def param_expr(param: str, layer: str) -> str:
    if "." not in param and re.fullmatch(r"[A-Za-z_]\w*", param):
        return f"model.{param}"  # a parameter of the top-level module itself
    suffix = param[len(layer) + 1:] if param.startswith(layer + ".") else ""
    if suffix and re.fullmatch(r"[A-Za-z_]\w*", suffix):
        return f"{module_expr(layer)}.{suffix}"
    return f'model.get_parameter("{param}")'


def user_expr(point: ProbePoint, param: str) -> str:
    """How the user's code names one of this layer's tensors (`model.layer1[0].conv1.weight`),
    whatever the exporter called it."""
    return _layer_param_expr(point, param, "bias" if param == point.bias else "weight")


def _layer_param_expr(point: ProbePoint, param: str, attribute: str) -> str:
    """The user's expression for a layer's weight or bias. An ONNX exporter may rename the
    tensor (`onnx::Conv_123` after folding BatchNorm, `val_12` for a transposed weight); when
    the loader recovered the layer's module path, `model.<path>.weight` is what the user's
    code calls it (and init on the module's own (out, in) tensor computes the same fans)."""
    if point.layer != point.node and not param.startswith(point.layer + "."):
        from gradprobe.diagnostics.loaders.onnx_naming import is_anonymous

        if is_anonymous(param) and _is_module_path(point.layer):
            return f"{module_expr(point.layer)}.{attribute}"
    return param_expr(param, point.layer)


def _is_module_path(layer: str) -> bool:
    return all(_NAME_PART.fullmatch(p) for p in layer.split("."))


def scheme_for(nonlinearity: str | None) -> str:
    if nonlinearity in RELU_FAMILY:
        return "he_normal"
    if nonlinearity == "selu":
        return "lecun_normal"
    return "xavier_uniform"  # tanh, sigmoid, softmax, hardsigmoid, linear


def unit_scale(point: ProbePoint) -> float:
    """What a norm's scale is at a textbook start: 1, except a weight standardisation's scale
    stored with its fixed factor folded in (ProbePoint.on_weights with a fan_in: ONNX keeps
    gain * gamma / sqrt(fan_in) as one tensor), where a unit gain is He's sqrt(2 / fan_in);
    ones there would make its conv ~sqrt(fan_in)x too strong (40x in nf_seresnet26)."""
    if point.role == "norm" and point.on_weights and point.fan_in:
        return math.sqrt(2.0 / point.fan_in)
    return 1.0


def gain_for(nonlinearity: str | None) -> float:
    if nonlinearity == "leaky_relu":
        return math.sqrt(2.0 / (1 + LEAKY_SLOPE**2))
    if nonlinearity in RELU_FAMILY:
        return math.sqrt(2.0)
    if nonlinearity == "tanh":
        return 5.0 / 3.0
    return 1.0


def target_variance(point: ProbePoint, mode: str = "fan_in") -> float | None:
    """The weight variance the recommended scheme gives this layer. `mode="fan_out"` gives
    what Kaiming's fan-out mode would (torchvision's and timm's CNNs start their convs so):
    He and LeCun divide by the fan the mode names; Xavier uses both fans either way."""
    fan_in, fan_out = point.fan_in, point.fan_out
    if not fan_in:
        return None
    scheme = scheme_for(point.nonlinearity)
    gain = gain_for(point.nonlinearity)
    fan = (fan_out or fan_in) if mode == "fan_out" else fan_in
    if scheme == "he_normal":
        return gain**2 / fan
    if scheme == "lecun_normal":
        return 1.0 / fan
    return gain**2 * 2.0 / (fan_in + (fan_out or fan_in))


def recommended_init(point: ProbePoint, reset_bias: bool = False) -> Fix:
    """The fix for this layer's weight: scheme, numbers and the PyTorch line."""
    var = target_variance(point)
    scheme = scheme_for(point.nonlinearity)
    gain = gain_for(point.nonlinearity)
    if var is None or not point.weight:
        return Fix(advice="re-initialise this layer with its framework's default init")
    std = math.sqrt(var)
    w = _layer_param_expr(point, point.weight, "weight")
    act = point.nonlinearity or "linear"
    if scheme == "he_normal":
        kind = "leaky_relu" if act == "leaky_relu" else "relu"
        extra = f", a={LEAKY_SLOPE}" if kind == "leaky_relu" else ""
        code = f'nn.init.kaiming_normal_({w}, mode="fan_in", nonlinearity="{kind}"{extra})'
        fix = Fix(init="he_normal", gain=gain, std=std, bound=math.sqrt(3) * std)
    elif scheme == "lecun_normal":
        code = f'nn.init.kaiming_normal_({w}, mode="fan_in", nonlinearity="linear")  # LeCun'
        fix = Fix(init="lecun_normal", gain=1.0, std=std, bound=math.sqrt(3) * std)
    else:
        gain_arg = f', gain=nn.init.calculate_gain("{act}")' if act in ("tanh", "sigmoid") else ""
        code = f"nn.init.xavier_uniform_({w}{gain_arg})"
        fix = Fix(init="xavier_uniform", gain=gain, std=std, bound=math.sqrt(3) * std)
    code += f"  # std={std:.4g}, bound={math.sqrt(3) * std:.4g}"
    if reset_bias and point.bias:
        code += f"\nnn.init.zeros_({_layer_param_expr(point, point.bias, 'bias')})"
    return fix.model_copy(update={
        "fan_in": point.fan_in, "fan_out": point.fan_out, "code": code,
        "bias": "zeros" if reset_bias and point.bias else None,
    })
