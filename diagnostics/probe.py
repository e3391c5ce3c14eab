"""Forward a probe batch, backward a fixed cotangent, and measure every probe point.

Statistics are computed on the model's device inside the forward taps and the gradient hooks;
only small stat vectors are kept, and they reach the host in one copy at the end of a pass.

Two passes when the model starts with deliberate zeros: the first pass measures the network
exactly as initialised. A zero layer (zero head, zero-init residual gamma, LoRA B) blocks every
upstream gradient at step 0, which would make healthy layers look dead; so a second "flow" pass
sets those zero tensors to their textbook init — what they look like after the first update —
and measures gradient flow through the rest of the network.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from gradprobe.diagnostics.errors import ProbeError
from gradprobe.diagnostics.graph import LoadedModel, ProbePoint
from gradprobe.diagnostics.init_schemes import recommended_init
from gradprobe.diagnostics.report import ActivationStats, GradientStats, ParameterStats

# A sigmoid/tanh entry is saturated when its local derivative is below 1% of its peak
# (sigmoid: |x| > ~4.6, tanh: |x| > ~3.0): less than 1% of the gradient passes through it.
SATURATION_DERIVATIVE = 0.01

_ACT_FIELDS = ("mean", "var", "min", "max", "zero_fraction", "dead_units", "saturation", "nonfinite",
               "sample_var")
_GRAD_FIELDS = ("norm", "rms", "nonfinite")
_PARAM_FIELDS = ("mean", "std", "abs_max", "nonfinite", "grad_norm", "grad_rms", "grad_to_weight",
                 "zero_grad_fraction", "nonfinite_grad", "unit_spread", "constant")


@dataclass
class LayerProbe:
    point: ProbePoint
    activation: ActivationStats | None = None
    gradient: GradientStats | None = None  # from the flow pass


@dataclass
class ParamProbe:
    stats: ParameterStats  # gradients from the flow pass, except for the unblocked tensors
    layer: str
    # Largest difference between two output units' gradients relative to the largest
    # gradient entry, first pass. 0 means every unit receives the same update: symmetry
    # can never break. None for parameters that are not a layer's weight.
    unit_spread: float | None
    unused: bool  # no gradient path from the output at all


@dataclass
class ProbeResult:
    model: LoadedModel
    layers: list[LayerProbe]
    params: dict[str, ParamProbe]
    # Parameters set to their textbook init for the flow pass (deliberate-looking zeros).
    unblocked: list[str] = field(default_factory=list)

    def of_role(self, role: str) -> Iterator[LayerProbe]:
        return (lp for lp in self.layers if lp.point.role == role)

    def activations(self, *kinds: str) -> Iterator[LayerProbe]:
        return (lp for lp in self.layers
                if lp.point.role == "activation" and lp.point.nonlinearity in kinds)

    def producer_of(self, activation: LayerProbe) -> LayerProbe | None:
        """The linear layer that feeds this activation directly, if the loader knows one."""
        return next((lp for lp in self.layers
                     if lp.point.role == "linear" and activation.point.node in lp.point.feeds), None)

    def norm_between(self, producer: LayerProbe, activation: LayerProbe) -> LayerProbe | None:
        """The normalisation layer between a linear layer and the activation it feeds (conv ->
        BatchNorm -> ReLU), if any: its shift, not the conv's bias, decides what the ReLU sees."""
        if not producer.point.followed_by_norm:
            return None
        between = [lp for lp in self.layers if lp.point.role == "norm"
                   and producer.point.index < lp.point.index < activation.point.index]
        return between[-1] if between else None

    def signal_cut(self) -> LayerProbe | None:
        """Where the network's output stops depending on its input: the first probed value that
        is identical for every sample of the batch while nothing after it varies again. None when
        the output still varies across the batch (a zero-init residual branch, LoRA's B or a
        ControlNet zero conv go flat on one path while the skip path carries the signal on), and
        when the cut is the last layer (a zero head).

        Table lookups are never the cut: position and token-type embeddings are the same for
        every sample by construction."""
        varying = [lp for lp in self.layers if lp.activation is not None
                   and not lp.point.is_embedding and lp.activation.nonfinite == 0]
        cut = None
        for lp in reversed(varying):
            if lp.activation.sample_var != 0:  # type: ignore[union-attr]
                break
            cut = lp
        if cut is not None and cut.point.role == "linear" and not any(
                lp.point.index > cut.point.index for lp in self.of_role("linear")):
            return None  # a zero head: constant logits at step 0, trains from the first update
        return cut

    def starves_next_layer(self, layer: LayerProbe) -> bool:
        """True when every value probed between this layer and the next parameterised one is
        identical across the batch: the next layer is fed nothing (a zeroed first layer of a
        residual branch, in front of GELU, norm or ReLU). A deliberate zero at the end of a
        branch is followed by the residual add, whose activation still varies."""
        between = []
        for lp in self.layers:
            if lp.point.index <= layer.point.index:
                continue
            if lp.point.role == "linear":
                return bool(between) and all(
                    b.activation is not None and b.activation.sample_var == 0 for b in between)
            between.append(lp)
        return False

    @property
    def folded_batchnorm(self) -> bool:
        return any(lp.point.folded_batchnorm for lp in self.layers)

    @property
    def has_nonfinite(self) -> bool:
        return any(p.stats.nonfinite or p.stats.nonfinite_grad for p in self.params.values()) or any(
            (lp.activation and lp.activation.nonfinite) or (lp.gradient and lp.gradient.nonfinite)
            for lp in self.layers)


