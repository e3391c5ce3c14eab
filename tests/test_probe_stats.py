"""Per-tensor statistics of the probe, on tensors whose answers are known by hand."""

from __future__ import annotations

import math

import pytest
import torch

from gradprobe.diagnostics import probe as probe_module
from gradprobe.diagnostics.probe import _param_row


@pytest.fixture(autouse=True, params=["per-tensor", "multi-tensor"])
def strategy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with both ways of measuring: one tensor at a time (what a CPU does) and
    the multi-tensor kernels (what a GPU does), so the GPU's path is checked on this CPU."""
    monkeypatch.setattr(probe_module, "_PER_TENSOR",
                        {"cpu": request.param == "per-tensor"})
    return request.param

FIELDS = ("mean", "std", "abs_max", "nonfinite", "grad_norm", "grad_rms", "grad_to_weight",
          "zero_grad_fraction", "nonfinite_grad", "unit_spread", "constant")


def row(weight: torch.Tensor, grad: torch.Tensor | None) -> dict[str, float]:
    return dict(zip(FIELDS, _param_row(weight, grad, None).tolist(), strict=True))


def test_nonfinite_entries_are_counted_exactly():
    w = torch.tensor([1.0, math.nan, math.inf, -2.0])
    g = torch.tensor([0.0, 1.0, math.nan, 0.0])
    r = row(w, g)
    assert r["nonfinite"] == 2 and r["nonfinite_grad"] == 1
    assert r["zero_grad_fraction"] == 0.5


def test_an_empty_parameter_has_no_nonfinite_entries():
    r = row(torch.empty(0), torch.empty(0))
    assert r["nonfinite"] == 0 and r["nonfinite_grad"] == 0
    assert r["grad_norm"] == 0


def test_a_missing_gradient_counts_as_zero():
    r = row(torch.full((3, 4), 0.5), None)
    assert r["grad_norm"] == 0 and r["zero_grad_fraction"] == 1 and r["constant"] == 1
    assert r["grad_to_weight"] == 0


# --- the batched statistics against the per-value formulas they replace ---------------------

from gradprobe.diagnostics.graph import ProbePoint  # noqa: E402
from gradprobe.diagnostics.probe import (  # noqa: E402
    _ACT_FIELDS,
    _PARAM_FIELDS,
    _activation_row,
    _Collector,
    _DeviceSums,
    _gradient_row,
)


def reference_activation(x: torch.Tensor, point: ProbePoint) -> dict[str, float]:
    """One statistic at a time, in float64, straight from the definitions."""
    x = x.double()
    kind = point.nonlinearity if point.role == "activation" else None
    var = x.var(correction=0)
    out = {"mean": x.mean(), "var": var, "min": x.min(), "max": x.max(),
           "zero_fraction": (x == 0).double().mean(), "nonfinite": (~x.isfinite()).sum(),
           "sample_var": x.var(dim=0, correction=0).mean() if x.shape[0] > 1 else var,
           "saturation": 0.0, "dead_units": 0.0}
    if kind == "relu":
        dims = [d for d in range(x.dim()) if d != point.channel_axis % x.dim()]
        out["dead_units"] = (x.amax(dim=dims) <= 0).double().mean()
    if kind == "tanh":
        out["saturation"] = ((1 - x * x) < 0.01).double().mean()
    return {k: float(v) for k, v in out.items()}


def point(kind: str | None = None, axis: int = 1) -> ProbePoint:
    role = "activation" if kind else "linear"
    return ProbePoint(index=0, layer="l", node="n", op="Relu", role=role, nonlinearity=kind,
                      channel_axis=axis)


def cases() -> list[tuple[torch.Tensor, ProbePoint]]:
    gen = torch.Generator().manual_seed(0)
    conv = torch.randn(4, 8, 5, 5, generator=gen) * 3 + 1.5
    relu = conv.clamp_min(0)
    relu[:, 2] = 0  # a dead channel
    tokens = torch.randn(2, 7, 16, generator=gen)
    same_rows = torch.randn(1, 30, generator=gen).expand(5, 30).contiguous()
    return [
        (conv, point()), (relu, point("relu")), (torch.tanh(conv), point("tanh")),
        (tokens, point(axis=-1)), (tokens.clamp_min(0), point("relu", axis=-1)),
        (torch.randn(1, 64, generator=gen), point()), (torch.randn(9, generator=gen), point()),
        (same_rows, point()), (torch.full((3, 4), 2.5), point()),
        (torch.randn(3, 1000, generator=gen) + 1e3, point()),
        # Larger than the CPU's scratch block: measured block by block (also not contiguous).
        (torch.randn(3, 120_000, generator=gen) * 0.5 + 2.0, point()),
        (torch.randn(1, 300_000, generator=gen) - 1.0, point()),
        (torch.randn(200, 3, 700, generator=gen).transpose(0, 1), point(axis=-1)),
    ]


