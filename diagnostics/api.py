"""`diagnose()`: the whole engine behind one call — load, probe, rules, report."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from gradprobe.diagnostics.errors import (
    ConfigError,
    GradprobeError,
    InputSpecError,
    ProbeError,
)
from gradprobe.diagnostics.graph import LoadedModel
from gradprobe.diagnostics.inputs import file_inputs, synthetic_inputs
from gradprobe.diagnostics.loaders import load_model
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
        raise ConfigError("--device cuda: no CUDA device is available on this machine")
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
    if options.input_file:
        inputs, input_infos = file_inputs(model.inputs, Path(options.input_file), device)
    else:
        inputs, input_infos = synthetic_inputs(model.inputs, options, device)
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
    loaded = time.perf_counter()
    notify("probe", 0.0)
    result = _probe(model, inputs, options.seed, input_infos)
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
                        inputs=input_infos, notes=_notes(model.notes, result, input_infos),
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
        raise ProbeError(f"{exc} (probe batch: {given})") from None
    except GradprobeError:
        raise
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ProbeError(f"the model failed on the probe batch ({given}): {first}") from None


def _notes(model_notes: list[str], result: ProbeResult, infos: list[InputInfo]) -> list[str]:
    notes = list(model_notes)
    images = [i.name for i in infos if i.source in ("declared", "flag", "default")
              and i.dtype.startswith(("float", "bfloat"))
              and looks_like_images(i.shape)]
    if images:
        notes.append(f"{', '.join(images)}: {IMAGE_NOTE}")
    if result.unblocked:
        notes.append(
            f"gradient flow measured with {len(result.unblocked)} zero-initialised tensor(s) set to "
            f"their textbook init, as after the first step: {', '.join(result.unblocked[:5])}"
            + (" ..." if len(result.unblocked) > 5 else ""))
    return notes
