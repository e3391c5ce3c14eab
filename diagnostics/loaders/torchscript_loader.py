"""Load a TorchScript archive (`torch.jit.save` of a scripted or traced module) for probing.

The module's forward graph is copied, inlined and rewritten (torchscript_passes), the values
to measure are chosen (torchscript_points) and returned as an extra tuple output; the graph
becomes a function that is called with the module itself as `self`, so the parameters it reads
are the module's own and backward fills their `.grad`.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from gradprobe.diagnostics.errors import InputSpecError, ModelLoadError, ProbeError
from gradprobe.diagnostics.graph import InputSpec, LoadedModel, ProbePoint, Tap
from gradprobe.diagnostics.loaders.torchscript_passes import (
    prepare_forward_graph,
    retarget_device_constants,
    return_observed_values,
)
from gradprobe.diagnostics.loaders.torchscript_points import (
    discover_points,
    gate_graph,
    integer_input_ranges,
)
from gradprobe.diagnostics.op_allowlist import check_torchscript_archive, check_torchscript_module
from gradprobe.diagnostics.selection_gates import GateGraph

_FUNCTION_NAME = "gradprobe_observed_forward"


def load_torchscript(source: Path | str | bytes, *, name: str | None = None) -> TorchScriptModel:
    """Load a TorchScript archive from a path or from its bytes. `name` labels the source in
    error messages when it is given as bytes. Raises ModelLoadError for anything that is not
    a loadable TorchScript archive."""
    label = name or (str(source) if not isinstance(source, bytes) else "model bytes")
    module = _read_module(source, label)
    return TorchScriptModel.from_module(module, None if isinstance(source, bytes) else str(source))


def _read_module(source: Path | str | bytes, label: str) -> torch.jit.ScriptModule:
    if not isinstance(source, bytes):
        source = Path(source)
        if not source.is_file():
            what = "is a directory" if source.is_dir() else "does not exist"
            raise ModelLoadError(f"{label}: {what}; expected a TorchScript file (.pt)")
    _check_archive(source, label)
    check_torchscript_archive(source, label)  # loading runs __setstate__: refuse it first
    try:
        target = io.BytesIO(source) if isinstance(source, bytes) else str(source)
        module = torch.jit.load(target, map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError/ValueError with multi-line texts
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"{label}: not a loadable TorchScript archive: {first_line}") from exc
    check_torchscript_module(module, label)  # untrusted code: nothing runs before this
    if not isinstance(module, torch.jit.ScriptModule) or not module._c._has_method("forward"):
        raise ModelLoadError(f"{label}: the TorchScript archive has no forward method")
    if not module._c.hasattr("training"):  # torch.jit.freeze drops attributes and parameters
        raise ModelLoadError(
            f"{label} is a frozen TorchScript module (torch.jit.freeze): its weights are "
            "constants in the code, not parameters; save the module before freezing it")
    return module


def _check_archive(source: Path | bytes, label: str) -> None:
    """Say what the file is when it is not a TorchScript archive, without unpickling it."""
    if isinstance(source, bytes):
        head = source[:4]
    else:
        with source.open("rb") as file:
            head = file.read(4)
    if not head.startswith(b"PK"):
        data = source if isinstance(source, bytes) else source.read_bytes()
        raise ModelLoadError(f"{label}: {_describe_non_zip(data)}, not a TorchScript archive")
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"{label}: truncated or corrupt zip archive ({exc})") from exc
    if not any("/code/" in n for n in names) or not any(n.endswith("constants.pkl") for n in names):
        if any(n.endswith("data.pkl") for n in names):
            raise ModelLoadError(
                f"{label} is a PyTorch state_dict/pickle saved with torch.save, not a TorchScript "
                "module: export it with torch.jit.script or torch.jit.trace and torch.jit.save")
        raise ModelLoadError(f"{label}: a zip archive without TorchScript code, not a TorchScript "
                             "module")


def _describe_non_zip(data: bytes) -> str:
    if not data:
        return "empty file"
    if data[:1] == b"\x80":
        return "a legacy PyTorch pickle (torch.save), to be exported with torch.jit.script/trace"
    if _looks_like_onnx(data):
        return "an ONNX model (lint it as .onnx)"
    try:
        data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return "an unrecognised binary file"
    return "a text file"


def _looks_like_onnx(data: bytes) -> bool:
    import onnx  # only needed to name the mistake

    try:
        model = onnx.ModelProto.FromString(data)
    except Exception:  # any parse failure means: not ONNX
        return False
    return model.ir_version > 0 and len(model.graph.node) > 0


class TorchScriptModel(LoadedModel):
    """A TorchScript module with its forward rewritten to return the probed values too."""

    def __init__(self, module: torch.jit.ScriptModule, path: str | None, *,
                 graph: torch._C.Graph, inputs: list[InputSpec], defaults: list[Any],
                 discovery_points: list[ProbePoint], notes: list[str], frozen: list[str],
                 training_flags: dict[str, bool]):
        super().__init__(format="torchscript", path=path, parameters=_parameters(module),
                         inputs=inputs, probe_points=discovery_points, notes=notes)
        self.module = module
        self._observed_points = list(discovery_points)  # aligned with the graph's extra output
        self._graph = graph
        self._function = torch._C._create_function_from_graph(_FUNCTION_NAME, graph)
        self._defaults = defaults
        self._frozen = frozen
        self._training_flags = training_flags

    @classmethod
    def from_module(cls, module: torch.jit.ScriptModule, path: str | None) -> TorchScriptModel:
        training_flags = {name: m.training for name, m in module.named_modules()}
        frozen = _make_trainable(module)
        module.eval()  # folds `self.training` to False: dropout off, no buffer updates
        graph = prepare_forward_graph(module)
        discovery = discover_points(graph, module)
        return_observed_values(graph, discovery.values)
        graph.lint()
        inputs, defaults = _input_specs(module, graph)
        notes = list(discovery.notes)
        if frozen:
            notes.append(f"{len(frozen)} parameters saved with requires_grad=False are probed "
                         "as trainable")
        model = cls(module, path, graph=graph, inputs=inputs, defaults=defaults,
                    discovery_points=discovery.points, notes=notes, frozen=frozen,
                    training_flags=training_flags)
        model.shared_parameters = _shared_parameters(discovery.points)
        return model

    def run(self, inputs: Sequence[torch.Tensor], tap: Tap | None = None) -> list[torch.Tensor]:
        required, optional = len(self.inputs), len(self._defaults)
        if not required <= len(inputs) <= required + optional:
            names = ", ".join(spec.name for spec in self.inputs)
            raise InputSpecError(f"the model takes {required} inputs ({names}), got {len(inputs)}")
        arguments = [*inputs, *self._defaults[len(inputs) - required:]]
        try:
            # the plain interpreter: no profiling runs, no fusion, eager autograd on every value
            with torch.jit.optimized_execution(False):
                output, observed = self._function(self.module._c, *arguments)
        except torch.jit.Error as exc:  # a `raise` in the model's code: its text is the model's
            raise ProbeError(f"forward failed: the model's code raised {_raised_class(exc)} "
                             "(its message is not shown: it comes from the model file)") \
                from None
        except RuntimeError as exc:  # TorchScript puts its own traceback before the cause
            lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
            raise ProbeError(f"forward failed: {lines[-1] if lines else type(exc).__name__}") \
                from exc
        executed = []
        for point, value in zip(self._observed_points, observed, strict=True):
            if value is None:  # computed in an `if` branch that did not run
                continue
            executed.append(point)
            if tap is not None:
                tap(point, value)
        self._drop_points_not_run(executed)
        return _flatten_tensors(output)

    def selection_gate(self, name: str) -> str | None:
        return self._gate_graph.gate(name)

    def bound_of(self, name: str) -> str | None:
        return self._gate_graph.bound_of(name)

    def fill_of(self, name: str) -> str | None:
        return self._gate_graph.fill_of(name)

    @cached_property
    def _gate_graph(self) -> GateGraph:
        original_output = self._graph.return_node().inputsAt(0).node().inputsAt(0)
        arguments = self.module.forward.schema.arguments[1:]
        integer = {spec.name for spec in self.inputs
                   if spec.dtype is not None and not spec.dtype.is_floating_point}
        positions = [i for i, a in enumerate(arguments) if a.name in integer]
        return gate_graph(self._graph, self.module, positions, original_output)

    def _drop_points_not_run(self, executed: list[ProbePoint]) -> None:
        """Scripted code keeps both sides of data-dependent branches (nn.MultiheadAttention
        has a packed and an unpacked input projection); the side the probe batch did not take
        has nothing to report, so its points leave `probe_points` after the first run."""
        if len(executed) == len(self.probe_points):
            return
        skipped = len(self.probe_points) - len(executed)
        self.probe_points = [p for p in self.probe_points if p in executed]
        self.notes.append(f"{skipped} layers in branches of the TorchScript code that the probe "
                          "batch did not take are not reported")

    def to(self, device: torch.device) -> TorchScriptModel:
        device = torch.device(device)
        self.module.to(device)
        retarget_device_constants(self._graph, device)
        self._function = torch._C._create_function_from_graph(_FUNCTION_NAME, self._graph)
        self.parameters = _parameters(self.module)
        return self

    def save(self, path: Path, values: Mapping[str, torch.Tensor]) -> None:
        unknown = sorted(set(values) - set(self.parameters))
        if unknown:
            raise KeyError(f"not parameters of this model: {', '.join(unknown)}")
        with torch.no_grad():
            for name, value in values.items():
                target = self.parameters[name]
                target.copy_(value.to(device=target.device, dtype=target.dtype))
        # write the module as it came: its requires_grad flags and train/eval modes
        for name in self._frozen:
            self.parameters[name].requires_grad_(False)
        modules = dict(self.module.named_modules())
        for name, flag in self._training_flags.items():
            modules[name].training = flag
        try:
            torch.jit.save(self.module, str(path))
        finally:
            for name in self._frozen:
                self.parameters[name].requires_grad_(True)
            self.module.eval()


def _raised_class(exc: BaseException) -> str:
    """`builtins.ValueError` from the last line of a TorchScript exception, if it reads as a
    class name; the rest of that line is the model's own text."""
    lines = str(exc).strip().splitlines()
    name = lines[-1].split(":", 1)[0].strip() if lines else ""
    return name if re.fullmatch(r"[A-Za-z_][\w.]{0,63}", name) else "an exception"


