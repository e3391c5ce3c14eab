"""What the framework callbacks share: the model's inputs in a training batch, the verdict,
and the numbers they log."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from gradprobe.diagnostics.errors import ConfigError, InitError
from gradprobe.diagnostics.report import Report, Severity

# Keys of a batch that are targets, not model inputs (Hugging Face and common datasets).
LABEL_KEYS = frozenset({"labels", "label", "label_ids", "target", "targets", "y"})
FAIL_LEVELS = ("error", "warning", "info", "never")
InputFn = Callable[[Any], Any]


def check_fail_on(fail_on: str) -> str:
    if fail_on not in FAIL_LEVELS:
        raise ConfigError(f"fail_on must be one of {', '.join(FAIL_LEVELS)}, not {fail_on!r}")
    return fail_on


class CallbackSettings:
    """What every framework callback is configured with; a callback class lists this first
    among its bases. Further keywords are diagnose options (`thresholds`, `seed`, ...); the
    report is kept as `.report`."""

    def __init__(self, fail_on: str = "error", *, select: list[str] | None = None,
                 ignore: list[str] | None = None, input_fn: InputFn | None = None,
                 raise_on_fail: bool = True, print_report: bool = True,
                 **options: Any) -> None:
        self.fail_on = check_fail_on(fail_on)
        self.options = {**options, **({"select": select} if select is not None else {}),
                        **({"ignore": ignore} if ignore is not None else {})}
        self.input_fn = input_fn
        self.raise_on_fail = raise_on_fail
        self.print_report = print_report
        self.report: Report | None = None


def model_inputs(batch: Any, input_fn: InputFn | None = None) -> Any:
    """The part of a training batch the model's forward takes: `input_fn(batch)` when given;
    else a dict without its label keys (keyword inputs), the first item of a tuple/list
    (`(x, y)`), or the batch itself."""
    if input_fn is not None:
        return input_fn(batch)
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items()
                if k not in LABEL_KEYS and isinstance(v, torch.Tensor)}
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    return batch


def failing(report: Report, fail_on: str) -> bool:
    return fail_on != "never" and report.fails(Severity(fail_on))


def init_error(report: Report, fail_on: str) -> InitError:
    from gradprobe.diagnostics.live_repair import init_error as build

    return build(report, Severity(fail_on), "gradprobe stopped the run before its first step: ")


def summary_metrics(report: Report) -> dict[str, float]:
    """Counts per severity and per rule: `gradprobe/error`, `gradprobe/rule/dead-relu`."""
    metrics = {f"gradprobe/{s.value}": 0.0 for s in Severity}
    for f in report.findings:
        metrics[f"gradprobe/{f.severity.value}"] += 1
        key = f"gradprobe/rule/{f.rule}"
        metrics[key] = metrics.get(key, 0.0) + 1
    return metrics


def layer_metrics(report: Report) -> dict[str, float]:
    """Per-layer statistics: activation std and gradient rms, keyed by layer name."""
    metrics: dict[str, float] = {}
    for layer in report.layers:
        name = _metric_name(layer.name)
        if layer.activation is not None:
            metrics[f"gradprobe/layer/{name}/activation_std"] = layer.activation.var ** 0.5
        if layer.gradient is not None:
            metrics[f"gradprobe/layer/{name}/gradient_rms"] = layer.gradient.rms
    return metrics


def _metric_name(layer: str) -> str:
    # loggers and MLflow accept letters, digits and _-./ ; '#' and ':' become '_'
    return re.sub(r"[^\w\-./ ]", "_", layer)


def report_text(report: Report, fail_on: str) -> str:
    from gradprobe.client.formats import render

    return render("text", [report], fail_on="error" if fail_on == "never" else fail_on)
