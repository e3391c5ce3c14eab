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

from gradprobe.diagnostics.errors import InputSpecError
from gradprobe.diagnostics.graph import InputSpec
from gradprobe.diagnostics.options import DTYPES as ACCEPTED_DTYPES
from gradprobe.diagnostics.options import DiagnoseOptions
from gradprobe.diagnostics.report import InputInfo
from gradprobe.diagnostics.synthetic_images import image_batch, looks_like_images

# The names the options accept are torch's own dtype names: one list, in options.py.
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in ACCEPTED_DTYPES}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Without a declared range, integer inputs stay tiny: 0 and 1 are valid indices for any
# non-empty table and valid values for masks.
DEFAULT_INT_RANGE = (0, 2)


def parse_shape(text: str) -> list[int]:
    """'8x3x224x224' -> [8, 3, 224, 224]; also accepts commas."""
    parts = text.replace(",", "x").replace("X", "x").split("x")
    try:
        dims = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise InputSpecError(f"bad shape {text!r}: write dimensions as AxBxC, e.g. 8x3x224x224") from None
    if not dims or any(d <= 0 for d in dims):
        raise InputSpecError(f"bad shape {text!r}: every dimension must be a positive integer")
    return dims


def _format_shape(shape: Sequence[int | str | None]) -> str:
    return "x".join("?" if d is None else str(d) for d in shape)


def resolve_shapes(specs: list[InputSpec], options: DiagnoseOptions) -> list[tuple[list[int], str]]:
    """The concrete shape of each input and where it came from ('flag', 'declared', 'default')."""
    given = options.input_shapes
    if given is not None and len(given) != len(specs):
        names = ", ".join(s.name for s in specs)
        raise InputSpecError(
            f"the model has {len(specs)} input(s) ({names}) but {len(given)} --input-shape "
            f"value(s) were given: pass one per input, in order"
        )
    shapes: list[tuple[list[int], str]] = []
    for i, spec in enumerate(specs):
        if given is not None:
            shape = list(given[i])
            if spec.shape is not None:
                _check_against_declared(spec, shape)
            shapes.append((shape, "flag"))
            continue
        if spec.shape is None:
            raise InputSpecError(
                f"input '{spec.name}' has no declared shape (TorchScript files carry none): "
                f"pass --input-shape for each input, e.g. --input-shape 8x3x224x224"
            )
        shape, source = [], "declared"
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and dim > 0:
                shape.append(dim)
            elif axis == 0:
                shape.append(options.batch_size)  # a symbolic leading dim is the batch
                source = "default"
            else:
                raise InputSpecError(
                    f"input '{spec.name}' has shape {_format_shape(spec.shape)} with a free "
                    f"dimension at axis {axis} ({dim or 'unknown'}): pass --input-shape"
                )
        shapes.append((shape, source))
    return shapes


def _check_against_declared(spec: InputSpec, shape: list[int]) -> None:
    declared = spec.shape or ()
    if len(declared) != len(shape):
        raise InputSpecError(
            f"input '{spec.name}' has rank {len(declared)} (shape {_format_shape(declared)}) but "
            f"--input-shape {_format_shape(shape)} has rank {len(shape)}"
        )
    for axis, (want, got) in enumerate(zip(declared, shape)):
        if isinstance(want, int) and want > 0 and want != got and axis > 0:
            raise InputSpecError(
                f"input '{spec.name}' needs size {want} at axis {axis} (shape "
                f"{_format_shape(declared)}) but --input-shape gives {_format_shape(shape)}"
            )


def resolve_dtypes(specs: list[InputSpec], options: DiagnoseOptions) -> list[torch.dtype]:
    given = options.input_dtypes
    if given and len(given) not in (1, len(specs)):
        raise InputSpecError(
            f"the model has {len(specs)} input(s) but {len(given)} --input-dtype values were "
            f"given: pass one for all inputs or one per input"
        )
    out = []
    for i, spec in enumerate(specs):
        if given:
            out.append(DTYPES[given[0] if len(given) == 1 else given[i]])
        else:
            out.append(spec.dtype or torch.float32)
    return out


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
    specs: list[InputSpec], path: Path, device: torch.device
) -> tuple[list[torch.Tensor], list[InputInfo]]:
    """Real data: .npy (one input), .npz (by input name, else in order), .pt (a tensor, a
    sequence of tensors, or a dict by input name). Loaded without unpickling code."""
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
            _check_against_declared(spec, list(value.shape))
        if spec.dtype is not None and spec.dtype.is_floating_point != value.dtype.is_floating_point:
            raise InputSpecError(
                f"input '{spec.name}' expects {DTYPE_NAMES.get(spec.dtype, spec.dtype)} but "
                f"{path.name} holds {DTYPE_NAMES.get(value.dtype, value.dtype)}"
            )
        if spec.dtype is not None:
            value = value.to(spec.dtype)
        tensors.append(value.to(device))
        infos.append(InputInfo(name=spec.name, shape=list(value.shape),
                               dtype=DTYPE_NAMES.get(value.dtype, str(value.dtype)), source="file"))
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