def _shared_parameters(points: list[ProbePoint]) -> dict[str, list[str]]:
    """Weights read by more than one layer: tied embeddings, a module applied twice."""
    users: dict[str, list[str]] = {}
    for point in points:
        if point.role == "linear" and point.weight:
            users.setdefault(point.weight, []).append(point.layer)
    return {name: layers for name, layers in users.items() if len(layers) > 1}


def _make_trainable(module: torch.jit.ScriptModule) -> list[str]:
    """Give every parameter requires_grad=True; returns the names that had it off."""
    frozen = []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            frozen.append(name)
            parameter.requires_grad_(True)
    return frozen


def _parameters(module: torch.jit.ScriptModule) -> dict[str, torch.nn.Parameter]:
    # These are the very tensors the graph reads through `self` (a fresh nn.Parameter
    # wrapper would be a different tensor that the graph never sees and backward never fills).
    return dict(module.named_parameters())  # type: ignore[arg-type]


def _input_specs(module: torch.jit.ScriptModule,
                 graph: torch._C.Graph) -> tuple[list[InputSpec], list[Any]]:
    """Inputs the caller must give (TorchScript records no shapes) and the defaults of the
    optional ones, which run() fills in."""
    arguments = module.forward.schema.arguments[1:]
    ranges = integer_input_ranges(graph, module)
    # A half-precision model takes half-precision inputs: float inputs get the one floating
    # dtype its weights share (None, i.e. float32, when they are float32 or mixed).
    weight_dtypes = {p.dtype for p in module.parameters() if p.dtype.is_floating_point}
    float_dtype = weight_dtypes.pop() if len(weight_dtypes) == 1 else None
    if float_dtype == torch.float32:
        float_dtype = None
    specs, defaults = [], []
    for position, argument in enumerate(arguments):
        if argument.has_default_value():
            defaults.append(argument.default_value)
            continue
        value_range = ranges.get(position)
        dtype = torch.int64 if value_range else float_dtype
        specs.append(InputSpec(argument.name, None, dtype, value_range))
    return specs, defaults


def _flatten_tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _flatten_tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _flatten_tensors(item)]
    return []
