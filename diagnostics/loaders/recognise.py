"""Files that are often mistaken for a model: say what each is and what to do, before a
loader tries to parse it. Reads only the first bytes (and a zip's directory), never unpickles."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

LFS_POINTER = b"version https://git-lfs.github.com/spec/"
ZIP_MAGIC = b"PK\x03\x04"
WEIGHTS_ONLY_ADVICE = ("lint the exported model (torch.onnx.export, or torch.jit.trace/script "
                       "and torch.jit.save), or call gradprobe.diagnose(model, inputs) on the "
                       "nn.Module in Python")


def _safetensors_header(head: bytes) -> bool:
    """8-byte little-endian header length, then a JSON object."""
    if len(head) < 10:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length < 100 * 2**20 and head[8:9] == b"{"


def _zip_names(source: Path | bytes) -> list[str] | None:
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def what_it_is(source: Path | bytes, head: bytes, name: str) -> str | None:
    """A one-line description (starting with "is ...") of a file that is not a model gradprobe
    can lint, with what to do instead; None when it may be a model."""
    found = recognise(source, head, name)
    return found[1] if found else None


def recognise(source: Path | bytes, head: bytes, name: str) -> tuple[str, str] | None:
    """(kind, description) of a file that is not a model gradprobe can lint: kind is a few
    words for a summary ("weights-only checkpoint"), description a sentence starting "is"."""
    lower = name.lower()
    if head.startswith(LFS_POINTER[:16]):
        return "git-lfs pointer", ("is a git-lfs pointer, not the model itself: run `git lfs "
                                   "pull` (or check out with LFS) to fetch the file")
    if lower.endswith(".safetensors") or _safetensors_header(head):
        return "safetensors weights", ("is a safetensors file: weights only, no graph to "
                                       f"probe; {WEIGHTS_ONLY_ADVICE}")
    if lower.endswith((".onnx.data", ".onnx_data", ".onnx.bin")) or (
            lower.endswith(".data") and isinstance(source, Path)
            and source.with_suffix("").suffix == ".onnx"):
        return "ONNX external data", ("is the external-data file of an ONNX model (its "
                                      "tensors only): lint the .onnx file beside it, which "
                                      "reads this one")
    if head[:1] == b"\x80" and lower.endswith((".pt", ".pth", ".bin", ".ckpt", ".pkl")):
        return "weights-only checkpoint", ("is a pickled PyTorch checkpoint (torch.save): "
                                           "weights only, no graph to probe; "
                                           + WEIGHTS_ONLY_ADVICE)
    if head.startswith(ZIP_MAGIC):
        names = _zip_names(source)
        if names is not None and not any("/code/" in n for n in names) and any(
                n.endswith("data.pkl") for n in names):
            return "weights-only checkpoint", (
                "is a weights-only PyTorch checkpoint (torch.save of a state_dict or module, "
                f"without TorchScript code): no graph to probe; {WEIGHTS_ONLY_ADVICE}")
    return None
