"""What a loaded model is to the rest of the engine, whatever file it came from.

A loader (ONNX interpreter or TorchScript) produces a `LoadedModel`: a callable torch graph whose
trainable tensors are `torch.nn.Parameter`s under the names the user wrote (`net.2.weight`), plus
an ordered list of `ProbePoint`s — the values the probe measures. Nothing downstream knows which
file format the model came from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

Role = Literal["linear", "activation", "norm", "other"]

# Canonical names of the nonlinearities the rules and fixes reason about.
NONLINEARITIES = (
    "relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "silu", "mish", "softplus",
    "hardswish", "hardsigmoid", "sigmoid", "tanh", "softmax",
)


@dataclass(frozen=True)
class InputSpec:
    """One graph input. `shape` holds ints where known, a str for a symbolic dim, None unknown."""

    name: str
    shape: tuple[int | str | None, ...] | None
    dtype: torch.dtype | None
    # For integer inputs: the half-open range [low, high) the graph accepts (e.g. token ids
    # below the embedding table size). None when the graph does not say.
    value_range: tuple[int, int] | None = None


@dataclass(frozen=True)
class ProbePoint:
    """A value the probe measures: the output of a parameterised layer or of a nonlinearity.

    `layer` is the name the user wrote (`layer3.0.conv1`, `net.2`); when it cannot be recovered
    it is the node name. `node` is the node's own name in the file, for the report's `nodes`.
    """

    index: int
    layer: str
    node: str
    op: str  # the file's op type: 'Gemm', 'Conv', 'Relu', 'aten::linear', ...
    role: Role
    # Canonical activation kind for role == 'activation' ('relu', 'tanh', ...); for role ==
    # 'linear' the nonlinearity that follows this layer (None: none before the next layer).
    nonlinearity: str | None = None
    # Parameters consumed by this node, user-facing names. weight/bias are the layer's own.
    parameters: tuple[str, ...] = ()
    weight: str | None = None
    bias: str | None = None
    fan_in: int | None = None
    fan_out: int | None = None
    # How the weight's dims are laid out, so a fix can build an (out, in) matrix:
    # 'out_in' (torch Linear/Conv, ONNX Gemm transB=1, Conv) or 'in_out' (ONNX MatMul, Gemm transB=0).
    weight_layout: Literal["out_in", "in_out"] = "out_in"
    # Index of the first axis that enumerates units/channels of this value (1 for NCHW and for
    # (batch, features); the last axis for (batch, seq, features)). -1 means last axis.
    channel_axis: int = 1
    # Node names of the activation points (role 'activation') that this linear layer feeds
    # directly (through bias adds, norms, reshapes). Lets rules pair a layer with its ReLU.
    feeds: tuple[str, ...] = ()
    # True when the loader saw a BatchNorm folded into this layer's weights at export time.
    folded_batchnorm: bool = False
    # The folded BatchNorm's module path where the file keeps it (the dynamo exporter leaves
    # the BatchNorm's scope on the fused node; the legacy one keeps no trace of it).
    folded_norm: str | None = None
    # True when a BatchNorm follows this layer in the graph (run on batch statistics).
    followed_by_norm: bool = False
    # A norm over a weight tensor, not over the signal (weight standardisation: timm's
    # ScaledStdConv2d normalises its conv's weight, scaled by `gain`): its value is the same for
    # any input, and it restores no activation's scale; its scale is a parameter all the same.
    # Where the file stores that scale with its fixed factor folded in (ONNX: one tensor for
    # gain * gamma / sqrt(fan_in)), the loader sets fan_in: a unit gain is then ~sqrt(2/fan_in).
    on_weights: bool = False
    # A layer whose input is a global pool of the signal, seen through reshapes only
    # (squeeze-excite, the head, ECA's Conv1d across the pooled channels).
    reads_global_pool: bool = False
    # An activation whose input a select filled with -inf where a mask says (Llama 4's top-k
    # router): those entries sit on its flat tail by design (diagnostics/loaders/masked_inputs).
    reads_minus_infinity_fill: bool = False

    @property
    def normalises_signal(self) -> bool:
        return self.role == "norm" and not self.on_weights

    @property
    def is_embedding(self) -> bool:
        """A table lookup (ONNX Gather on a weight, aten::embedding): rows are looked up, not
        mixed, so fan-in based schemes say nothing about its scale."""
        return self.op.rsplit("::", 1)[-1].lower() in ("gather", "embedding")


Tap = Callable[[ProbePoint, torch.Tensor], None]


@dataclass
class LoadedModel(ABC):
    """A model ready to probe. Subclasses: OnnxModel, TorchScriptModel."""

    format: Literal["onnx", "torchscript", "pt2", "pytorch"]
    path: str | None
    # Trainable tensors (requires_grad) under user-facing names. TorchScript's are the module's
    # own tensors, not nn.Parameter wrappers, so that backward fills their .grad.
    parameters: dict[str, torch.Tensor]
    inputs: list[InputSpec]
    probe_points: list[ProbePoint]
    # Parameter name -> layers that used one shared tensor in the file (exporter de-duplication).
    shared_parameters: dict[str, list[str]] = field(default_factory=dict)
    # Parameter name -> the layer that reads it, where the file says more than the name (the
    # ONNX loader: the module scope of an anonymous initializer's reader).
    parameter_layers: dict[str, str] = field(default_factory=dict)
    # Facts about the export a user should know ("BatchNorm folded into 20 convs", ...).
    notes: list[str] = field(default_factory=list)

    @abstractmethod
    def run(self, inputs: Sequence[torch.Tensor], tap: Tap | None = None) -> list[torch.Tensor]:
        """Forward the graph. BatchNorm uses batch statistics, dropout is off. `tap(point, value)`
        is called once per probe point with the live tensor (part of the autograd graph)."""

    @abstractmethod
    def to(self, device: torch.device) -> LoadedModel:
        """Move parameters (and any constant tensors) to `device`; returns self."""

    @abstractmethod
    def save(self, path: Path, values: Mapping[str, torch.Tensor]) -> None:
        """Write the model in its own format with these parameter values replaced
        (used by `gradprobe fix`). Parameters not named keep their values."""

    def copies_of(self, name: str) -> list[str]:
        """The parameters that stand for one tensor of the file, `name` among them. A format
        that keeps one tensor per parameter has no others; the ONNX loader gives each layer
        reading a de-duplicated initializer its own copy."""
        return [name]

    def selection_gate(self, name: str) -> str | None:
        """The select (`where`, `masked_fill`) through which alone parameter `name` reaches
        the output, where a condition computed from an integer input (token ids) decides
        (diagnostics.selection_gates); None when it has another path."""
        return None

    def bound_of(self, name: str) -> str | None:
        """The min/max/clamp that parameter `name` only ever bounds (a threshold such as
        xIELU's `eps`); None when anything else reads it."""
        return None

    def fill_of(self, name: str) -> str | None:
        """The select that only ever writes parameter `name` where its mask says so (a masked
        fill's value, such as GPT-Neo's finfo.min); None when anything else reads it."""
        return None

    def trainable_zero_start(self, name: str) -> bool:
        """A zero in parameter `name` is a start that trains, as the graph around it shows: the
        gain of a normalisation written out as arithmetic (timm's EvoNorm in an ONNX file: a Mul
        by it after a division by a standard deviation) or a rate inside an exponential (Doge's
        `A`: `exp(A * x)`). Only a format that keeps no parameter roles needs to say so."""
        return False

    @property
    def device(self) -> torch.device:
        for p in self.parameters.values():
            return p.device
        return torch.device("cpu")

    def point(self, node: str) -> ProbePoint | None:
        return next((p for p in self.probe_points if p.node == node), None)