def _activation_row(value: torch.Tensor, point: ProbePoint) -> torch.Tensor:
    # Every statistic is a few full passes over the value, and these passes are the probe's
    # overhead: moments come from means of squared deviations and counts from count_nonzero,
    # since on CPU torch.var_mean/var(dim=...) (Welford) and .sum() of a bool mask (an int64
    # copy first) cost several times more.
    x = value.detach().float()
    n = x.numel()
    if x.shape[0] > 1:
        # Law of total variance: the variance of all entries is the mean variance across the
        # batch (sample_var) plus the variance of the per-position batch means, so one pass
        # over the deviations from the batch mean gives both.
        position_mean = x.mean(dim=0)
        sample_var = (x - position_mean).square_().mean()
        mean = position_mean.mean()
        var = sample_var + (position_mean - mean).square_().mean()
    else:
        mean = x.mean()
        var = sample_var = (x - mean).square_().mean()
    lo, hi = torch.aminmax(x)
    zero = (n - torch.count_nonzero(x)) / n
    nonfinite = _nonfinite_count(x)
    kind = point.nonlinearity if point.role == "activation" else None
    if kind != "relu":
        # A full pass, and only a ReLU's silent units are dead: elsewhere it would be noise.
        dead = torch.zeros((), device=x.device)
    elif x.dim() >= 2:
        axis = point.channel_axis % x.dim()
        dims = [d for d in range(x.dim()) if d != axis]
        dead = (x.amax(dim=dims) <= 0).float().mean()
    else:
        dead = (x.amax() <= 0).float()
    if kind == "sigmoid":
        saturated = ((x * (1 - x)) < 0.25 * SATURATION_DERIVATIVE).float().mean()
    elif kind == "tanh":
        saturated = ((1 - x * x) < SATURATION_DERIVATIVE).float().mean()
    else:
        saturated = torch.zeros((), device=x.device)
    return torch.stack([mean, var, lo, hi, zero, dead, saturated, nonfinite.float(), sample_var])


def _nonfinite_count(t: torch.Tensor) -> torch.Tensor:
    """Entries that are NaN or +-inf: t - t is 0 for every finite entry and NaN for the rest."""
    return torch.count_nonzero(t - t)


def _gradient_row(grad: torch.Tensor) -> torch.Tensor:
    g = grad.detach().float()
    norm = torch.linalg.vector_norm(g)
    nonfinite = _nonfinite_count(g)
    return torch.stack([norm, norm / math.sqrt(max(g.numel(), 1)), nonfinite.float()])


def _units_view(t: torch.Tensor, point: ProbePoint | None) -> torch.Tensor | None:
    """The tensor as (output units, rest) for a layer weight, else None."""
    if point is None or t.dim() < 2:
        return None
    if point.weight_layout == "in_out":
        return t.reshape(t.shape[0], -1).t()
    return t.reshape(t.shape[0], -1)


