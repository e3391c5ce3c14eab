"""`GradprobeCallback` for Lightning: gradprobe's verdict before the first optimizer step.

    trainer = L.Trainer(callbacks=[GradprobeCallback(fail_on="error")])

At `on_fit_start` the LightningModule is diagnosed on the first batch of the train dataloader
(left exactly as it was), the report is printed, the counts and per-layer statistics go to
the trainer's loggers, and a verdict at `fail_on` or worse stops the run: with InitError
(`raise_on_fail=True`, the default) or with `trainer.should_stop` (the fit loop then ends
before its first step). `fail_on="never"` only warns.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl

from gradprobe.diagnostics.errors import ConfigError
from gradprobe.integrations._verdict import (
    CallbackSettings,
    failing,
    init_error,
    layer_metrics,
    model_inputs,
    report_text,
    summary_metrics,
)


class GradprobeCallback(CallbackSettings, pl.Callback):
    """`input_fn(batch)` picks the forward's inputs from a batch (default: `batch[0]` of a
    tuple, a dict without its label keys, or the batch). Further keywords are diagnose
    options (`select`, `ignore`, `thresholds`, `seed`, ...). The report is kept as `.report`."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from gradprobe.diagnostics.api import diagnose

        batch = next(iter(_train_dataloader(trainer)))
        self.report = report = diagnose(pl_module, model_inputs(batch, self.input_fn),
                                        **self.options)
        if self.print_report and trainer.is_global_zero:
            print(report_text(report, self.fail_on))
        metrics = {**summary_metrics(report), **layer_metrics(report)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)
        if failing(report, self.fail_on):
            if self.raise_on_fail:
                raise init_error(report, self.fail_on)
            trainer.should_stop = True
        elif report.findings:
            warnings.warn(f"gradprobe: {len(report.findings)} finding(s) below fail_on="
                          f"{self.fail_on}: " + "; ".join(f"{f.rule} at {f.layer}"
                                                           for f in report.findings[:5]),
                          stacklevel=2)


def _train_dataloader(trainer: pl.Trainer) -> Any:
    """The train dataloader as the fit loop will use it. At on_fit_start the loop has not
    loaded it yet, so it is asked from the same source the loop reads (datamodule, module or
    the dataloaders given to fit)."""
    source = trainer.fit_loop._data_source
    loader = source.dataloader()
    if loader is None:
        raise ConfigError("GradprobeCallback needs a train dataloader to take its first batch")
    return loader
