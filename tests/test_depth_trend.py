"""The depth trend behind vanishing-gradients and exploding-gradients, on per-layer values.

The rules' end-to-end behaviour is tested on real models (test_rules, test_signal_reach, the
library slice in test_library_models: Swin v2 at 64 px and WavLM are the two that broke the
plain fit); these pin the two parts of the fit that decide those cases.
"""

from __future__ import annotations

import math

import pytest

from gradprobe.diagnostics.rules.depth_trend import fit, layer_kind, without_spikes


def kinds_fit(names: list[str], values: list[float]):
    # fit() only hands the layers back; names stand in for them
    return fit(names, values, [layer_kind(n) for n in names])  # type: ignore[arg-type]


def decades(total: float) -> float:
    return math.log10(total)


def bert_like(blocks: int, per_block: float) -> tuple[list[str], list[float]]:
    """query/key ~2.5e-4 (softmax's Jacobian), value ~3e-2, FFN ~6e-2, times `per_block`
    for each block going forwards."""
    level = {"query": 2.4e-4, "key": 3.2e-4, "value": 3e-2, "intermediate": 5.7e-2}
    names, values = [], []
    for b in range(blocks):
        for kind, v in level.items():
            names.append(f"encoder.layer.{b}.{kind}")
            values.append(v * per_block**b)
    return names, values


def test_a_block_pattern_is_not_a_drift_but_a_drift_across_blocks_is():
    names, values = bert_like(2, 1.0)
    plain = fit(names, values)  # type: ignore[arg-type]
    assert plain is not None and decades(plain.total) > 1.4  # the pattern read as x32
    assert kinds_fit(names, values).total == pytest.approx(1.0)
    # Each block passes on a tenth: the same kind of layer one block later is 10x smaller.
    names, values = bert_like(6, 0.1)
    trend = kinds_fit(names, values)
    assert trend.per_layer ** 4 == pytest.approx(0.1)  # four layers per block
    assert decades(trend.total) == pytest.approx(-23 / 4)


def test_a_gate_with_its_own_level_at_the_end_is_not_an_explosion():
    # WavLM: five feature-extractor convs, then each block's gate on the position bias,
    # ~1e-5 of the convs' gradient: one line through all of them reads x1.5e4.
    names = [f"feature_extractor.conv_layers.{i}.conv" for i in range(1, 6)]
    names += [f"encoder.layers.{i}.attention.gru_rel_pos_linear" for i in range(2)]
    values = [0.238, 0.358, 0.547, 0.84, 1.35, 2.68e-5, 3.13e-5]
    assert 1 / fit(names, values).total > 1e4  # type: ignore[arg-type,union-attr]
    assert 1 / kinds_fit(names, values).total == pytest.approx(0.08, rel=0.2)


def test_without_repeated_kinds_the_plain_fit_is_used():
    names = ["stem", "body", "head"]
    values = [1.0, 0.1, 0.01]
    assert kinds_fit(names, values).total == pytest.approx(0.01)
    assert layer_kind("layer3.1.conv2") == layer_kind("layer1.0.conv1") == "layer#.#.conv#"


def test_a_spike_that_does_not_propagate_is_left_out():
    # Swin v2 at 64 px: qkv's gradient on zero-padded rows, between two ordinary layers.
    names = [f"l{i}" for i in range(7)]
    values = [0.3, 0.25, 3e10, 0.1, 2e10, 0.05, 0.04]
    kept, kept_values = without_spikes(names, values)  # type: ignore[arg-type]
    assert kept == ["l0", "l1", "l3", "l5", "l6"]
    assert kept_values == [0.3, 0.25, 0.1, 0.05, 0.04]


@pytest.mark.parametrize("values", [
    [1.0, 10.0, 1e2, 1e3, 1e4, 1e5],  # a steep ramp: every layer passes it on
    [1.0, 1.0, 1e4, 1e4, 1e4],  # a step: what is behind it keeps it
    [1e9, 1.0, 1.0, 1.0, 1e-9],  # the ends have one neighbour each
    [1.0, float("nan"), 1e-5, 1.0, 1.0],  # beside a NaN nothing is judged
], ids=["ramp", "step", "ends", "nan"])
def test_what_propagates_is_kept(values):
    names = [f"l{i}" for i in range(len(values))]
    kept, _ = without_spikes(names, values)  # type: ignore[arg-type]
    assert kept == names


def test_a_step_where_the_resolution_changes_is_not_a_drift_inside_a_stage():
    # timm's EdgeNeXt: flat within each stage, ~35x per stage going forwards (its strided conv
    # shrinks the residual stream, the LayerNorms reading it hand back 1/scale in the gradient).
    names, values, resolutions = [], [], []
    for stage, (blocks, level) in enumerate([(3, 2.7e-8), (3, 4.5e-7), (9, 6.6e-6), (3, 1.3e-4)]):
        for b in range(blocks):
            names.append(f"stages.{stage}.blocks.{b}.mlp.fc2")
            values.append(level)
            resolutions.append(str(512 // 4**stage))
    assert decades(kinds_fit(names, values).total) > 3  # one slope across the steps
    assert fit(names, values, resolutions).total == pytest.approx(1.0)  # type: ignore[arg-type]
    # A drift inside each stage is one all the same: 10x per layer going forwards.
    ramp = [v * 10**b for v, b in zip(values, [0, 1, 2, 0, 1, 2, *range(9), 0, 1, 2], strict=True)]
    assert fit(names, ramp, resolutions).per_layer == pytest.approx(10.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(("batch", "on_axis"), [(2, ["4", "6"]), (8, ["0", "4", "6"])])
def test_the_gradient_axis_starts_behind_batch_norms_over_too_few_samples(tmp_path, batch, on_axis):
    """A BatchNorm over fewer than 8 samples passes on no gradient a trend can read (timm's
    efficientvit_b3 and gc_efficientnetv2_rw_t "explode" at batch 2, whatever the image size,
    and are flat from batch 4): the gradient trend is measured behind the last one."""
    import torch
    import zoo
    from torch import nn

    from gradprobe.diagnostics.loaders import load_model
    from gradprobe.diagnostics.probe import probe
    from gradprobe.diagnostics.rules.depth_trend import depth_layers

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(batch, 3, 8, 8)
    model = load_model(zoo.export_torchscript(net, (x,), tmp_path / "net.pt"))
    axis = depth_layers(probe(model, [x]), "gradient")
    assert [lp.point.layer for lp in axis] == on_axis