def _param_row(p: torch.Tensor, grad: torch.Tensor | None, owner: ProbePoint | None) -> torch.Tensor:
    w = p.detach().float()
    n = max(w.numel(), 1)
    g = torch.zeros_like(w) if grad is None else grad.detach().float()
    wnorm = torch.linalg.vector_norm(w)
    gnorm = torch.linalg.vector_norm(g)
    ratio = torch.where(wnorm > 0, gnorm / wnorm.clamp_min(1e-30),
                        torch.where(gnorm > 0, torch.full_like(gnorm, math.inf), torch.zeros_like(gnorm)))
    units = _units_view(g, owner)
    if units is None or units.shape[0] < 2:
        spread = torch.full((), math.nan, device=w.device)
    else:
        spread = (units - units[:1]).abs().amax() / units.abs().amax().clamp_min(1e-30)
    wmean = w.mean()
    return torch.stack([
        wmean, (w - wmean).square_().mean().sqrt(),
        w.abs().amax() if w.numel() else torch.zeros((), device=w.device),
        _nonfinite_count(w).float(), gnorm, gnorm / math.sqrt(n), ratio,
        (g.numel() - torch.count_nonzero(g)) / n, _nonfinite_count(g).float(), spread,
        (w == w.reshape(-1)[:1]).all().float() if w.numel() else torch.ones((), device=w.device),
    ])


@dataclass
class _PassResult:
    activations: dict[int, dict[str, float]]
    sizes: dict[int, tuple[int, int]]
    gradients: dict[int, dict[str, float]]
    params: dict[str, dict[str, float]]
    unused: set[str]


class _Collector:
    """Taps and hooks that keep per-point stat vectors on the device."""

    def __init__(self) -> None:
        self.act_rows: dict[int, torch.Tensor] = {}
        self.grad_rows: dict[int, torch.Tensor] = {}
        self.sizes: dict[int, tuple[int, int]] = {}  # (units, numel), from shapes: no sync

    def tap(self, point: ProbePoint, value: torch.Tensor) -> None:
        if not value.is_floating_point() or value.numel() == 0:
            return
        self.act_rows[point.index] = _activation_row(value, point)
        units = value.shape[point.channel_axis] if value.dim() >= 2 else 1
        self.sizes[point.index] = (int(units), value.numel())
        if value.requires_grad:
            value.register_hook(lambda g, i=point.index: self._on_grad(i, g))

    def _on_grad(self, index: int, grad: torch.Tensor) -> None:
        row = _gradient_row(grad)
        # A value read by several consumers gets one hook call per path on some graphs:
        # accumulate the squared norms so the total matches the full gradient's norm.
        if index in self.grad_rows:
            prev = self.grad_rows[index]
            norm = torch.sqrt(prev[0] ** 2 + row[0] ** 2)
            row = torch.stack([norm, norm * row[1] / row[0].clamp_min(1e-30), prev[2] + row[2]])
        self.grad_rows[index] = row


def _one_pass(model: LoadedModel, inputs: list[torch.Tensor], seed: int,
              owners: dict[str, ProbePoint]) -> _PassResult:
    for p in model.parameters.values():
        p.grad = None
    collector = _Collector()
    outputs = model.run(inputs, tap=collector.tap)
    differentiable = [o for o in outputs if o.is_floating_point() and o.requires_grad]
    if not differentiable:
        kinds = ", ".join(str(o.dtype).replace("torch.", "") for o in outputs)
        raise ProbeError(
            f"the model's outputs ({kinds}) carry no gradient: gradprobe needs a floating-point "
            f"output that depends on the parameters to backpropagate"
        )
    gen = torch.Generator().manual_seed(seed + 1)
    cotangents = [torch.randn(o.shape, generator=gen).to(device=o.device, dtype=o.dtype)
                  for o in differentiable]
    try:
        torch.autograd.backward(differentiable, cotangents)
    except RuntimeError as exc:
        raise ProbeError(f"backward pass failed: {str(exc).splitlines()[0]}") from None

    names = list(model.parameters)
    param_rows = [_param_row(p, p.grad, owners.get(n)) for n, p in model.parameters.items()]
    unused = {n for n, p in model.parameters.items() if p.grad is None}
    act_idx, grad_idx = list(collector.act_rows), list(collector.grad_rows)
    pieces = [torch.stack(rows) for rows in (list(collector.act_rows.values()),
                                              list(collector.grad_rows.values()), param_rows) if rows]
    # The single device-to-host copy of the pass.
    host = torch.cat([t.reshape(-1) for t in pieces]).double().cpu().tolist() if pieces else []
    pos = 0

    def take(count: int, fields: tuple[str, ...]) -> list[dict[str, float]]:
        nonlocal pos
        width = len(fields)
        out = [dict(zip(fields, host[pos + i * width: pos + (i + 1) * width])) for i in range(count)]
        pos += count * width
        return out

    acts = dict(zip(act_idx, take(len(act_idx), _ACT_FIELDS)))
    grads = dict(zip(grad_idx, take(len(grad_idx), _GRAD_FIELDS)))
    params = dict(zip(names, take(len(names), _PARAM_FIELDS)))
    return _PassResult(acts, collector.sizes, grads, params, unused)


