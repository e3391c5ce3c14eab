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
from collections.abc import Iterator, Sequence
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

    @property
    def folded_batchnorm(self) -> bool:
        return any(lp.point.folded_batchnorm for lp in self.layers)

    @property
    def has_nonfinite(self) -> bool:
        return any(p.stats.nonfinite or p.stats.nonfinite_grad for p in self.params.values()) or any(
            (lp.activation and lp.activation.nonfinite) or (lp.gradient and lp.gradient.nonfinite)
            for lp in self.layers)


# --- statistics -----------------------------------------------------------------------------
# Every statistic is a reduction over a tapped value, and on a GPU each reduction is a kernel
# launch of a few microseconds against a whole ResNet-18 step of a few milliseconds: the number
# of operations, not the bytes, sets the overhead. So the values are measured in batches: a tap
# keeps a reference to its value (and computes the one per-value reduction that has no
# multi-tensor form, the batch mean per position), and once the pending values hold
# _FLUSH_BYTES, or the pass ends, one set of multi-tensor (`torch._foreach_*`) reductions
# measures them all. Sums accumulate in float64. Parameters are measured the same way, after
# the backward pass. Each field of _ACT_FIELDS / _GRAD_FIELDS / _PARAM_FIELDS is one column built
# from those per-value sums in `_activation_table`, `_gradient_table`, `_param_table`.

_F64 = torch.float64
# Pending values are measured together once they hold this much; a flush makes one copy of
# the pending values (for min and the non-finite count), so this also bounds the extra memory.
_FLUSH_BYTES = 32 << 20


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _chunks(tensors: list[torch.Tensor], budget: int = _FLUSH_BYTES) -> Iterator[slice]:
    """Consecutive slices of `tensors` holding at most `budget` bytes each (at least one)."""
    start, held = 0, 0
    for i, t in enumerate(tensors):
        if i > start and held + _bytes(t) > budget:
            yield slice(start, i)
            start, held = i, 0
        held += _bytes(t)
    if start < len(tensors):
        yield slice(start, len(tensors))


