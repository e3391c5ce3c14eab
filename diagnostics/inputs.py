"""The probe batch: seeded synthetic inputs, or the user's real data from a file.

Float inputs are drawn from N(0, 1) because a network's first layer is meant to receive
normalised data; integer inputs are drawn inside the range the graph accepts (token ids below
the embedding table size), so the probe never indexes out of bounds.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gradprobe.diagnostics.errors import Hint, InputSpecError
from gradprobe.diagnostics.graph import InputSpec
from gradprobe.diagnostics.options import DTYPES as ACCEPTED_DTYPES
from gradprobe.diagnostics.options import DiagnoseOptions, parse_shape  # noqa: F401 (re-exported)
from gradprobe.diagnostics.report import InputInfo
from gradprobe.diagnostics.synthetic_images import image_batch, looks_like_images

# The names the options accept are torch's own dtype names: one list, in options.py.
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in ACCEPTED_DTYPES}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Without a declared range, integer inputs stay tiny: 0 and 1 are valid indices for any
# non-empty table and valid values for masks.
DEFAULT_INT_RANGE = (0, 2)


def _format_shape(shape: Sequence[int | str | None]) -> str:
    return "x".join("?" if d is None else str(d) for d in shape)


def _declares_own(spec: InputSpec) -> bool:
    """Every dimension fixed in the file, except perhaps the leading batch axis."""
    return spec.shape is not None and all(isinstance(d, int) and d > 0 for d in spec.shape[1:])


def resolve_shapes(specs: list[InputSpec], options: DiagnoseOptions) -> list[tuple[list[int], str]]:
    """The concrete shape of each input and where it came from ('flag', 'declared', 'default').

    With `fill_undeclared` (one shape given for a whole folder) an input whose
    file declares all its dimensions but perhaps the batch keeps its own shape."""
    given = options.input_shapes
    if given is not None and options.fill_undeclared and all(
            _declares_own(s) for s in specs):
        given = None
    if given is not None and len(given) != len(specs):
        names = ", ".join(s.name for s in specs)
        raise InputSpecError(
            f"the model has {len(specs)} input(s) ({names}) but {len(given)} input shape(s) "
            f"were given", hint=Hint("input_shapes", [_example_shape(s) for s in specs]))
    explicit_batch = "batch_size" in options.model_fields_set
    shapes: list[tuple[list[int], str]] = []
    for i, spec in enumerate(specs):
        if given is not None and not (options.fill_undeclared
                                      and _declares_own(spec)):
            shape = list(given[i])
            if spec.shape is not None:
                _check_against_declared(spec, shape, "the given shape")
            shapes.append((shape, "flag"))
            continue
        if spec.shape is None:
            raise InputSpecError(
                f"input '{spec.name}' has no declared shape (TorchScript files carry none)",
                hint=Hint("input_shapes", [_example_shape(s) for s in specs]))
        shape, source = [], "declared"
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and dim > 0:
                if (axis == 0 and explicit_batch and dim != options.batch_size
                        and not options.fill_undeclared):
                    raise InputSpecError(
                        f"input '{spec.name}' declares a fixed batch size of {dim} (shape "
                        f"{_format_shape(spec.shape)}) but batch size {options.batch_size} was "
                        f"asked for: the graph may depend on it (a Reshape to the batch size); "
                        f"re-export with a dynamic batch axis to probe another one",
                        hint=Hint("batch_size", dim))
                shape.append(dim)
            elif axis == 0:
                shape.append(options.batch_size)  # a symbolic leading dim is the batch
                source = "default"
            else:
                raise InputSpecError(
                    f"input '{spec.name}' has shape {_format_shape(spec.shape)} with a free "
                    f"dimension at axis {axis} ({dim or 'unknown'})",
                    hint=Hint("input_shapes", [_example_shape(s) for s in specs]))
        shapes.append((shape, source))
    return shapes


def _example_shape(spec: InputSpec) -> list[int]:
    if spec.shape is None:  # an image batch, or a batch of token ids
        return [8, 128] if spec.dtype is not None and not spec.dtype.is_floating_point \
            else [8, 3, 224, 224]
    return [d if isinstance(d, int) and d > 0 else (8 if axis == 0 else 16)
            for axis, d in enumerate(spec.shape)]


def _check_against_declared(spec: InputSpec, shape: list[int], what: str) -> None:
    """A fixed dimension the file declares (the batch axis too: a graph exported with a fixed
    batch often reshapes to it) must match what the user gives."""
    declared = spec.shape or ()
    if len(declared) != len(shape):
        raise InputSpecError(
            f"input '{spec.name}' has rank {len(declared)} (shape {_format_shape(declared)}) but "
            f"{what} {_format_shape(shape)} has rank {len(shape)}",
            hint=Hint("input_shapes") if what == "the given shape" else None)
    for axis, (want, got) in enumerate(zip(declared, shape)):
        if isinstance(want, int) and want > 0 and want != got:
            which = "declares a fixed batch size of" if axis == 0 else "needs size"
            where = "" if axis == 0 else f" at axis {axis}"
            raise InputSpecError(
                f"input '{spec.name}' {which} {want}{where} (shape "
                f"{_format_shape(declared)}) but {what} is {_format_shape(shape)}"
                + (": re-export with a dynamic batch axis to probe another batch size"
                   if axis == 0 else ""))


def _kind(dtype: torch.dtype | None) -> str:
    if dtype is None or dtype.is_floating_point:
        return "float"
    return "bool" if dtype == torch.bool else "int"


def resolve_dtypes(specs: list[InputSpec], options: DiagnoseOptions) -> list[torch.dtype]:
    """One dtype per input: given once for all inputs (only where the inputs are all of one
    kind: a float and an integer input cannot share one), once per input, or from the model."""
    given = options.input_dtypes
    if given and options.fill_undeclared and all(spec.dtype is not None for spec in specs):
        given = None
    if given and len(given) not in (1, len(specs)):
        raise InputSpecError(
            f"the model has {len(specs)} input(s) but {len(given)} input dtypes were "
            f"given: give one for all inputs or one per input",
            hint=Hint("input_dtypes", _dtype_example(specs)))
    if given and len(given) == 1 and len(specs) > 1:
        kinds = {_kind(spec.dtype) for spec in specs}
        if len(kinds) > 1:
            listing = ", ".join(f"{spec.name} {_dtype_name(spec.dtype)}" for spec in specs)
            raise InputSpecError(
                f"one input dtype ({given[0]}) was given but the model's inputs are of different "
                f"kinds ({listing}): give one dtype per input, in order",
                hint=Hint("input_dtypes", _dtype_example(specs)))
    out = []
    for i, spec in enumerate(specs):
        if given:
            out.append(DTYPES[given[0] if len(given) == 1 else given[i]])
        else:
            out.append(spec.dtype or torch.float32)
    return out


def _dtype_name(dtype: torch.dtype | None) -> str:
    return DTYPE_NAMES.get(dtype or torch.float32, str(dtype))


def _dtype_example(specs: list[InputSpec]) -> list[str]:
    return [_dtype_name(spec.dtype) for spec in specs]


def synthetic_inputs(
    specs: list[InputSpec], options: DiagnoseOptions, device: torch.device
) -> tuple[list[torch.Tensor], list[InputInfo]]:
    shapes = resolve_shapes(specs, options)
    dtypes = resolve_dtypes(specs, options)
    # Drawn on the CPU with a CPU generator so the batch is identical on every device.
    gen = torch.Generator().manual_seed(options.seed)
    tensors, infos = [], []
    for spec, (shape, source), dtype in zip(specs, shapes, dtypes):
        if dtype.is_floating_point and looks_like_images(shape):
            value = image_batch(shape, gen).to(dtype)
        elif dtype.is_floating_point:
            value = torch.randn(shape, generator=gen).to(dtype)
        elif dtype == torch.bool:
            value = torch.rand(shape, generator=gen) < 0.5
        else:
            low, high = spec.value_range or DEFAULT_INT_RANGE
            value = torch.randint(low, high, shape, generator=gen, dtype=dtype)
        tensors.append(value.to(device))
        infos.append(InputInfo(name=spec.name, shape=shape, dtype=DTYPE_NAMES.get(dtype, str(dtype)),
                               source=source))
    return tensors, infos


def file_inputs(
    specs: list[InputSpec], path: Path, device: torch.device, notes: list[str] | None = None
) -> tuple[list[torch.Tensor], list[InputInfo]]:
    """Real data: .npy (one input), .npz (by input name, else in order), .pt (a tensor, a
    sequence of tensors, or a dict by input name). Loaded without unpickling code. A float
    array of another precision is cast to the model's input dtype, with a line in `notes`."""
    arrays = _read_input_file(path)
    if isinstance(arrays, dict):
        if all(s.name in arrays for s in specs):
            ordered = [arrays[s.name] for s in specs]
        elif len(arrays) == len(specs):
            ordered = list(arrays.values())
        else:
            raise InputSpecError(
                f"{path.name} holds arrays {sorted(arrays)} but the model's inputs are "
                f"{[s.name for s in specs]}"
            )
    else:
        ordered = list(arrays)
    if len(ordered) != len(specs):
        raise InputSpecError(
            f"{path.name} holds {len(ordered)} array(s) but the model has {len(specs)} input(s)"
        )
    tensors, infos = [], []
    for spec, value in zip(specs, ordered):
        if spec.shape is not None:
            _check_against_declared(spec, list(value.shape), f"{path.name} holds")
        if spec.dtype is not None and spec.dtype.is_floating_point != value.dtype.is_floating_point:
            raise InputSpecError(
                f"input '{spec.name}' expects {_dtype_name(spec.dtype)} but "
                f"{path.name} holds {DTYPE_NAMES.get(value.dtype, value.dtype)}"
            )
        # numpy's default float64 (and any other float) becomes the float the model takes;
        # TorchScript declares none, so float32 unless the model's weights say otherwise.
        target = spec.dtype or (torch.float32 if value.dtype.is_floating_point else None)
        cast_from = None
        if target is not None and value.dtype != target:
            cast_from = DTYPE_NAMES.get(value.dtype, str(value.dtype))
            value = value.to(target)
        tensors.append(value.to(device))
        infos.append(InputInfo(name=spec.name, shape=list(value.shape),
                               dtype=DTYPE_NAMES.get(value.dtype, str(value.dtype)), source="file"))
        if cast_from is not None and notes is not None:
            notes.append(f"input '{spec.name}': {path.name} holds {cast_from}, cast to "
                         f"{DTYPE_NAMES.get(value.dtype, value.dtype)} (the model's input dtype)")
    return tensors, infos


def _read_input_file(path: Path) -> list[torch.Tensor] | dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputSpecError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return [torch.from_numpy(np.load(path, allow_pickle=False))]
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: torch.from_numpy(z[k]) for k in z.files}
        if suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise InputSpecError(f"input file {path.name}: use .npy, .npz or .pt")
    except (ValueError, OSError, RuntimeError, zipfile.BadZipFile, EOFError) as exc:
        raise InputSpecError(f"cannot read input file {path.name}: {exc}") from None
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in obj):
        return list(obj)
    if isinstance(obj, dict) and all(isinstance(t, torch.Tensor) for t in obj.values()):
        return dict(obj)
    raise InputSpecError(f"{path.name} must hold a tensor, a list of tensors or a dict of tensors")
