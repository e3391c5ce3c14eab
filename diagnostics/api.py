"""`diagnose()`: the whole engine behind one call — load, probe, rules, report."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from gradprobe.diagnostics.errors import (
    ConfigError,
    GradprobeError,
    Hint,
    InputSpecError,
    ProbeError,
)
from gradprobe.diagnostics.graph import InputSpec, LoadedModel
from gradprobe.diagnostics.inputs import file_inputs, synthetic_inputs
from gradprobe.diagnostics.loaders import load_model
from gradprobe.diagnostics.memory_estimate import check_probe_fits
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.probe import ProbeResult, probe
from gradprobe.diagnostics.report import InputInfo, LayerReport, ModelInfo, Report, Summary, Timing
from gradprobe.diagnostics.rule_runner import run_rules, selected_rules
from gradprobe.diagnostics.synthetic_images import NOTE as IMAGE_NOTE
from gradprobe.diagnostics.synthetic_images import looks_like_images

Progress = Callable[[str, float], None]
VERSION = "0.1.0"


def pick_device(requested: str) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        raise ConfigError("device cuda was asked for but no CUDA device is available on this "
                          "machine", hint=Hint("device", "cpu"))
    return torch.device("cpu")


def _sha256(source: Path | bytes) -> tuple[str, int]:
    h = hashlib.sha256()
    if isinstance(source, bytes):
        h.update(source)
        return h.hexdigest(), len(source)
    size = 0
    with source.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def diagnose(
    source: str | Path | bytes | Any,
    example_inputs: Any = None,
    options: DiagnoseOptions | None = None,
    *,
    progress: Progress | None = None,
    path_label: str | None = None,
    self_contained: bool = False,
    **option_fields: Any,
) -> Report:
    """Probe one model and return its report.

    `source` is a model file (path or bytes: ONNX, TorchScript, torch.export `.pt2`) or a live
    model: an `nn.Module` with `example_inputs` (a tensor, a tuple, or a dict of keyword
    inputs), a `torch.jit.ScriptModule` or a `torch.export.ExportedProgram`. A live model is
    left exactly as it was. Options come as a `DiagnoseOptions` (the second positional argument
    is taken as one, as before) or as its fields by keyword (`seed=1, select=[...]`).
    `self_contained` refuses model files that read other files (ONNX external data): what a
    server wants of an upload.

    Raises a `GradprobeError` subclass for anything wrong with the input."""
    if isinstance(example_inputs, DiagnoseOptions) and options is None:
        options, example_inputs = example_inputs, None
    options = merged_options(options, option_fields)
    if not isinstance(source, (str, Path, bytes)):
        from gradprobe.diagnostics.live import diagnose_live

        return diagnose_live(source, example_inputs, options, progress=progress)
    if example_inputs is not None:
        raise InputSpecError("example_inputs are for live models; for a model file, give real "
                             "data as DiagnoseOptions(input_file=...)")
    notify = progress or (lambda stage, fraction: None)
    src: Path | bytes = Path(source) if isinstance(source, str) else source
    rules = selected_rules(options)  # config errors before any work
    device = pick_device(options.device)
    start = time.perf_counter()

    notify("load", 0.0)
    model = load_model(src, options.format, name=path_label or "", self_contained=self_contained)
    sha, size = _sha256(src)
    model.to(device)
    torch.manual_seed(options.seed)
    input_notes: list[str] = []
    if options.input_file:
        inputs, input_infos = file_inputs(model.inputs, Path(options.input_file), device,
                                          input_notes)
    else:
        inputs, input_infos = synthetic_inputs(model.inputs, options, device)
    model.notes[:0] = input_notes  # casts of the caller's data, first
    notify("load", 1.0)
    label = path_label if path_label is not None else (str(src) if isinstance(src, Path) else None)
    return probe_and_report(model, inputs, input_infos, options, rules, notify=notify,
                            identity=(label, sha, size), start=start)


def probe_and_report(model: LoadedModel, inputs: list[torch.Tensor], input_infos: list[InputInfo],
                     options: DiagnoseOptions, rules: list, *, notify: Progress,
                     identity: tuple[str | None, str, int], start: float) -> Report:
    """Probe a loaded model on its inputs, run the rules and build the report (the stages
    every door shares once a model is loaded). `identity` is (label, sha256, size in bytes)."""
    label, sha, size = identity
    device = model.device
    check_probe_fits(model, inputs, device)  # refuse now what certainly cannot run
    loaded = time.perf_counter()
    notify("probe", 0.0)
    result = _probe(model, inputs, options.seed, input_infos)
    model.notes[:0] = _small_batch_notes(input_infos)
    probed = time.perf_counter()
    notify("probe", 1.0)

    notify("rules", 0.0)
    findings = run_rules(result, rules)
    done = time.perf_counter()
    notify("rules", 1.0)

    summary = Summary()
    for f in findings:
        setattr(summary, f.severity.value, getattr(summary, f.severity.value) + 1)
    return Report(
        version=VERSION,
        model=ModelInfo(path=label, format=model.format, sha256=sha, size_bytes=size,
                        inputs=input_infos,
                        notes=_notes(model.notes, result, input_infos, model),
                        shared_parameters=model.shared_parameters),
        device=str(device), seed=options.seed, findings=findings,
        layers=[LayerReport(name=lp.point.layer, op=lp.point.op, node=lp.point.node,
                            role=lp.point.role, nonlinearity=lp.point.nonlinearity,
                            parameters=list(lp.point.parameters), activation=lp.activation,
                            gradient=lp.gradient) for lp in result.layers],
        parameters=[p.stats for p in result.params.values()],
        timing=Timing(load_s=loaded - start, probe_s=probed - loaded, rules_s=done - probed,
                      total_s=done - start),
        summary=summary,
    )


def merged_options(options: DiagnoseOptions | None, fields: dict[str, Any]) -> DiagnoseOptions:
    """`options` with `fields` (DiagnoseOptions field names) laid over it; a bad name or value
    is a ConfigError naming it."""
    base = options or DiagnoseOptions()
    if not fields:
        return base
    try:
        return DiagnoseOptions.model_validate({**base.model_dump(exclude_unset=True), **fields})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}"
                             for e in exc.errors())
        raise ConfigError(f"bad diagnose option: {problems}") from None


def _probe(model: LoadedModel, inputs: list[torch.Tensor], seed: int,
           infos: list[InputInfo]) -> ProbeResult:
    """Run the probe; a failure inside the graph names the inputs it was given, since a shape or
    dtype the graph cannot take is by far the most common cause."""
    given = ", ".join(f"{i.name} {'x'.join(map(str, i.shape))} {i.dtype}" for i in infos)
    try:
        return probe(model, inputs, seed)
    except ProbeError as exc:
        raise _explain(exc.problem, model, infos, given) from None
    except GradprobeError:
        raise
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _explain(f"the model failed on the probe batch: {first}", model, infos,
                       given) from None


# What torch says when the inputs do not fit (its own words, in its error texts).
_DTYPE_CLUES = re.compile(r"dtype|scalar type|Input type \(|should be the same|HalfTensor|"
                          r"BFloat16|expected .*Float|Long and Float|Float and Long|Half and "
                          r"Float|Float and Half", re.IGNORECASE)
_SHAPE_CLUES = re.compile(r"shape|size of tensor|must match the size|invalid for input of size|"
                          r"expected input\[|Expected .*input|dimension|cannot be multiplied",
                          re.IGNORECASE)
_NO_DERIVATIVE = re.compile(r"derivative for (\S+) is not implemented")
# A size the export fixed from its example input's values: a trace unrolls a list whose length
# came from the data (TorchScript's ListUnpack), an ONNX Split keeps the sizes it saw (ours).
_FROZEN_SIZE = re.compile(r"Expected (\d+) elements in a list but found (\d+)|"
                          r"fixed them for the input it was exported with")


def _explain(text: str, model: LoadedModel, infos: list[InputInfo],
             given: str) -> GradprobeError:
    """The failure as one line that says what the model expected: a dtype or shape the graph
    could not take becomes an InputSpecError naming the inputs; an operator without a backward
    (a file traced under torch.no_grad()) says how to re-export."""
    missing = _NO_DERIVATIVE.search(text)
    if missing:
        return ProbeError(
            f"the model cannot be differentiated: {missing.group(1)} has no backward. A model "
            f"traced or scripted under torch.no_grad() or torch.inference_mode() records "
            f"inference-only kernels (nn.MultiheadAttention's fast path): re-trace it with "
            f"gradients enabled and the module in train() mode, then save it again")
    frozen = _FROZEN_SIZE.search(text)
    if frozen:
        what = (f"a list the export unrolled for {frozen.group(1)} elements has "
                f"{frozen.group(2)}" if frozen.group(1) else _short(text))
        return InputSpecError(
            f"the graph fixes sizes from the values of the input it was exported with (a trace "
            f"freezes data-dependent sizes, such as a mixture-of-experts' tokens per expert) and "
            f"the probe batch ({given}) gives other sizes: {what}. Lint it with the input it "
            f"was exported with",
            hint=Hint("input_file"))
    if _DTYPE_CLUES.search(text):
        weights = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters.values()
                          if p.dtype.is_floating_point})
        expected = [weights[0] if i.dtype.startswith(("float", "bfloat")) and len(weights) == 1
                    else i.dtype for i in infos]
        return InputSpecError(
            f"the model rejected the dtype of its inputs ({given}); its weights are "
            f"{'/'.join(weights) or 'not floating point'}: {_short(text)}",
            hint=Hint("input_dtypes", expected))
    if _SHAPE_CLUES.search(text):
        declared = ", ".join(
            f"{spec.name} {'x'.join('?' if d is None else str(d) for d in spec.shape)}"
            for spec in model.inputs if spec.shape is not None)
        expectation = f"; the file declares {declared}" if declared else ""
        if declared and _fits_declaration(model.inputs, infos):
            # nothing about the shape was ours to choose wrongly: the legacy exporter writes
            # cohere2's interleaved rotary embedding as a graph that fails at every batch size
            # (onnxruntime too)
            expectation += (", and the probe batch fits that: the graph fails at its own shape "
                            "(a broken export, or free axes that need particular sizes)")
        return InputSpecError(
            f"the model rejected the shape of its inputs ({given}){expectation}: {_short(text)}",
            hint=Hint("input_shapes"))
    return ProbeError(f"{text} (probe batch: {given})")


def _fits_declaration(specs: list[InputSpec], infos: list[InputInfo]) -> bool:
    """Every input has the rank the file declares and every fixed size it declares."""
    if len(specs) != len(infos) or any(spec.shape is None for spec in specs):
        return False
    return all(len(spec.shape) == len(info.shape)
               and all(d is None or isinstance(d, str) or d == n
                       for d, n in zip(spec.shape, info.shape, strict=True))
               for spec, info in zip(specs, infos, strict=True))


def _short(text: str) -> str:
    return text if len(text) <= 240 else text[:237] + "..."


# Below this many samples, "zero for every sample" (dead units) and batch statistics say little.
SMALL_BATCH = 4


def _small_batch_notes(infos: list[InputInfo]) -> list[str]:
    """A file exported with a fixed batch of 1 (torch.onnx.export's default without
    dynamic_shapes) is probed with that batch: say what it costs, once."""
    small = [i for i in infos if i.source == "declared" and len(i.shape) > 1
             and i.shape[0] < SMALL_BATCH]
    if not small:
        return []
    batch = small[0].shape[0]
    return [f"the file fixes the batch size at {batch} (input '{small[0].name}'): per-unit "
            f"statistics over {batch} sample(s) are weak evidence (a unit silent on one sample "
            f"is not dead); re-export with a dynamic batch axis (dynamic_shapes, or dynamic_axes "
            f"for the legacy exporter) so the probe can use {SMALL_BATCH * 2} or more"]


def _notes(model_notes: list[str], result: ProbeResult, infos: list[InputInfo],
           model: LoadedModel) -> list[str]:
    notes = list(model_notes)
    images = [i.name for i in infos if i.source in ("declared", "flag", "default")
              and i.dtype.startswith(("float", "bfloat"))
              and looks_like_images(i.shape)]
    if images:
        notes.append(f"{', '.join(images)}: {IMAGE_NOTE}")
    if result.unblocked:
        # By the layer the user knows, not an exporter's tensor name (onnx::Conv_199).
        owner = {p.weight: p.layer for p in model.probe_points if p.weight}
        named = [f"{owner[name]}.weight" if name in owner and not name.startswith(owner[name])
                 else name for name in result.unblocked]
        notes.append(
            f"gradient flow measured with {len(named)} zero-initialised tensor(s) set to "
            f"their textbook init, as after the first step: {', '.join(named[:5])}"
            + (" ..." if len(named) > 5 else ""))
    return notes
