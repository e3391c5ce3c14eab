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
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from gradprobe.diagnostics.errors import ModelLoadError, UnsupportedOperator
from gradprobe.diagnostics.graph import InputSpec
from gradprobe.diagnostics.options import DiagnoseOptions

_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
# constants stored as pickles (torchbind script objects, opaque Python objects)
_PICKLED_CONSTANTS = ("custom_obj_", "opaque_obj_")


def read_pt2(source: Path | bytes, name: str = "") -> torch.export.ExportedProgram:
    """Load an archive without running code from it: archives carrying pickled objects
    (custom or opaque object constants) are refused from their zip directory, and every tensor
    is unpickled with torch.load's weights-only reader (torch.export.load would otherwise fall
    back to full unpickling when that reader refuses a file)."""
    label = name or (str(source) if isinstance(source, Path) else "model bytes")
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"{label}: truncated or corrupt zip archive ({exc})") from None
    objects = [n for n in names if "/constants/" in f"/{n}" and
               n.rpartition("/")[2].startswith(_PICKLED_CONSTANTS)]
    if objects:
        raise ModelLoadError(f"{label}: the archive carries pickled Python objects "
                             f"({objects[0].rpartition('/')[2]}); gradprobe loads tensors only")
    try:
        with _weights_only_loading():
            program = torch.export.load(
                io.BytesIO(source) if isinstance(source, bytes) else source)
    except Exception as exc:  # torch raises many kinds with multi-line texts
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"{label}: not a loadable torch.export archive: {first}") from None
    return program


@contextmanager
def _weights_only_loading() -> Iterator[None]:
    """torch.load reads this variable on every call and then refuses anything but tensors
    and plain containers, whatever weights_only its caller passed."""
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[_FORCE_WEIGHTS_ONLY]
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


def load_pt2(source: Path | bytes, name: str = ""):
    """A `.pt2` archive as a LoadedModel. Its inputs are declared with the shapes and dtypes of
    the example inputs the archive records, so the probe batch is drawn like a file's."""
    from gradprobe.diagnostics.loaders.live_loader import load_live

    program = read_pt2(source, name)
    module, recorded = exported_module(program)
    if recorded is None:
        label = name or (str(source) if isinstance(source, Path) else "the archive")
        raise ModelLoadError(f"{label} records no example inputs; save it from "
                             "torch.export.export(model, args) with torch 2.6 or later")
    model = load_live(module, recorded, DiagnoseOptions(), fmt="pt2")
    model.owned = True
    model.path = str(source) if isinstance(source, Path) else None
    # the names the exporting code gave its inputs (the rebuilt module takes *args)
    names = [*program.graph_signature.user_inputs, *(s.name for s in model.inputs)]
    model.inputs = [InputSpec(name, tuple(t.shape), t.dtype, spec.value_range)
                    for name, spec, t in zip(names, model.inputs, model.given_inputs or [])]
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
