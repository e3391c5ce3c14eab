"""Layer-sequential unit-variance init (LSUV, Mishkin & Matas, "All you need is a good init",
ICLR 2016): start every linear/conv layer from an orthogonal matrix, then, layer by layer in
graph order, rescale its weight until its output variance on a data batch is 1.

Choices, and why:
- Every parameterised linear/conv layer is re-initialised, flagged or not: LSUV is a whole-model
  method; each layer's scale is set for the layers before it as they now are.
- Layers followed by BatchNorm are included. The paper applies LSUV to all conv/linear layers;
  behind batch-statistics BN the rescale changes nothing in the forward pass, and the weight
  then sits at the unit-variance scale the rest of the network has.
- Left alone: embeddings (looked up, not mixed), norm layers, recurrent cells (their gates
  saturate, unit output variance is not their target), 1-D weights, and tensors the caller
  protects (deliberate zeros reported as info: a zero head must stay zero).
- Biases of re-initialised layers start at zero, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch

from gradprobe.diagnostics.graph import LoadedModel, ProbePoint
from gradprobe.diagnostics.init_values import generator_for, orthogonal

# The paper's stopping rule: |Var - 1| < 0.1, at most a handful of rescales per layer.
TOLERANCE = 0.1
MAX_ITERATIONS = 5
_RECURRENT = ("lstm", "gru", "rnn")


@dataclass(frozen=True)
class LsuvLayer:
    layer: str
    weight: str
    bias: str | None
    iterations: int  # forward passes spent on this layer
    variance: float  # output variance after the last rescale
    scale: float  # product of the rescales applied to the orthogonal start
    converged: bool


def lsuv_targets(model: LoadedModel, protected: Collection[str] = ()) -> list[ProbePoint]:
    """The linear/conv layers LSUV re-initialises, in graph order, one per weight tensor."""
    seen: set[str] = set()
    targets = []
    for point in model.probe_points:
        weight = point.weight
        if point.role != "linear" or not weight or weight in seen or weight in protected:
            continue
        if point.is_embedding or any(k in point.op.lower() for k in _RECURRENT):
            continue
        param = model.parameters.get(weight)
        if param is None or param.dim() < 2 or not param.is_floating_point():
            continue
        seen.add(weight)
        targets.append(point)
    return targets


def _output_variance(model: LoadedModel, inputs: list[torch.Tensor],
                     point: ProbePoint) -> torch.Tensor:
    seen: list[torch.Tensor] = []

    def tap(p: ProbePoint, value: torch.Tensor) -> None:
        if p.index == point.index and not seen:
            seen.append(torch.var(value.detach().float(), correction=0))

    model.run(inputs, tap=tap)
    if not seen:  # the batch did not reach this layer (a branch it did not take)
        return torch.full((), math.nan)
    return seen[0]


def lsuv_init(model: LoadedModel, inputs: list[torch.Tensor], *, seed: int = 0,
              protected: Collection[str] = (), tolerance: float = TOLERANCE,
              max_iterations: int = MAX_ITERATIONS) -> list[LsuvLayer]:
    """Re-initialise the model's linear/conv layers in place; returns what happened per layer."""
    targets = lsuv_targets(model, protected)
    params = model.parameters
    with torch.no_grad():
        for point in targets:
            weight = params[point.weight]  # type: ignore[index]
            start = orthogonal(weight.shape, point.weight_layout, 1.0,
                               generator_for(seed, point.weight))  # type: ignore[arg-type]
            weight.copy_(start.to(device=weight.device, dtype=weight.dtype))
            if point.bias and point.bias not in protected and point.bias in params:
                params[point.bias].zero_()

        done = []
        for point in targets:
            weight = params[point.weight]  # type: ignore[index]
            scale, iterations, var = 1.0, 0, math.nan
            while iterations < max_iterations:
                # LSUV's stopping test is a decision on the host: one scalar per full forward
                # pass, which is what each iteration costs anyway.
                var = float(_output_variance(model, inputs, point))
                iterations += 1
                if not math.isfinite(var) or var <= 0 or abs(var - 1) < tolerance:
                    break
                factor = 1 / math.sqrt(var)
                weight.mul_(factor)
                scale *= factor
            if iterations == max_iterations and math.isfinite(var) and abs(var - 1) >= tolerance:
                var = float(_output_variance(model, inputs, point))  # after the last rescale
            done.append(LsuvLayer(point.layer, point.weight, point.bias, iterations,  # type: ignore[arg-type]
                                  var, scale, math.isfinite(var) and abs(var - 1) < tolerance))
    return done
