"""torch.export programs: an `ExportedProgram` in memory or its `.pt2` archive
(`torch.export.save`), the format PyTorch moves to as `torch.jit.trace/script` are deprecated.

The program is turned back into a module with its hierarchy (`torch.export.unflatten`, so that
layer names are module paths as in the exporting code) and probed as a live module
(live_loader). Input names, shapes and dtypes come from the example inputs the program records,
so no input shapes are needed. Every operator the graph calls is checked against the same
allowlist as TorchScript before anything runs: a program can carry custom operators.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import torch

from gradprobe.diagnostics.errors import ModelLoadError, UnsupportedOperator
from gradprobe.diagnostics.graph import InputSpec
from gradprobe.diagnostics.options import DiagnoseOptions


def is_pt2_archive(source: Path | bytes) -> bool:
    """A torch.export.save archive: a zip with an `archive_format` record (TorchScript
    archives have `code/` and `constants.pkl` instead)."""
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as zf:
            return any(n.endswith("/archive_format") or n == "archive_format"
                       for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_pt2(source: Path | bytes, name: str = "") -> torch.export.ExportedProgram:
    label = name or (str(source) if isinstance(source, Path) else "model bytes")
    try:
        program = torch.export.load(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Exception as exc:  # torch raises many kinds with multi-line texts
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"{label}: not a loadable torch.export archive: {first}") from None
    return program


def load_pt2(source: Path | bytes, options: DiagnoseOptions, name: str = ""):
    """A `.pt2` archive as a LoadedModel. Its inputs are declared with the shapes and dtypes of
    the example inputs the archive records, so the probe batch is drawn like a file's."""
    from gradprobe.diagnostics.loaders.live_loader import load_live

    program = read_pt2(source, name)
    module, recorded = exported_module(program)
    if recorded is None:
        label = name or (str(source) if isinstance(source, Path) else "the archive")
        raise ModelLoadError(f"{label} records no example inputs; save it from "
                             "torch.export.export(model, args) with torch 2.6 or later")
    model = load_live(module, recorded, options, fmt="pt2")
    model.owned = True
    model.path = str(source) if isinstance(source, Path) else None
    ranges = {spec.name: spec.value_range for spec in model.inputs}
    model.inputs = [InputSpec(spec.name, tuple(t.shape), t.dtype, ranges.get(spec.name))
                    for spec, t in zip(model.inputs, model.given_inputs or [], strict=True)]
    model.given_inputs = None
    return model


def exported_module(program: torch.export.ExportedProgram) -> tuple[torch.nn.Module, Any]:
    """(the program as a module with its hierarchy, its recorded example inputs or None)."""
    check_operators(program)
    try:
        module = torch.export.unflatten(program)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"the exported program cannot be rebuilt as a module: {first}") \
            from None
    return module, program.example_inputs


def check_operators(program: torch.export.ExportedProgram) -> None:
    """Refuse a program that calls an operator outside the allowlist, naming it."""
    from gradprobe.diagnostics.op_allowlist import is_allowed_torch_op

    for gm in [program.graph_module, *program.graph_module.modules()]:
        graph = getattr(gm, "graph", None)
        if graph is None:
            continue
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            name = _qualified_name(node.target)
            if name is not None and not is_allowed_torch_op(name):
                raise UnsupportedOperator(name, node.name, "not an operator gradprobe runs")


def _qualified_name(target: Any) -> str | None:
    """'aten::relu' for torch.ops.aten.relu.default; None for Python callables that are part
    of the program's structure (operator.getitem)."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name  # 'aten::relu'
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order::{target.name()}"
    return None
