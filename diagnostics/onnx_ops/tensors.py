"""ONNX TensorProto -> torch tensor, and ONNX element types -> torch dtypes.

Tensors are decoded from their bytes directly (no detour through numpy arrays for the caller);
external data is read relative to the model's folder and must stay inside it, because a model
file can come from an untrusted client of the service.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from gradprobe.diagnostics.errors import InputSpecError, ModelLoadError

_P = onnx.TensorProto

# ONNX element type -> (torch dtype, numpy dtype of the stored bytes). bfloat16 is stored as
# its 16-bit pattern, so numpy only ever sees uint16 and torch reinterprets the bits.
_TYPES: dict[int, tuple[torch.dtype, np.dtype]] = {
    _P.FLOAT: (torch.float32, np.dtype(np.float32)),
    _P.DOUBLE: (torch.float64, np.dtype(np.float64)),
    _P.FLOAT16: (torch.float16, np.dtype(np.float16)),
    _P.BFLOAT16: (torch.bfloat16, np.dtype(np.uint16)),
    _P.BOOL: (torch.bool, np.dtype(np.bool_)),
    _P.INT8: (torch.int8, np.dtype(np.int8)),
    _P.UINT8: (torch.uint8, np.dtype(np.uint8)),
    _P.INT16: (torch.int16, np.dtype(np.int16)),
    _P.INT32: (torch.int32, np.dtype(np.int32)),
    _P.INT64: (torch.int64, np.dtype(np.int64)),
    _P.UINT16: (torch.uint16, np.dtype(np.uint16)),
    _P.UINT32: (torch.uint32, np.dtype(np.uint32)),
    _P.UINT64: (torch.uint64, np.dtype(np.uint64)),
    _P.COMPLEX64: (torch.complex64, np.dtype(np.complex64)),
    _P.COMPLEX128: (torch.complex128, np.dtype(np.complex128)),
}

# Types whose typed-field storage is int32_data holding each value (or its bit pattern).
_IN_INT32_DATA = {_P.FLOAT16, _P.BFLOAT16, _P.BOOL, _P.INT8, _P.UINT8, _P.INT16, _P.UINT16,
                  _P.INT32}


def type_name(elem_type: int) -> str:
    try:
        return _P.DataType.Name(elem_type)
    except ValueError:
        return f"element type {elem_type}"


def onnx_dtype_to_torch(elem_type: int) -> torch.dtype:
    """The torch dtype for an ONNX element type; InputSpecError naming the type if none fits."""
    try:
        return _TYPES[elem_type][0]
    except KeyError:
        raise InputSpecError(
            f"ONNX type {type_name(elem_type)} has no torch equivalent gradprobe can run"
        ) from None


def torch_dtype_to_onnx(dtype: torch.dtype) -> int:
    for elem_type, (torch_dtype, _) in _TYPES.items():
        if torch_dtype == dtype:
            return elem_type
    raise InputSpecError(f"torch dtype {dtype} has no ONNX equivalent")


def tensor_from_proto(t: onnx.TensorProto, base_dir: Path | None) -> torch.Tensor:
    """Decode a TensorProto (inline or external data) into a fresh CPU tensor."""
    name = t.name or "<unnamed>"
    if t.data_type not in _TYPES:
        raise ModelLoadError(
            f"tensor '{name}' has type {type_name(t.data_type)}, which gradprobe cannot load"
        )
    if t.HasField("segment"):
        raise ModelLoadError(f"tensor '{name}' is segmented, which gradprobe cannot load")
    torch_dtype, stored = _TYPES[t.data_type]
    dims = tuple(int(d) for d in t.dims)
    count = int(np.prod(dims, dtype=np.int64))

    if t.data_location == _P.EXTERNAL:
        array = np.frombuffer(_read_external(t, base_dir), dtype=stored)
    elif t.HasField("raw_data"):
        array = np.frombuffer(t.raw_data, dtype=stored)
    else:
        array = _typed_field_values(t, stored)

    if array.size != count:
        raise ModelLoadError(
            f"tensor '{name}' holds {array.size} values but its shape {list(dims)} needs {count}"
        )
    result = torch.from_numpy(array.reshape(dims).copy())
    if t.data_type == _P.BFLOAT16:
        result = result.view(torch.bfloat16)
    return result


def _typed_field_values(t: onnx.TensorProto, stored: np.dtype) -> np.ndarray:
    kind = t.data_type
    if kind == _P.FLOAT:
        return np.asarray(t.float_data, dtype=stored)
    if kind == _P.DOUBLE:
        return np.asarray(t.double_data, dtype=stored)
    if kind == _P.INT64:
        return np.asarray(t.int64_data, dtype=stored)
    if kind in (_P.UINT32, _P.UINT64):
        return np.asarray(t.uint64_data, dtype=stored)
    if kind in (_P.COMPLEX64, _P.COMPLEX128):
        pairs = np.asarray(t.float_data if kind == _P.COMPLEX64 else t.double_data)
        return (pairs[0::2] + 1j * pairs[1::2]).astype(stored)
    if kind in (_P.FLOAT16,):
        # int32_data holds the IEEE half bit patterns.
        return np.asarray(t.int32_data, dtype=np.uint16).view(np.float16)
    if kind in _IN_INT32_DATA:
        return np.asarray(t.int32_data, dtype=np.int64).astype(stored)
    raise ModelLoadError(f"tensor '{t.name}' has no data field gradprobe can read")


def _read_external(t: onnx.TensorProto, base_dir: Path | None) -> bytes:
    name = t.name or "<unnamed>"
    info = {entry.key: entry.value for entry in t.external_data}
    location = info.get("location")
    if not location:
        raise ModelLoadError(f"tensor '{name}' is stored externally but names no file")
    if base_dir is None:
        raise ModelLoadError(
            f"tensor '{name}' is stored in external file '{location}' but the model's folder "
            "is unknown"
        )
    root = Path(base_dir).resolve()
    path = (root / location).resolve()
    if root != path and root not in path.parents:
        raise ModelLoadError(
            f"tensor '{name}' points outside the model folder ('{location}'); refusing to read it"
        )
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else -1
    except ValueError:
        raise ModelLoadError(f"tensor '{name}' has a malformed external offset/length") from None
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read(length) if length >= 0 else handle.read()
    except OSError as err:
        raise ModelLoadError(
            f"tensor '{name}': cannot read external data file '{location}' ({err.strerror})"
        ) from None
    if length >= 0 and len(data) != length:
        raise ModelLoadError(
            f"tensor '{name}': external data file '{location}' is truncated "
            f"(wanted {length} bytes at offset {offset}, got {len(data)})"
        )
    return data
