"""Behind BatchNorm only a too-large weight is a defect: backed by training.

BatchNorm makes a layer's output independent of its weight's scale, so the scale only sets the
effective step: SGD moves w by ~lr*|g| with |g| ~ 1/|w|, a relative step ~1/|w|^2. A weight 10x
too large (in std) takes ~100x smaller relative steps and stays slow; one 10x too small takes
larger steps, its norm grows and the step shrinks back (Arora, Li & Lyu, ICLR 2019, "auto
rate-tuning"). So init-scale warns on the first and keeps quiet on the second — as it does on
torchvision's and timm's fan-out stems (~0.05x He in variance), which train fine.

Each variant of an eight-layer Linear -> BatchNorm -> ReLU stack (three consecutive layers, a
stage, scaled 10x or 0.1x in std) trains with SGD on the random-teacher task of
test_training_labels, beside its He-initialised twin: how far the stage's weights move
(relative to their start) and the held-out loss.
"""

from __future__ import annotations

import pytest
import torch
from stage_training import Run, train_stage
from test_training_labels import Teacher
from torch import nn
from zoo import export_torchscript

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions

pytestmark = pytest.mark.training

FEATURES, WIDTH, OUTPUTS = 32, 128, 4
STEPS, BATCH, LR = 300, 64, 0.05
WARNING_RATIO = 1.2  # test_training_labels' bar for a warning


DEPTH = 8
STAGE = (3, 4, 5)  # hidden layers scaled together: a stage


def bn_stack(stage_scale: float, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width_in = FEATURES
    for _ in range(DEPTH):
        layers += [nn.Linear(width_in, WIDTH, bias=False), nn.BatchNorm1d(WIDTH), nn.ReLU()]
        width_in = WIDTH
    layers.append(nn.Linear(WIDTH, OUTPUTS))
    model = nn.Sequential(*layers)
    for m in model:
        if isinstance(m, nn.Linear) and m.out_features == WIDTH:
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    with torch.no_grad():
        for i in STAGE:
            model[3 * i].weight.mul_(stage_scale)
    return model


def train(model: nn.Module, teacher: Teacher) -> Run:
    stage = [model[3 * i].weight for i in STAGE]
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    return train_stage(model, teacher, stage, optimizer, steps=STEPS, batch=BATCH,
                       features=FEATURES)


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    return Teacher(FEATURES, OUTPUTS)


@pytest.fixture(scope="module")
def runs(teacher: Teacher) -> dict[float, Run]:
    torch.set_num_threads(1)
    return {scale: train(bn_stack(scale), teacher) for scale in (1.0, 10.0, 0.1)}


def lint(model: nn.Module, tmp_path) -> list[str]:
    path = export_torchscript(model, (torch.randn(8, FEATURES),), tmp_path / "m.pt")
    report = diagnose(str(path), DiagnoseOptions(input_shapes=[[8, FEATURES]]))
    return [f"{f.rule}:{f.layer}" for f in report.findings if f.severity.value != "info"]


def test_a_too_large_stage_behind_batchnorm_is_stuck_and_flagged(runs, tmp_path):
    assert lint(bn_stack(10.0), tmp_path) == [f"init-scale:{3 * i}" for i in STAGE]
    healthy, large = runs[1.0], runs[10.0]
    # Measured: the stage moves ~0.02x as far as in the He twin (~50x slower) and the network
    # ends worse than both the twin and the too-small variant.
    assert large.stage_movement <= healthy.stage_movement / 10
    assert large.loss > healthy.loss and large.loss > runs[0.1].loss


def test_a_too_small_stage_behind_batchnorm_corrects_itself_and_is_not_flagged(runs, tmp_path):
    assert lint(bn_stack(0.1), tmp_path) == []
    healthy, small = runs[1.0], runs[0.1]
    # Measured: its weights move ~20x further (relative) than the twin's and it ends as well.
    assert small.stage_movement >= healthy.stage_movement
    assert small.loss / healthy.loss < WARNING_RATIO
