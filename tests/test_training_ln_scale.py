"""Behind LayerNorm, one block initialised far above the others is a defect: backed by training.

In a pre-LN residual stack (x + fc2(gelu(fc1(norm(x)))), as in ViT, DeiT and MLP-Mixer) the norm
in front of each branch restores the forward pass whatever one block's weights are, so nothing
downstream looks distorted. But a block at 10x He std adds a branch output ~100x the residual
stream's and its weights, like a too-large weight behind BatchNorm, barely move. init-scale
compares such a layer with the same layer in the other blocks (weight and output variance).

Each stack (six blocks at std 0.02, as timm initialises its ViTs; one block's two layers drawn
at 10x He std, or left alone) trains on the random-teacher task of test_training_labels with
AdamW (what transformers are trained with) and with SGD: how far the planted block's weights move
(relative to their start) and the held-out loss. The block barely moves under either; the loss
ends worse under AdamW and level under SGD, where the other blocks make up for it: the verdict
is a warning (a block that does not learn), not an error.
"""

from __future__ import annotations

import math
import pytest
import torch
from stage_training import Run, train_stage
from test_training_labels import Teacher
from torch import nn
from zoo import export_torchscript

from gradprobe.diagnostics.api import diagnose
from gradprobe.diagnostics.options import DiagnoseOptions

pytestmark = pytest.mark.training

FEATURES, WIDTH, HIDDEN, OUTPUTS = 32, 64, 256, 4
DEPTH, PLANTED = 6, 1
STEPS, BATCH = 300, 64
OPTIMIZERS = {"adamw": 1e-3, "sgd": 0.05}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.fc1, self.fc2 = nn.Linear(WIDTH, HIDDEN), nn.Linear(HIDDEN, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class PreLNStack(nn.Module):
    def __init__(self, planted: bool, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Linear(FEATURES, WIDTH)
        self.blocks = nn.Sequential(*[Block() for _ in range(DEPTH)])
        self.norm, self.head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, OUTPUTS)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        if planted:
            with torch.no_grad():
                for m in self.stage():
                    m.weight.normal_(0.0, 10.0 * math.sqrt(2.0 / m.in_features))

    def stage(self) -> list[nn.Linear]:
        return [self.blocks[PLANTED].fc1, self.blocks[PLANTED].fc2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x))))


def train(model: PreLNStack, teacher: Teacher, optimizer_name: str) -> Run:
    lr = OPTIMIZERS[optimizer_name]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr) if optimizer_name == "adamw" \
        else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return train_stage(model, teacher, [m.weight for m in model.stage()], optimizer,
                       steps=STEPS, batch=BATCH, features=FEATURES)


@pytest.fixture(scope="module")
def runs() -> dict[tuple[str, bool], Run]:
    torch.set_num_threads(1)
    teacher = Teacher(FEATURES, OUTPUTS)
    return {(opt, planted): train(PreLNStack(planted), teacher, opt)
            for opt in OPTIMIZERS for planted in (False, True)}


def lint(model: nn.Module, tmp_path) -> list[str]:
    path = export_torchscript(model, (torch.randn(8, FEATURES),), tmp_path / "m.pt")
    report = diagnose(str(path), DiagnoseOptions(input_shapes=[[8, FEATURES]]))
    return [f"{f.rule}:{f.layer}" for f in report.findings if f.severity.value != "info"]


def test_the_healthy_pre_ln_stack_is_clean(tmp_path):
    assert lint(PreLNStack(planted=False), tmp_path) == []


def test_a_block_far_above_its_peers_behind_layernorm_is_flagged_with_the_peers_init(tmp_path):
    assert lint(PreLNStack(planted=True), tmp_path) == [
        f"init-scale:blocks.{PLANTED}.fc1", f"init-scale:blocks.{PLANTED}.fc2"]
    path = export_torchscript(PreLNStack(planted=True), (torch.randn(8, FEATURES),),
                              tmp_path / "p.pt")
    report = diagnose(str(path), DiagnoseOptions(input_shapes=[[8, FEATURES]]))
    fix = next(f.fix for f in report.findings if f.rule == "init-scale")
    assert fix.init == "normal" and fix.std == pytest.approx(0.02, rel=0.15)


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_a_block_far_above_its_peers_behind_layernorm_barely_learns(runs, optimizer_name):
    healthy, planted = runs[(optimizer_name, False)], runs[(optimizer_name, True)]
    # Measured (300 steps): the planted block moves 0.051x as far as in its twin under AdamW
    # (0.019 vs 0.375) and 0.005x under SGD (0.00097 vs 0.195): it stays the random block it
    # started as, and its output, ~100x the stream's, stays in the stream.
    assert planted.stage_movement <= healthy.stage_movement / 10
    if optimizer_name == "adamw":
        # Measured: held-out loss 0.1222 vs 0.1156 (+6%; +3% over 600 steps, two seeds).
        assert planted.loss > healthy.loss
    else:
        # Measured: level with the twin (0.1187 vs 0.1189): the other blocks make up for it.
        assert planted.loss >= healthy.loss * 0.99
