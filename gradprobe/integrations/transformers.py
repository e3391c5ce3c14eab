"""`GradprobeCallback` for the Hugging Face `Trainer`: gradprobe's verdict before training.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[GradprobeCallback()])

At `on_train_begin` the model is diagnosed on the first batch of the train dataloader (its
label keys dropped; the model is left exactly as it was), the report is printed and its counts
go to the Trainer's log (`trainer.state.log_history`, and every reporting integration). A
verdict at `fail_on` or worse stops the run: with InitError (`raise_on_fail=True`, the default:
no step is taken) or with `control.should_training_stop` (the Trainer checks that flag after a
step, so one step runs). `fail_on="never"` only warns.
"""

from __future__ import annotations

import warnings
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

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


class GradprobeCallback(CallbackSettings, TrainerCallback):
    """`input_fn(batch)` picks the forward's keyword inputs from a batch (default: the batch
    without its label keys). Further keywords are diagnose options. The report is kept as
    `.report`."""

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> TrainerControl:
        from gradprobe.diagnostics.api import diagnose

        if model is None or train_dataloader is None:
            raise ConfigError("GradprobeCallback needs the Trainer's model and train dataloader")
        batch = next(iter(train_dataloader))
        self.report = report = diagnose(model, model_inputs(batch, self.input_fn),
                                        **self.options)
        if self.print_report and state.is_world_process_zero:
            print(report_text(report, self.fail_on))
        state.log_history.append({**summary_metrics(report), **layer_metrics(report),
                                  "step": state.global_step})
        if failing(report, self.fail_on):
            control.should_training_stop = True
            if self.raise_on_fail:
                raise init_error(report, self.fail_on)
        elif report.findings:
            warnings.warn(f"gradprobe: {len(report.findings)} finding(s) below fail_on="
                          f"{self.fail_on}: " + "; ".join(f"{f.rule} at {f.layer}"
                                                           for f in report.findings[:5]),
                          stacklevel=2)
        return control