def _weight_owners(model: LoadedModel) -> dict[str, ProbePoint]:
    owners: dict[str, ProbePoint] = {}
    for point in model.probe_points:
        if point.weight and point.role == "linear":
            owners.setdefault(point.weight, point)
    return owners


def _layer_of(model: LoadedModel) -> dict[str, str]:
    layer: dict[str, str] = {}
    for point in model.probe_points:
        for name in point.parameters:
            layer.setdefault(name, point.layer)
    for name in model.parameters:
        layer.setdefault(name, name.rsplit(".", 1)[0] if "." in name else name)
    return layer


def _blocking_zeros(model: LoadedModel, first: _PassResult) -> list[tuple[str, ProbePoint]]:
    """Zero weights (linear layers) and zero scales (norm layers) that stop gradients."""
    found = []
    for point in model.probe_points:
        if point.role not in ("linear", "norm") or not point.weight:
            continue
        stats = first.params.get(point.weight)
        if stats and stats["abs_max"] == 0:
            found.append((point.weight, point))
    return found


def _unblocked_value(param: torch.Tensor, point: ProbePoint, seed: int) -> torch.Tensor:
    if point.role == "norm":
        return torch.ones_like(param)
    std = recommended_init(point).std or 0.02
    gen = torch.Generator().manual_seed(seed + 7)
    return (torch.randn(param.shape, generator=gen) * std).to(param)


def probe(model: LoadedModel, inputs: list[torch.Tensor], seed: int = 0) -> ProbeResult:
    owners = _weight_owners(model)
    first = _one_pass(model, inputs, seed, owners)
    flow, unblocked = first, []
    zeros = _blocking_zeros(model, first)
    if zeros:
        saved = {}
        with torch.no_grad():
            for name, point in zeros:
                param = model.parameters[name]
                saved[name] = param.detach().clone()
                param.copy_(_unblocked_value(param, point, seed))
        try:
            flow = _one_pass(model, inputs, seed, owners)
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    model.parameters[name].copy_(value)
        unblocked = [name for name, _ in zeros]

    layer_of = _layer_of(model)
    params: dict[str, ParamProbe] = {}
    for name, param in model.parameters.items():
        own = first.params[name]
        # The unblocked tensors' own gradients are judged as initialised (first pass).
        src = first if name in unblocked else flow
        row = {**own, **{k: src.params[name][k] for k in
                         ("grad_norm", "grad_rms", "grad_to_weight", "zero_grad_fraction", "nonfinite_grad")}}
        stats = ParameterStats(
            name=name, layer=layer_of[name], shape=list(param.shape),
            mean=row["mean"], std=row["std"], abs_max=row["abs_max"], nonfinite=int(row["nonfinite"]),
            grad_norm=row["grad_norm"], grad_rms=row["grad_rms"], grad_to_weight=row["grad_to_weight"],
            zero_grad_fraction=row["zero_grad_fraction"], nonfinite_grad=int(row["nonfinite_grad"]),
            constant=bool(row["constant"]),
        )
        spread = own["unit_spread"] if name in owners else None
        params[name] = ParamProbe(stats, layer_of[name],
                                  None if spread is None or math.isnan(spread) else spread,
                                  name in src.unused)

    layers = []
    for point in model.probe_points:
        act = first.activations.get(point.index)
        grad = flow.gradients.get(point.index)
        activation = None
        if act is not None:
            units, numel = first.sizes[point.index]
            activation = ActivationStats(**{**act, "nonfinite": int(act["nonfinite"])},
                                         units=units, numel=numel)
        gradient = None
        if grad is not None:
            gradient = GradientStats(norm=grad["norm"], rms=grad["rms"], nonfinite=int(grad["nonfinite"]))
        layers.append(LayerProbe(point, activation, gradient))
    return ProbeResult(model, layers, params, unblocked)