def test_activation_rows_match_the_definitions_to_float32_rounding():
    for x, p in cases():
        got = dict(zip(_ACT_FIELDS, _activation_row(x, p).tolist(), strict=True))
        want = reference_activation(x, p)
        # The mean is a difference of float32 sums (sum|x| - 2 sum|min(x, 0)|): exact to float32
        # rounding of the entries' scale, not of the mean itself when that is near zero.
        scale = float(x.double().abs().mean())
        # A float32 sum over 1e5 entries and more rounds to a few 1e-6 of its size.
        rel = 2e-6 if x.numel() < 100_000 else 2e-5
        for field in _ACT_FIELDS:
            tol = rel / 2 * scale if field == "mean" else 1e-9 * (1 + want["mean"] ** 2)
            assert math.isclose(got[field], want[field], rel_tol=rel, abs_tol=tol), \
                (field, tuple(x.shape), got[field], want[field])


def test_the_fast_path_counts_what_the_exact_path_counts_on_finite_values():
    # The fast path counts non-zero entries as sum |sign(x)| in blocks, the exact one with
    # count_nonzero: on finite values every field is the same to the last bit.
    for x, p in cases():
        x = x.contiguous() if x.dim() > 2 else x  # both layouts: contiguous and transposed
        exact = _activation_row(x, p, exact=True).tolist()
        fast = _activation_row(x, p, exact=False).tolist()
        assert fast == exact, tuple(x.shape)
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(3, 300_000, generator=gen)
    sparse = torch.relu(torch.randn(3, 300_000, generator=gen))  # half its entries are zero
    fast = _param_row(weight, sparse, None, exact=False)
    torch.testing.assert_close(fast, _param_row(weight, sparse, None, exact=True), rtol=0, atol=0,
                               equal_nan=True)  # unit_spread: NaN without an owning layer
    assert fast[_PARAM_FIELDS.index("zero_grad_fraction")] == float((sparse == 0).double().mean())


def test_nonfinite_activations_are_counted_and_poison_the_moments():
    x = torch.randn(4, 6)
    x[0, 0], x[1, 3], x[2, 2] = math.nan, math.inf, -math.inf
    row = dict(zip(_ACT_FIELDS, _activation_row(x, point()).tolist(), strict=True))
    assert row["nonfinite"] == 3
    assert math.isnan(row["mean"]) and math.isnan(row["var"])


def test_a_batch_of_values_reads_the_same_as_each_value_alone():
    sums = _DeviceSums()
    collector = _Collector(sums)
    values = cases()
    for i, (x, p) in enumerate(values):
        collector.tap(ProbePoint(**{**p.__dict__, "index": i}), x)
    collector.flush_activations()
    rows = collector.activation_rows(sums.fetch())
    assert list(rows) == list(range(len(values)))
    for i, (x, p) in enumerate(values):
        assert torch.equal(torch.tensor([rows[i][f] for f in _ACT_FIELDS], dtype=torch.float64),
                           _activation_row(x, p))


def test_a_value_changed_in_place_after_its_tap_marks_the_batch_stale():
    collector = _Collector(_DeviceSums())
    x = torch.randn(4, 5)
    collector.tap(point(), x)
    x.relu_()
    collector.flush_activations()
    assert collector.stale
    sums = _DeviceSums()
    immediate = _Collector(sums, exact=True)
    y = torch.randn(4, 5)
    immediate.tap(point(), y)
    before = _activation_row(y, point()).tolist()
    y.relu_()
    row = immediate.activation_rows(sums.fetch())[0]
    assert not immediate.stale and [row[f] for f in _ACT_FIELDS] == before


