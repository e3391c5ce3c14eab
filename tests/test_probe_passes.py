"""What each probe pass measures, and that the cheaper passes measure the same numbers.

Behind a blocking zero (a zero head) the first pass backpropagates only to the unblocked and
constant weights and the flow pass measures gradients only; the weights are measured once,
before the passes; the unit spread only for constant weights (the only ones it judges)."""

from __future__ import annotations

import math

import pytest
import torch
import zoo
from torch import nn

from gradprobe.diagnostics import probe as probe_module
from gradprobe.diagnostics.loaders import load_model
from gradprobe.diagnostics.probe import _measure_weights, _one_pass, _PassPlan, _weight_owners

GRAD_FIELDS = ("grad_norm", "grad_rms", "grad_to_weight", "zero_grad_fraction", "nonfinite_grad")


def _mlp(zero_head: bool) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(),
                        nn.Linear(16, 4))
    with torch.no_grad():
        net[2].weight.fill_(0.05)  # constant: judged by its unit spread
        if zero_head:
            net[4].weight.zero_()
    return net


@pytest.fixture(params=["onnx", "torchscript"])
def fmt(request: pytest.FixtureRequest) -> str:
    return request.param


def _loaded(tmp_path, fmt: str, zero_head: bool):  # noqa: ANN001, ANN202
    net, x = _mlp(zero_head), torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    if fmt == "onnx":
        path = zoo.export_onnx(net, (x,), tmp_path / "mlp.onnx")
    else:
        path = tmp_path / "mlp.pt"
        torch.jit.save(torch.jit.trace(net, (x,)), str(path))
    return load_model(path, fmt), [x]


def _full_pass(model, inputs):  # noqa: ANN001, ANN202
    """Everything measured, every gradient backpropagated: what every pass did before."""
    owners = _weight_owners(model)
    weights, _ = _measure_weights(list(model.parameters.values()))
    return _one_pass(model, inputs, 0, owners, weights, _PassPlan(spread_of=frozenset(owners)))


def test_behind_a_zero_head_the_first_pass_gives_the_unblocked_gradients_unchanged(tmp_path, fmt):
    model, inputs = _loaded(tmp_path, fmt, zero_head=True)
    full = _full_pass(model, inputs)  # the head at zero: as initialised
    result = probe_module.probe(model, inputs, 0)
    head = result.unblocked
    assert len(head) == 1
    stats = result.params[head[0]].stats
    for field in GRAD_FIELDS:
        assert getattr(stats, field) == pytest.approx(full.params[head[0]][field], rel=1e-6)
    assert stats.grad_norm > 0 and not result.params[head[0]].unused
    # The layers behind the zero head: their activations as initialised, their gradients from
    # the flow pass (non-zero: the head no longer blocks them).
    for lp in result.layers:
        want = full.activations.get(lp.point.index)
        if want is not None:
            assert lp.activation.mean == pytest.approx(want["mean"], rel=1e-6, abs=1e-9)
            assert lp.activation.var == pytest.approx(want["var"], rel=1e-6, abs=1e-12)
    hidden = [p for name, p in result.params.items()
              if name not in head and p.stats.shape == [16, 6]]
    assert hidden and all(p.stats.grad_norm > 0 for p in hidden)


def test_unit_spread_is_measured_for_constant_weights_only(tmp_path, fmt):
    model, inputs = _loaded(tmp_path, fmt, zero_head=False)
    full = _full_pass(model, inputs)
    result = probe_module.probe(model, inputs, 0)
    constant = [n for n, p in result.params.items() if p.stats.constant and len(p.stats.shape) == 2]
    assert len(constant) == 1
    for name, param in result.params.items():
        if name in constant:
            assert param.unit_spread == pytest.approx(full.params[name]["unit_spread"], abs=1e-12)
        else:
            assert param.unit_spread is None
        for field in GRAD_FIELDS:  # one pass here: every gradient as a full pass measures it
            assert getattr(param.stats, field) == pytest.approx(full.params[name][field],
                                                                rel=1e-6, abs=1e-12)
        assert math.isclose(param.stats.mean, full.params[name]["mean"], rel_tol=1e-6,
                            abs_tol=1e-9)
