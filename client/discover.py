"""Find the model files under a directory: ONNX files by suffix, TorchScript files by suffix
*and* content, in a sorted, deterministic order.

`.pt`/`.pth` is also the suffix of plain `torch.save` checkpoints (a state dict is not a
model). Both are zip archives with a `data.pkl`, so that entry proves nothing; a TorchScript
archive also carries its compiled source under `<archive>/code/` and a `constants.pkl`, which a
checkpoint never has. Reading the zip directory costs one seek, not a load."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

from gradprobe.diagnostics.archives import is_pt2_archive
from gradprobe.diagnostics.errors import ModelLoadError

ONNX_SUFFIXES = (".onnx",)
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".ptl")
EXPORT_SUFFIXES = (".pt2",)  # torch.export.save archives
# Folders that never hold the user's models but can be huge: don't walk them.
SKIPPED_DIRS = {"__pycache__", "node_modules", "site-packages"}


def is_torchscript_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any("/code/" in name or name.endswith("constants.pkl") for name in names)


def is_model_file(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return True
    if suffix in EXPORT_SUFFIXES:
        return is_pt2_archive(path)
    return suffix in TORCHSCRIPT_SUFFIXES and is_torchscript_archive(path)


def find_models(root: Path) -> list[Path]:
    """Every model file below `root`, sorted by relative path. Hidden folders (`.git`,
    `.venv`) and symlinked folders (loops) are not entered."""
    found = []
    for directory, subdirs, files in os.walk(root, followlinks=False):
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d not in SKIPPED_DIRS]
        for name in files:
            path = Path(directory) / name
            if not name.startswith(".") and is_model_file(path):
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Command-line paths to model files: a file stays as given (its loader decides, and says
    why if it cannot), a directory becomes the models below it. Order follows the arguments;
    a file reached twice is linted once."""
    result: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        if path.is_dir():
            models = find_models(path)
            if not models:
                raise ModelLoadError(f"{path}: no ONNX or TorchScript model files found "
                                     f"under this directory")
        else:
            models = [path]
        for model in models:
            key = model.resolve()
            if key not in seen:
                seen.add(key)
                result.append(model)
    return result
