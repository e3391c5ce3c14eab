"""Pick the loader for a model file by its content, not its name."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from gradprobe.diagnostics.archives import is_pt2_archive
from gradprobe.diagnostics.errors import ModelLoadError
from gradprobe.diagnostics.graph import LoadedModel

ZIP_MAGIC = b"PK\x03\x04"


def sniff_format(head: bytes) -> Literal["onnx", "torchscript"]:
    """TorchScript archives are zip files; everything else is tried as ONNX protobuf."""
    return "torchscript" if head.startswith(ZIP_MAGIC) else "onnx"


def load_model(source: Path | bytes, fmt: Literal["onnx", "torchscript", "pt2"] | None = None,
               name: str = "", *, self_contained: bool = False) -> LoadedModel:
    """`self_contained`: the model may read no other file (ONNX external data is refused)."""
    if isinstance(source, Path):
        if not source.exists():
            raise ModelLoadError(f"{source}: no such file")
        if source.is_dir():
            raise ModelLoadError(f"{source} is a directory, not a model file")
        with source.open("rb") as f:
            head = f.read(8)
        if not head:
            raise ModelLoadError(f"{source} is empty")
        name = name or source.name
    else:
        head = source[:8]
        if not head:
            raise ModelLoadError(f"{name or 'the uploaded model'} is empty")
    fmt = fmt or sniff_format(head)
    if fmt == "pt2" or (fmt == "torchscript" and is_pt2_archive(source)):
        from gradprobe.diagnostics.loaders.export_loader import load_pt2

        return load_pt2(source, name=name)
    if fmt == "torchscript":
        from gradprobe.diagnostics.loaders.torchscript_loader import load_torchscript

        return load_torchscript(source, name=name or None)
    from gradprobe.diagnostics.loaders.onnx_loader import load_onnx

    return load_onnx(source, name=name or None, self_contained=self_contained)
