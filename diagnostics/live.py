"""Diagnose a model that lives in memory: an `nn.Module`, a `torch.jit.ScriptModule` or a
`torch.export.ExportedProgram`, where it lives (CPU or CUDA), without copying its weights.

The module is traced in memory (loaders/live_loader.py) and probed through the TorchScript
machinery, so layer names, probe points and findings are those of the same module saved as a
TorchScript file. The probe needs gradients and trainable flags; everything it touches on the
user's module is put back afterwards (`preserved_state`), bit for bit.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from gradprobe.diagnostics.api import Progress, probe_and_report
from gradprobe.diagnostics.errors import ConfigError
from gradprobe.diagnostics.inputs import DTYPE_NAMES, synthetic_inputs
from gradprobe.diagnostics.loaders.live_loader import LiveModel, load_live
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.report import InputInfo, Report
from gradprobe.diagnostics.rule_runner import selected_rules

EXAMPLE_NOTE = ("probed on the example inputs given by the caller (a real batch when it was one), "
                "not on a synthetic batch")


@contextmanager
def preserved_state(module: torch.nn.Module) -> Iterator[None]:
    """Everything a probe may change on a live module, restored on exit: train/eval flags,
    requires_grad, existing `.grad` tensors (the same objects), and the global RNG state of
    the CPU and of the module's CUDA device. Parameter values are restored by the probe
    itself; buffers are never written (BatchNorm runs on batch statistics without them)."""
    flags = [(m, m.training) for m in module.modules()]
    params = list(module.parameters())
    requires = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        try:
            yield
        finally:
            for m, flag in flags:
                m.training = flag
            for p, flag, grad in zip(params, requires, grads, strict=True):
                p.grad = grad
                p.requires_grad_(flag)


def diagnose_live(obj: Any, example_inputs: Any, options: DiagnoseOptions, *,
                  progress: Progress | None = None) -> Report:
    notify = progress or (lambda stage, fraction: None)
    rules = selected_rules(options)  # config errors before any work
    start = time.perf_counter()
    notify("load", 0.0)
    owner = _owner_module(obj)
    _check_device(owner, options)
    with preserved_state(owner):
        torch.manual_seed(options.seed)  # inside the fork: the caller's RNG is untouched
        model = load_live(obj, example_inputs, options)
        inputs, infos = _probe_inputs(model, options)
        notify("load", 1.0)
        report = probe_and_report(model, inputs, infos, options, rules, notify=notify,
                                  identity=(None, *_fingerprint(owner)), start=start)
    if model.given_inputs is not None:
        report.model.notes.append(EXAMPLE_NOTE)
    return report


def _check_device(module: torch.nn.Module, options: DiagnoseOptions) -> None:
    """A live model is probed where it lives; asking for another device is a mistake to name,
    not a reason to copy its weights."""
    lives = next((t.device for t in [*module.parameters(), *module.buffers()]),
                 torch.device("cpu"))
    if options.device != "auto" and options.device != lives.type:
        raise ConfigError(f"the model lives on {lives} and is probed there; move it with "
                          f"model.to('{options.device}') to probe it on {options.device}")


def _owner_module(obj: Any) -> torch.nn.Module:
    """The module whose state the probe could touch (an ExportedProgram's own is unaffected
    beyond what `preserved_state` restores on the module it makes)."""
    if isinstance(obj, torch.nn.Module):
        return obj
    return torch.nn.Module()


def _probe_inputs(model: LiveModel,
                  options: DiagnoseOptions) -> tuple[list[torch.Tensor], list[InputInfo]]:
    if model.given_inputs is None:
        return synthetic_inputs(model.inputs, options, model.device)
    infos = [InputInfo(name=spec.name, shape=list(t.shape),
                       dtype=DTYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch.")),
                       source="example")
             for spec, t in zip(model.inputs, model.given_inputs, strict=True)]
    return list(model.given_inputs), infos


def _fingerprint(module: torch.nn.Module) -> tuple[str, int]:
    """A live model has no file: the sha256 is taken over its structure (class, tensor names,
    shapes and dtypes, never the values, which would mean copying them off the device), the
    size is the bytes its parameters and buffers take."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    size = 0
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        h.update(f"\x1f{name}:{tuple(t.shape)}:{t.dtype}".encode())
        size += t.numel() * t.element_size()
    return h.hexdigest(), size
