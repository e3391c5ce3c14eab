"""The framework integrations on real tiny runs: a healthy model trains, a planted defect stops
the run before its first step with the finding."""

from __future__ import annotations

import pytest
import torch
from defects import DEFECTS
from torch import nn

import gradprobe

pytestmark = pytest.mark.slow  # each starts a real Trainer


def _data(x: torch.Tensor, classes: int = 10) -> torch.utils.data.TensorDataset:
    x = torch.cat([x, x])  # 16 samples: two batches of 8
    y = torch.randint(0, classes, (len(x),), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.TensorDataset(x, y)


# -- Lightning --------------------------------------------------------------------------------

def _lightning_module(net: nn.Module):
    import lightning.pytorch as pl

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Classifier()


def _lightning_fit(defect: str, tmp_path, **callback):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from gradprobe.integrations.lightning import GradprobeCallback

    net, (x,) = DEFECTS[defect]()
    module = _lightning_module(net)
    gate = GradprobeCallback(**callback)
    trainer = pl.Trainer(max_steps=2, callbacks=[gate], logger=CSVLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    loader = torch.utils.data.DataLoader(_data(x), batch_size=8)
    return trainer, gate, module, loader


def test_lightning_healthy_model_trains_and_logs_the_verdict(tmp_path):
    trainer, gate, module, loader = _lightning_fit("healthy_mlp", tmp_path)
    trainer.fit(module, loader)
    assert trainer.global_step == 2 and gate.report.summary.error == 0
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "gradprobe/error" in logged and "gradprobe/layer/net.net.0/activation_std" in logged


def test_lightning_planted_defect_stops_before_the_first_step(tmp_path, capsys):
    trainer, gate, module, loader = _lightning_fit("zero_hidden", tmp_path)
    before = module.net.net[2].weight.detach().clone()
    with pytest.raises(gradprobe.InitError, match="zero-weights at net.net.2"):
        trainer.fit(module, loader)
    assert trainer.global_step == 0 and torch.equal(module.net.net[2].weight, before)
    assert "zero-weights" in capsys.readouterr().out

    trainer, gate, module, loader = _lightning_fit("zero_hidden", tmp_path, raise_on_fail=False)
    trainer.fit(module, loader)  # stopped through trainer.should_stop instead
    assert trainer.global_step == 0 and gate.report.summary.error >= 1


# -- Hugging Face Trainer -----------------------------------------------------------------------

def _bert(defect: bool):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(config)
    if defect:
        with torch.no_grad():
            model.bert.encoder.layer[1].intermediate.dense.weight[3, 5] = float("nan")
    return model


def _hf_trainer(defect: bool, tmp_path, **callback):
    from transformers import Trainer, TrainingArguments

    from gradprobe.integrations.transformers import GradprobeCallback

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 100, (12,), generator=g),
             "attention_mask": torch.ones(12, dtype=torch.long), "labels": i % 3}
            for i in range(16)]
    gate = GradprobeCallback(**callback)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                             disable_tqdm=True)
    return Trainer(model=_bert(defect), args=args, train_dataset=rows, callbacks=[gate]), gate


def test_transformers_healthy_model_trains(tmp_path):
    trainer, gate = _hf_trainer(False, tmp_path)
    trainer.train()
    assert trainer.state.global_step == 2 and gate.report.summary.error == 0
    assert any("gradprobe/error" in row for row in trainer.state.log_history)


def test_transformers_planted_defect_stops_the_run(tmp_path):
    trainer, gate = _hf_trainer(True, tmp_path)
    with pytest.raises(gradprobe.InitError, match="bert.encoder.layer.1.intermediate.dense"):
        trainer.train()
    assert trainer.state.global_step == 0