def test_gradient_calls_for_one_point_add_up_to_the_full_gradient():
    sums = _DeviceSums()
    collector = _Collector(sums)
    x = torch.randn(3, 4, requires_grad=True)
    y = x * 1.0
    collector.tap(point(), y)
    (y.sum() * 2 + (y * y).sum()).backward()
    collector.flush_gradients()
    rows = collector.gradient_rows(sums.fetch())
    full = 2 + 2 * x.detach()
    assert list(rows) == [0]
    want = _gradient_row(full).tolist()
    assert all(math.isclose(rows[0][f], w, rel_tol=1e-6) for f, w in zip(("norm", "rms"), want))
    assert math.isclose(rows[0]["norm"], float(full.norm()), rel_tol=1e-6)


def reference_param(w: torch.Tensor, g: torch.Tensor | None, owner: ProbePoint | None) -> list:
    w = w.double()
    g = torch.zeros_like(w) if g is None else g.double()
    n = max(w.numel(), 1)
    wn, gn = w.norm(), g.norm()
    spread = math.nan
    if owner is not None and w.dim() >= 2 and w.shape[0] >= 2:
        u = g.reshape(w.shape[0], -1)
        spread = float((u - u[:1]).abs().max() / u.abs().max().clamp_min(1e-30))
    return [float(w.mean()), float(w.std(correction=0)), float(w.abs().max()), 0.0, float(gn),
            float(gn / math.sqrt(n)), float(gn / wn), float((g == 0).double().mean()), 0.0,
            spread, float((w == w.reshape(-1)[0]).all())]


def test_parameter_rows_match_the_definitions_to_float32_rounding():
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(16, 8, 3, 3, generator=gen) * 0.1, torch.randn(10, 32, generator=gen),
               torch.randn(32, generator=gen) + 5.0, torch.full((4, 4), 0.25),
               torch.randn(600, 500, generator=gen) * 0.02 + 0.1]  # several scratch blocks
    grads = [torch.randn(w.shape, generator=gen) * 1e-3 for w in weights]
    grads[1][:, 0] = 0.0
    grads[3] = torch.ones(4, 4)  # every unit gets the same update: spread 0
    owners = [point(), point(), None, point(), point()]
    for w, g, o in zip(weights, grads, owners, strict=True):
        got = dict(zip(_PARAM_FIELDS, _param_row(w, g, o).tolist(), strict=True))
        scale = float(w.double().abs().mean())  # the mean: see the activations' test
        rel = 2e-6 if w.numel() < 100_000 else 2e-5  # see the activations' test
        for field, want in zip(_PARAM_FIELDS, reference_param(w, g, o), strict=True):
            if math.isnan(want):
                assert math.isnan(got[field]), field
            else:
                tol = rel / 2 * scale if field == "mean" else 1e-12
                assert math.isclose(got[field], want, rel_tol=rel, abs_tol=tol), \
                    (field, got[field], want)


def test_the_fast_path_reports_no_nonfinite_entries_only_when_there_are_none():
    x = torch.randn(4, 6)
    fast = dict(zip(_ACT_FIELDS, _activation_row(x, point(), exact=False).tolist(), strict=True))
    assert fast["nonfinite"] == 0
    x[1, 1] = math.inf
    fast = dict(zip(_ACT_FIELDS, _activation_row(x, point(), exact=False).tolist(), strict=True))
    assert math.isnan(fast["nonfinite"])  # unknown: the probe measures the pass again, exactly
    w, g = torch.randn(3, 3), torch.randn(3, 3)
    assert _param_row(w, g, None, exact=False)[3] == 0
    g[0, 0] = math.nan
    assert math.isnan(_param_row(w, g, None, exact=False)[8])
    assert math.isnan(_gradient_row(g, exact=False)[2])


def test_exploding_but_finite_values_are_not_counted_as_nonfinite():
    # Squares of 1e25 overflow float32 (the variance and 2-norm read inf, as they always did);
    # the non-finite count comes from the extremes and stays 0, and an exact count agrees.
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3)) * 1e25
    fast = dict(zip(_ACT_FIELDS, _activation_row(x, point(), exact=False).tolist(), strict=True))
    assert fast["nonfinite"] == 0 and fast["max"] == float(x.max())
    assert _gradient_row(x, exact=True)[2] == 0
    assert _param_row(x, x, None, exact=True)[3] == 0
