"""`gradprobe.fix` and `gradprobe.check` on a live module.

`fix` is `gradprobe fix` without the file: the same plan (repair._Plan: which tensors, which
scheme, deliberate zeros and norm/embedding tensors left alone, at most MAX_ROUNDS rounds for
what a repair uncovers) or the same LSUV, written into the module's own tensors in place.
Nothing else of the module changes (flags, requires_grad, .grad, RNG: live.preserved_state).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from gradprobe.diagnostics.api import diagnose, merged_options
from gradprobe.diagnostics.errors import ConfigError, InitError
from gradprobe.diagnostics.live import preserved_state
from gradprobe.diagnostics.loaders.live_loader import load_live
from gradprobe.diagnostics.lsuv import LsuvLayer
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.repair import MAX_ROUNDS, ChangedTensor, _apply_lsuv, _Plan
from gradprobe.diagnostics.report import Finding, Report, Severity
from gradprobe.diagnostics.rule_runner import selected_rules


@dataclass
class FixResult:
    """What `gradprobe.fix` changed, and the model's report before and after."""

    method: Literal["auto", "lsuv"]
    before: Report
    after: Report
    changed: list[ChangedTensor]
    not_fixable: list[Finding]  # error/warning findings no re-initialisation addresses
    left_alone: list[str]  # tensors deliberately not touched, with why
    lsuv: list[LsuvLayer] = field(default_factory=list)


def fix_live(model: torch.nn.Module, report: Report | None = None, *,
             example_inputs: Any = None, init: Literal["auto", "lsuv"] = "auto",
             select: list[str] | None = None, ignore: list[str] | None = None,
             **option_fields: Any) -> FixResult:
    """Re-initialise the tensors of `model` that the findings flag, in place.

    `report`: a report of this model (from `gradprobe.diagnose`); without one the model is
    diagnosed first. The probe batch is `example_inputs` when given, else drawn with the input
    shapes the report recorded. `select`/`ignore`: which rules' findings to act on."""
    if report is not None and not isinstance(report, Report):
        report, example_inputs = None, report  # fix(model, batch)
    if init not in ("auto", "lsuv"):
        raise ConfigError(f"unknown fix method {init!r}: use auto or lsuv")
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"gradprobe.fix re-initialises an nn.Module in place, not a "
                          f"{type(model).__name__}")
    if select is not None:
        option_fields["select"] = select
    if ignore is not None:
        option_fields["ignore"] = ignore
    options = merged_options(None, option_fields)
    selected_rules(options)  # unknown rule names before any work
    if example_inputs is None and report is not None and options.input_shapes is None:
        options = options.model_copy(update={
            "input_shapes": [i.shape for i in report.model.inputs],
            "input_dtypes": [i.dtype for i in report.model.inputs]})
    before = _selected(report, options) if report is not None else \
        diagnose(model, example_inputs, options)

    with preserved_state(model):
        loaded = load_live(model, example_inputs, options)
        plan = _Plan(loaded)
        plan.protect(before)
        lsuv_layers: list[LsuvLayer] = []
        after = before
        if init == "lsuv":
            lsuv_layers = _apply_lsuv(loaded, options, plan, before, loaded.given_inputs)
            after = diagnose(model, example_inputs, options)
        else:
            for round_ in range(1, MAX_ROUNDS + 1):
                plan.protect(after)
                new = plan.from_findings(after, round_)
                if not new and round_ > 1:
                    break
                with torch.no_grad():
                    for name, value in plan.values(new, options.seed).items():
                        loaded.parameters[name].copy_(value)
                after = diagnose(model, example_inputs, options)
    return FixResult(init, before, after, list(plan.changed.values()), plan.not_fixable,
                     plan.left_alone, lsuv_layers)


def _selected(report: Report, options: DiagnoseOptions) -> Report:
    names = {rule.name for rule in selected_rules(options)}
    return report.model_copy(update={"findings": [f for f in report.findings if f.rule in names]})


def check(model: Any, batch: Any = None, fail_on: Severity | str = "error",
          **option_fields: Any) -> Report:
    """Diagnose `model` on `batch`; raise InitError (report attached) when a finding reaches
    `fail_on` ('error', 'warning', 'info'). Returns the report otherwise."""
    try:
        level = Severity(fail_on)
    except ValueError:
        raise ConfigError(f"fail_on must be error, warning or info, not {fail_on!r}") from None
    report = diagnose(model, batch, **option_fields)
    if report.fails(level):
        raise init_error(report, level)
    return report


def init_error(report: Report, level: Severity, context: str = "") -> InitError:
    """The InitError for the findings of `report` at `level` or worse, the first three named."""
    found = [f for f in report.findings if f.severity.rank >= level.rank]
    listed = "; ".join(f"{f.rule} at {f.layer}: {f.message}" for f in found[:3])
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    return InitError(f"{context}{len(found)} finding(s) at {level.value} or worse: {listed}{more}",
                     report)
