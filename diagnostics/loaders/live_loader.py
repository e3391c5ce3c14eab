"""A live model as a `LoadedModel`: an `nn.Module`, a ScriptModule or an ExportedProgram.

Why tracing: `torch.jit.trace` of the live module, in memory, gives a ScriptModule whose
parameters and buffers are the module's own tensors (no copy, on the module's device), and the
TorchScript loader's passes and points then name layers by module path exactly as they do for
the same module saved with `torch.jit.save` — one probe-point discovery for both doors instead
of a second one written over forward hooks. The trace runs in eval mode under `no_grad`, so it
writes nothing to the module; the caller (live.py) restores the flags the loader switches.
An ExportedProgram is turned back into a module (`ExportedProgram.module()`, its own tensors)
and traced the same way on its recorded example inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gradprobe.diagnostics.errors import GradprobeError, InputSpecError, ModelLoadError
from gradprobe.diagnostics.graph import InputSpec
from gradprobe.diagnostics.inputs import synthetic_inputs
from gradprobe.diagnostics.loaders.torchscript_loader import TorchScriptModel
from gradprobe.diagnostics.options import DiagnoseOptions

ACCEPTED = ("a model file path or bytes, an nn.Module with example inputs, a "
            "torch.jit.ScriptModule or a torch.export.ExportedProgram")


class LiveModel(TorchScriptModel):
    """A traced live module probed through the TorchScript machinery. `given_inputs` holds the
    caller's example inputs on the model's device (None: a synthetic batch is to be drawn)."""

    given_inputs: list[torch.Tensor] | None = None
    # True when gradprobe made the module (from a .pt2 file) and may move it; a user's module
    # is probed where it lives and never moved.
    owned: bool = False

    def to(self, device: torch.device) -> LiveModel:
        if self.owned:
            super().to(device)
        elif torch.device(device) != self.device:
            raise GradprobeError(f"a live model is probed where it lives ({self.device}); move "
                                 f"it to {device} yourself to probe it there")
        return self

    def save(self, path: Path, values: Mapping[str, torch.Tensor]) -> None:
        raise GradprobeError("a live model is not written to a file: gradprobe.fix(model) "
                             "re-initialises it in place")


def load_live(obj: Any, example_inputs: Any, options: DiagnoseOptions,
              fmt: str = "pytorch") -> LiveModel:
    """Trace `obj` (see the module docstring) and return it ready to probe. Switches the module
    to eval mode and its parameters to requires_grad; the caller restores both."""
    if isinstance(obj, torch.export.ExportedProgram):
        from gradprobe.diagnostics.loaders.export_loader import exported_module

        module, recorded = exported_module(obj)
        return load_live(module, example_inputs if example_inputs is not None else recorded,
                         options, fmt="pt2")
    if isinstance(obj, torch.jit.ScriptModule):
        model = LiveModel.from_module(obj, None)
        model.format = fmt  # type: ignore[assignment]
        if example_inputs is not None:
            args, kwargs = _split(example_inputs)
            model.given_inputs = _on_device([*args, *kwargs.values()], model.device)
        elif options.input_shapes is None:
            raise InputSpecError("a ScriptModule records no input shapes: pass example inputs "
                                 "or input_shapes")
        return model
    if not isinstance(obj, torch.nn.Module):
        raise ModelLoadError(f"gradprobe.diagnose takes {ACCEPTED}, not {type(obj).__name__}")
    args, kwargs = _example(obj, example_inputs, options)
    obj.eval()  # BatchNorm must not update its running statistics while traced
    traced = _trace(obj, args, kwargs)
    model = LiveModel.from_module(traced, None)
    model.format = fmt  # type: ignore[assignment]
    model.given_inputs = [*args, *kwargs.values()] if example_inputs is not None else None
    return model


def _example(module: torch.nn.Module, example_inputs: Any,
             options: DiagnoseOptions) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    device = _device_of(module)
    if example_inputs is None:
        if options.input_shapes is None:
            raise InputSpecError(
                f"{type(module).__name__} is an nn.Module: pass example inputs (a tensor, a "
                "tuple of tensors or a dict of keyword inputs), e.g. "
                "gradprobe.diagnose(model, torch.randn(8, 3, 224, 224)), or input_shapes")
        specs = [InputSpec(f"input{i}", None, None) for i in range(len(options.input_shapes))]
        tensors, _ = synthetic_inputs(specs, options, device)
        return tuple(tensors), {}
    args, kwargs = _split(example_inputs)
    return (tuple(_on_device(list(args), device)),
            dict(zip(kwargs, _on_device(list(kwargs.values()), device), strict=True)))


def _split(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A tensor, a tuple/list of tensors, a dict of keyword inputs, or torch.export's
    (args, kwargs) pair."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2
            and isinstance(example_inputs[0], tuple) and isinstance(example_inputs[1], Mapping)):
        return example_inputs[0], dict(example_inputs[1])
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, (str, bytes)):
        return tuple(example_inputs), {}
    raise InputSpecError("example_inputs must be a tensor, a tuple of tensors or a dict of "
                         f"keyword inputs, not {type(example_inputs).__name__}")


def _on_device(values: list[Any], device: torch.device) -> list[torch.Tensor]:
    for i, value in enumerate(values):
        if not isinstance(value, torch.Tensor):
            raise InputSpecError(f"example input {i} is a {type(value).__name__}, not a tensor")
    return [v.to(device) for v in values]


def _device_of(module: torch.nn.Module) -> torch.device:
    for t in [*module.parameters(), *module.buffers()]:
        return t.device
    return torch.device("cpu")


def _trace(module: torch.nn.Module, args: tuple[torch.Tensor, ...],
           kwargs: dict[str, torch.Tensor]) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # trace is deprecated in torch 2.14; still exact
            if kwargs:
                return torch.jit.trace(module, example_kwarg_inputs=kwargs, check_trace=False,
                                       strict=False)
            return torch.jit.trace(module, args, check_trace=False, strict=False)
    except GradprobeError:
        raise
    except Exception as exc:  # tracing raises RuntimeError/TypeError/ValueError with long texts
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"{type(module).__name__} could not be run on the example inputs "
                             f"to read its graph: {first}") from None
