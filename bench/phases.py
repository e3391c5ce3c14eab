"""What the overhead benchmark runs: the exported variants of a model and the measured phases.

A phase is one call that the harness times or measures the memory of:
- `plain`  — a plain forward+backward of the loaded model, exactly as the probe runs it (same
  interpreter, same BatchNorm mode, same cotangent), with no tap and no statistics: the baseline;
- `probe`  — `gradprobe.diagnostics.probe.probe()` on the same loaded model and batch;
- `module` — the original `nn.Module` forward+backward in train mode, for reference only.
The harness synchronises the device around a phase; the phases themselves never do.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gradprobe.diagnostics.graph import InputSpec, LoadedModel
from gradprobe.diagnostics.inputs import synthetic_inputs
from gradprobe.diagnostics.loaders import load_model
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.probe import probe

PHASES = ("module", "plain", "probe")
IMAGE_SHAPE = (3, 224, 224)


@dataclass(frozen=True)
class Variant:
    """One exported file of the benchmarked model."""

    key: str  # short id used on the command line: onnx-train, onnx-eval, torchscript
    format: str  # 'onnx' | 'torchscript'
    export: str  # how it was exported, for the table
    path: Path


VARIANTS = {
    "onnx-train": ("onnx", "legacy, BN training mode"),
    "onnx-eval": ("onnx", "legacy, eval, BN folded"),
    "torchscript": ("torchscript", "traced"),
}


def export_variant(module: nn.Module, key: str, directory: Path, batch: int) -> Variant:
    """Write `module` as the variant `key` would be written by a user, into `directory`."""
    fmt, export = VARIANTS[key]
    example = torch.randn(batch, *IMAGE_SHAPE)
    was_training = module.training
    module.eval()
    path = directory / (f"{key}.onnx" if fmt == "onnx" else f"{key}.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "onnx":
            train_bn = key == "onnx-train"
            mode = torch.onnx.TrainingMode.TRAINING if train_bn else torch.onnx.TrainingMode.EVAL
            torch.onnx.export(module, (example,), str(path), dynamo=False, training=mode,
                              do_constant_folding=not train_bn, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
        else:
            torch.jit.save(torch.jit.trace(module, (example,)), str(path))
    module.train(was_training)
    return Variant(key, fmt, export, path)


def probe_batch(batch: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """The batch `gradprobe lint --batch-size B` builds for an image input: seeded N(0, 1),
    drawn on the CPU and moved to `device`, so every variant and device sees the same numbers."""
    spec = InputSpec("input", (batch, *IMAGE_SHAPE), torch.float32)
    inputs, _ = synthetic_inputs([spec], DiagnoseOptions(batch_size=batch, seed=seed), device)
    return inputs


def load_variant(variant: Variant, device: torch.device) -> LoadedModel:
    return load_model(variant.path, variant.format).to(device)  # type: ignore[arg-type]


def _cotangents(outputs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    # The same draw as the probe's: CPU generator seeded seed+1, then moved to the device.
    gen = torch.Generator().manual_seed(seed + 1)
    return [torch.randn(o.shape, generator=gen).to(device=o.device, dtype=o.dtype) for o in outputs]


def plain_step(model: LoadedModel, inputs: list[torch.Tensor], seed: int = 0) -> None:
    """Forward+backward of the loaded model without taps or statistics: the probe's own work
    minus the measuring."""
    for p in model.parameters.values():
        p.grad = None
    outputs = [o for o in model.run(inputs) if o.is_floating_point() and o.requires_grad]
    torch.autograd.backward(outputs, _cotangents(outputs, seed))


def probe_step(model: LoadedModel, inputs: list[torch.Tensor], seed: int = 0) -> None:
    probe(model, inputs, seed)


def module_step(module: nn.Module, inputs: list[torch.Tensor], seed: int = 0) -> None:
    """The original module in train mode (BN on batch statistics, running stats updated)."""
    module.train()
    for p in module.parameters():
        p.grad = None
    outputs = [module(*inputs)]
    torch.autograd.backward(outputs, _cotangents(outputs, seed))


def phase_runner(phase: str, *, model: LoadedModel | None = None, module: nn.Module | None = None,
                 inputs: list[torch.Tensor], seed: int = 0) -> Callable[[], None]:
    """A zero-argument callable that runs one phase once."""
    if phase == "module":
        assert module is not None
        return lambda: module_step(module, inputs, seed)
    assert model is not None
    step = plain_step if phase == "plain" else probe_step
    return lambda: step(model, inputs, seed)


def drop_grads(model: LoadedModel | None, module: nn.Module | None) -> None:
    """Free the gradients a phase left, so the next measurement starts from the same state."""
    params = list(model.parameters.values()) if model is not None else []
    params += list(module.parameters()) if module is not None else []
    for p in params:
        p.grad = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