def _min_and_nonfinite(xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per tensor: the minimum (negated max of -x) and the count of NaN/+-inf entries (-x + x
    is 0 for every finite entry and NaN for the rest), from one temporary copy."""
    neg = torch._foreach_neg(xs)
    neg_max = torch._foreach_max(neg)
    torch._foreach_add_(neg, xs)
    return neg_max, list(torch._foreach_norm(neg, 0, dtype=_F64))


@dataclass
class _PendingActivation:
    index: int
    value: torch.Tensor
    version: int  # value._version at the tap: an in-place op later would change what we read
    batch_mean: torch.Tensor  # mean over the batch axis per position (a copy: reduced in place)
    single: bool  # no batch axis to average over: sample_var is the variance itself
    unit_max: torch.Tensor | None  # ReLU: the largest entry of each unit
    saturated: torch.Tensor | None  # sigmoid/tanh: saturated fraction


def _pending_activation(value: torch.Tensor, point: ProbePoint) -> _PendingActivation:
    x = value
    acc = _F64 if x.dtype == _F64 else torch.float32
    single = x.dim() == 0 or x.shape[0] <= 1
    batch_mean = x.reshape(-1).to(acc, copy=True) if single else x.mean(dim=0, dtype=acc)
    kind = point.nonlinearity if point.role == "activation" else None
    unit_max = None
    if kind == "relu":  # only a ReLU's silent units are dead: elsewhere it would be noise
        if x.dim() >= 2:
            axis = point.channel_axis % x.dim()
            unit_max = x.amax(dim=[d for d in range(x.dim()) if d != axis])
        else:
            unit_max = x.amax().reshape(1)
    saturated = None
    if kind in ("sigmoid", "tanh"):
        xf = x.float()
        # a sigmoid/tanh entry is saturated where its local derivative is below 1% of its peak
        low = (xf * (1 - xf)) < 0.25 * SATURATION_DERIVATIVE if kind == "sigmoid" \
            else (1 - xf * xf) < SATURATION_DERIVATIVE
        saturated = low.float().mean()
    return _PendingActivation(-1, x, x._version, batch_mean, single, unit_max, saturated)


_ACT_RAW = ("sum_sq_dev", "nonzero", "max", "neg_max", "nonfinite", "mean_abs_sum",
            "mean_neg_sum", "mean_sq_dev", "saturation")


def _activation_raw(pend: list[_PendingActivation]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-value sums (rows _ACT_RAW, one column per value) and the dead-unit fraction.
    Moments are sums of squared deviations (two passes, as exact as float32 allows even when
    the mean dwarfs the spread); the batch means are centred in place."""
    xs = [p.value for p in pend]
    means = [p.batch_mean for p in pend]
    device = xs[0].device
    neg_max, nonfinite = _min_and_nonfinite(xs)
    deviations = torch._foreach_sub(xs, means)
    scalars = [*torch._foreach_powsum(deviations, 2, dtype=_F64)]
    del deviations
    scalars += [*torch._foreach_norm(xs, 0, dtype=_F64), *torch._foreach_max(xs), *neg_max,
                *nonfinite, *torch._foreach_norm(means, 1, dtype=_F64)]
    negative = torch._foreach_clamp_max(means, 0.0)  # sum(x) = sum|x| - 2 sum|min(x, 0)|
    scalars += torch._foreach_norm(negative, 1, dtype=_F64)
    del negative
    k = len(pend)
    sums = torch.stack(scalars[-2 * k:]).reshape(2, k)
    sizes = torch.tensor([p.batch_mean.numel() for p in pend], dtype=_F64, device=device)
    centre = ((sums[0] - 2 * sums[1]) / sizes).to(means[0].dtype)
    torch._foreach_sub_(means, list(centre.unbind(0)))
    scalars += torch._foreach_powsum(means, 2, dtype=_F64)
    zero = torch.zeros((), dtype=_F64, device=device)
    scalars += [zero if p.saturated is None else p.saturated for p in pend]
    raw = torch.stack(scalars).reshape(len(_ACT_RAW), k)
    # Dead units: the fraction of units whose largest entry is <= 0, one segment per value (a
    # value that is not a ReLU gets a single live unit).
    live = torch.ones(1, dtype=_F64, device=device)
    unit_max = [live if p.unit_max is None else p.unit_max for p in pend]
    lengths = torch.tensor([u.numel() for u in unit_max], device=device)
    dead = torch.segment_reduce(torch.cat(unit_max).le(0).to(_F64), "mean", lengths=lengths)
    return raw, dead


def _activation_table(raw: torch.Tensor, dead: torch.Tensor, numel: list[int],
                      positions: list[int], single: list[bool]) -> torch.Tensor:
    """Rows of _ACT_FIELDS, one per value, from the per-value sums of `_activation_raw`."""
    r = dict(zip(_ACT_RAW, raw.unbind(0), strict=True))
    sizes = torch.tensor([numel, positions, [float(s) for s in single]], dtype=_F64,
                         device=raw.device)
    n, p, is_single = sizes.unbind(0)
    # Law of total variance: the variance of all entries is the mean variance across the batch
    # (sample_var) plus the variance of the per-position batch means.
    sample_var = r["sum_sq_dev"] / n
    var = sample_var + r["mean_sq_dev"] / p
    columns = {
        "mean": (r["mean_abs_sum"] - 2 * r["mean_neg_sum"]) / p, "var": var,
        "min": -r["neg_max"], "max": r["max"], "zero_fraction": (n - r["nonzero"]) / n,
        "dead_units": dead, "saturation": r["saturation"], "nonfinite": r["nonfinite"],
        "sample_var": torch.where(is_single > 0, var, sample_var),
    }
    return torch.stack([columns[f] for f in _ACT_FIELDS], dim=1)


def _activation_row(value: torch.Tensor, point: ProbePoint) -> torch.Tensor:
    """_ACT_FIELDS of one value (the batched path, for a single value)."""
    with torch.no_grad():
        pend = _pending_activation(value, point)
        raw, dead = _activation_raw([pend])
        return _activation_table(raw, dead, [value.numel()], [pend.batch_mean.numel()],
                                 [pend.single])[0]


def _gradient_raw(grads: list[torch.Tensor]) -> torch.Tensor:
    """Rows (sum of squares, non-finite count), one column per gradient."""
    _, nonfinite = _min_and_nonfinite(grads)
    return torch.stack([*torch._foreach_powsum(grads, 2, dtype=_F64), *nonfinite]) \
        .reshape(2, len(grads))


def _gradient_table(raw: torch.Tensor, numel: list[int]) -> torch.Tensor:
    """Rows of _GRAD_FIELDS from summed `_gradient_raw` columns."""
    norm = raw[0].sqrt()
    n = torch.tensor(numel, dtype=_F64, device=raw.device)
    columns = {"norm": norm, "rms": norm / n.sqrt(), "nonfinite": raw[1]}
    return torch.stack([columns[f] for f in _GRAD_FIELDS], dim=1)


def _gradient_row(grad: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _gradient_table(_gradient_raw([grad]), [max(grad.numel(), 1)])[0]


def _units_view(t: torch.Tensor, point: ProbePoint | None) -> torch.Tensor | None:
    """The tensor as (output units, rest) for a layer weight, else None."""
    if point is None or t.dim() < 2:
        return None
    if point.weight_layout == "in_out":
        return t.reshape(t.shape[0], -1).t()
    return t.reshape(t.shape[0], -1)


# Per-parameter sums; a parameter that lacks one (empty, no gradient, not a layer weight)
# reads the default.
_PARAM_RAW = {"w_abs": 0.0, "w_sq": 0.0, "w_absmax": 0.0, "w_max": 0.0, "w_neg_max": 0.0,
              "w_neg_sum": 0.0, "w_nonfinite": 0.0, "g_sq": 0.0, "g_nonzero": 0.0,
              "g_nonfinite": 0.0, "unit_diff": math.nan, "unit_max": math.nan}


def _param_table(params: list[torch.Tensor], grads: list[torch.Tensor | None],
                 owners: list[ProbePoint | None]) -> torch.Tensor:
    """Rows of _PARAM_FIELDS, one per parameter, from multi-tensor reductions."""
    device = params[0].device
    found: dict[str, list[tuple[int, torch.Tensor]]] = {k: [] for k in _PARAM_RAW}

    def record(key: str, where: list[int], values: Sequence[torch.Tensor]) -> None:
        found[key].extend(zip(where, values, strict=True))

    with torch.no_grad():
        full = [i for i, p in enumerate(params) if p.numel()]
        for part in _chunks([params[i] for i in full]):
            where = full[part]
            ws = [params[i] for i in where]
            record("w_abs", where, torch._foreach_norm(ws, 1, dtype=_F64))
            record("w_sq", where, torch._foreach_powsum(ws, 2, dtype=_F64))
            record("w_absmax", where, torch._foreach_norm(ws, math.inf, dtype=_F64))
            record("w_max", where, torch._foreach_max(ws))
            neg_max, nonfinite = _min_and_nonfinite(ws)
            record("w_neg_max", where, neg_max)
            record("w_nonfinite", where, nonfinite)
            neg = torch._foreach_neg(ws)
            torch._foreach_clamp_min_(neg, 0.0)  # sum(w) = sum|w| - 2 sum max(-w, 0)
            record("w_neg_sum", where, torch._foreach_norm(neg, 1, dtype=_F64))
            del neg
        with_grad = [i for i, g in enumerate(grads) if g is not None and g.numel()]
        for part in _chunks([grads[i] for i in with_grad]):  # type: ignore[misc]
            where = with_grad[part]
            gs = [grads[i] for i in where]
            record("g_sq", where, torch._foreach_powsum(gs, 2, dtype=_F64))
            record("g_nonzero", where, torch._foreach_norm(gs, 0, dtype=_F64))
            record("g_nonfinite", where, _min_and_nonfinite(gs)[1])
        # Unit spread: how far apart two output units' gradients are, relative to the largest
        # entry (0: every unit gets the same update, symmetry never breaks).
        units, where, missing = [], [], []
        for i, (p, g, owner) in enumerate(zip(params, grads, owners, strict=True)):
            view = _units_view(p, owner)
            if view is None or view.shape[0] < 2:
                continue
            if g is None or not g.numel():
                missing.append(i)
            else:
                units.append(_units_view(g, owner))
                where.append(i)
        for part in _chunks(units):
            us = units[part]
            diffs = torch._foreach_sub(us, [u[:1] for u in us])
            record("unit_diff", where[part], torch._foreach_norm(diffs, math.inf, dtype=_F64))
            del diffs
            record("unit_max", where[part], torch._foreach_norm(us, math.inf, dtype=_F64))
        zero = torch.zeros((), dtype=_F64, device=device)
        for i in missing:
            found["unit_diff"].append((i, zero))
            found["unit_max"].append((i, zero))

        # One stack of every sum, then one gather into (raw key, parameter) with the defaults.
        defaults = list(_PARAM_RAW.values())
        flat = [v for key in _PARAM_RAW for _, v in found[key]]
        table = torch.cat([torch.stack(flat).to(_F64) if flat else zero.new_zeros(0),
                           torch.tensor(defaults, dtype=_F64, device=device)])
        index, offset = [], 0
        for k, key in enumerate(_PARAM_RAW):
            at = [len(flat) + k] * len(params)
            for j, (i, _) in enumerate(found[key]):
                at[i] = offset + j
            offset += len(found[key])
            index.append(at)
        gathered = table[torch.tensor(index, device=device)]
        r = dict(zip(_PARAM_RAW, gathered.unbind(0), strict=True))
        numel = torch.tensor([p.numel() for p in params], dtype=_F64, device=device)
        n = numel.clamp_min(1)
        mean = (r["w_abs"] - 2 * r["w_neg_sum"]) / numel  # an empty tensor has no mean (NaN)
        wnorm, gnorm = r["w_sq"].sqrt(), r["g_sq"].sqrt()
        ratio = torch.where(wnorm > 0, gnorm / wnorm.clamp_min(1e-30),
                            torch.where(gnorm > 0, math.inf, 0.0))
        columns = {
            "mean": mean, "std": (r["w_sq"] / numel - mean * mean).clamp_min(0).sqrt(),
            "abs_max": r["w_absmax"], "nonfinite": r["w_nonfinite"], "grad_norm": gnorm,
            "grad_rms": gnorm / n.sqrt(), "grad_to_weight": ratio,
            "zero_grad_fraction": (numel - r["g_nonzero"]) / n,
            "nonfinite_grad": r["g_nonfinite"],
            "unit_spread": r["unit_diff"] / r["unit_max"].clamp_min(1e-30),
            "constant": (r["w_max"] == -r["w_neg_max"]).to(_F64),
        }
        return torch.stack([columns[f] for f in _PARAM_FIELDS], dim=1)


def _param_row(p: torch.Tensor, grad: torch.Tensor | None, owner: ProbePoint | None) -> torch.Tensor:
    return _param_table([p], [grad], [owner])[0]


@dataclass
class _PassResult:
    activations: dict[int, dict[str, float]]
    sizes: dict[int, tuple[int, int]]
    gradients: dict[int, dict[str, float]]
    params: dict[str, dict[str, float]]
    unused: set[str]


class _Collector:
    """Taps and hooks that measure every point on the device, in batches (see above).

    `immediate` measures each value as it arrives: the fallback when a pending value was
    changed in place before its batch was measured (an in-place op a TorchScript graph kept).
    """

    def __init__(self, immediate: bool = False) -> None:
        self.immediate = immediate
        self.sizes: dict[int, tuple[int, int]] = {}  # (units, numel), from shapes: no sync
        self.stale = False  # a pending value changed before it was measured
        self._acts: list[_PendingActivation] = []
        self._act_bytes = 0
        self._act_tables: list[torch.Tensor] = []
        self._act_order: list[int] = []
        self._grads: list[tuple[int, torch.Tensor, int]] = []  # (index, grad, version)
        self._grad_bytes = 0
        self._grad_raw: list[torch.Tensor] = []
        self._grad_order: list[int] = []

    def tap(self, point: ProbePoint, value: torch.Tensor) -> None:
        if not value.is_floating_point() or value.numel() == 0:
            return
        with torch.no_grad():
            pend = _pending_activation(value, point)
        pend.index = point.index
        self._acts.append(pend)
        self._act_bytes += _bytes(value)
        units = value.shape[point.channel_axis] if value.dim() >= 2 else 1
        self.sizes[point.index] = (int(units), value.numel())
        if value.requires_grad:
            value.register_hook(lambda g, i=point.index: self._on_grad(i, g))
        if self.immediate or self._act_bytes >= _FLUSH_BYTES:
            self.flush_activations()

    def _on_grad(self, index: int, grad: torch.Tensor) -> None:
        # A value read by several consumers gets one hook call per path on some graphs: the
        # squared norms and counts of all calls are summed per point.
        self._grads.append((index, grad, grad._version))
        self._grad_bytes += _bytes(grad)
        if self.immediate or self._grad_bytes >= _FLUSH_BYTES:
            self.flush_gradients()

    def flush_activations(self) -> None:
        if not self._acts:
            return
        pend, self._acts, self._act_bytes = self._acts, [], 0
        self.stale |= any(p.value._version != p.version for p in pend)
        with torch.no_grad():
            raw, dead = _activation_raw(pend)
            self._act_tables.append(_activation_table(
                raw, dead, [p.value.numel() for p in pend], [p.batch_mean.numel() for p in pend],
                [p.single for p in pend]))
        self._act_order += [p.index for p in pend]

    def flush_gradients(self) -> None:
        if not self._grads:
            return
        pend, self._grads, self._grad_bytes = self._grads, [], 0
        self.stale |= any(g._version != v for _, g, v in pend)
        with torch.no_grad():
            self._grad_raw.append(_gradient_raw([g for _, g, _ in pend]))
        self._grad_order += [i for i, _, _ in pend]

    def activation_table(self) -> tuple[list[int], torch.Tensor | None]:
        self.flush_activations()
        if not self._act_tables:
            return [], None
        return self._act_order, torch.cat(self._act_tables)

    def gradient_table(self) -> tuple[list[int], torch.Tensor | None]:
        self.flush_gradients()
        if not self._grad_raw:
            return [], None
        points = list(dict.fromkeys(self._grad_order))
        at = {index: k for k, index in enumerate(points)}
        raw = torch.cat(self._grad_raw, dim=1)
        where = torch.tensor([at[i] for i in self._grad_order], device=raw.device)
        summed = raw.new_zeros(2, len(points)).index_add_(1, where, raw)
        return points, _gradient_table(summed, [max(self.sizes[i][1], 1) for i in points])


def _one_pass(model: LoadedModel, inputs: list[torch.Tensor], seed: int,
              owners: dict[str, ProbePoint], immediate: bool = False) -> _PassResult:
    for p in model.parameters.values():
        p.grad = None
    collector = _Collector(immediate)
    outputs = model.run(inputs, tap=collector.tap)
    collector.flush_activations()  # before the backward pass: the pending values can go
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

    act_idx, act_table = collector.activation_table()
    grad_idx, grad_table = collector.gradient_table()
    if collector.stale and not immediate:
        # A value changed in place after its tap: measure again, each value as it comes.
        return _one_pass(model, inputs, seed, owners, immediate=True)
    names = list(model.parameters)
    tensors = list(model.parameters.values())
    param_table = _param_table(tensors, [p.grad for p in tensors],
                               [owners.get(n) for n in names]) if tensors else None
    unused = {n for n, p in model.parameters.items() if p.grad is None}
    pieces = [t for t in (act_table, grad_table, param_table) if t is not None]
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
